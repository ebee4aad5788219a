"""The pieces behind the command-line behaviour of issue #24, items 0-3, checked in this process: the weights
decision, the one-line error chosen from MONAI's wrapped exceptions, the exit rule of the fusion summary and
the DICOM CLI's handling of unreadable weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reliability_helpers import TINY_KW

from scripts.baselines import MeanFusion
from scripts.cli import RunFailedError, user_message
from scripts.networks import ClinicalFMamba
from scripts.transforms import FusionSummary
from scripts.weights import choose_weights


def test_weights_are_loaded_refused_or_explicitly_untrained(tmp_path: Path) -> None:
    net = ClinicalFMamba(**TINY_KW)
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    assert choose_weights(net, ckpt) == choose_weights(net, str(ckpt), allow_untrained=True)
    assert choose_weights(net, ckpt).load and not choose_weights(net, ckpt).untrained
    with pytest.raises(
        FileNotFoundError, match=r"weights file not found: .*absent\.pt; .*--ckpt_path FILE.*--allow_untrained true"
    ):
        choose_weights(net, tmp_path / "absent.pt")
    with pytest.raises(ValueError, match=r"load_pretrain is false, so ClinicalFMamba would fuse with random weights"):
        choose_weights(net, ckpt, load=False)
    untrained = choose_weights(net, tmp_path / "absent.pt", allow_untrained=True)
    assert (untrained.load, untrained.untrained) == (False, True) and untrained.note.startswith("UNTRAINED")
    rule = choose_weights(MeanFusion(), tmp_path / "absent.pt")  # parameter-free: nothing to load, nothing missing
    assert (rule.load, rule.untrained) == (False, False) and "no parameters" in rule.note


def test_relative_missing_weights_name_the_resolved_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        choose_weights(ClinicalFMamba(**TINY_KW), "models/model.pt")
    assert f"models/model.pt (from {tmp_path}: {tmp_path / 'models' / 'model.pt'})" in str(err.value)


def _wrapped(err: Exception) -> RuntimeError:
    """``err`` wrapped as MONAI wraps it: 'Failed to instantiate component' from 'Failed to evaluate'."""
    try:
        try:
            try:
                raise err
            except Exception as e:
                raise RuntimeError(
                    "Failed to instantiate component 'scripts.pair_check.check_pairs' with keywords: x"
                ) from e
        except Exception as e:
            raise RuntimeError("Failed to evaluate ConfigExpression: '$@pair_check.valid'") from e
    except RuntimeError as outer:
        return outer


def test_the_user_facing_error_is_found_below_monais_wrappers() -> None:
    assert user_message(_wrapped(FileNotFoundError("dataset folder not found: /x"))) == "dataset folder not found: /x"
    cause = ValueError("/w.pt is not a readable PyTorch weights file")
    try:
        raise cause from EOFError("raw")  # our message wraps the library's: ours is shown
    except ValueError as e:
        assert user_message(_wrapped(e)) == "/w.pt is not a readable PyTorch weights file"
    assert user_message(_wrapped(AttributeError("'NoneType' object has no attribute 'x'"))) is None  # a bug
    assert user_message(RunFailedError("1 of 2 pairs failed: p")) == "1 of 2 pairs failed: p"


def test_the_summary_names_failures_and_decides_the_exit() -> None:
    summary = FusionSummary(failed=[({"id": "a"}, "bad size")])
    summary.add_written(["out/b_fused.png"])
    assert str(summary) == "1 pairs written, 0 skipped, 1 failed (a)"
    with pytest.raises(RunFailedError, match=r"1 of 2 pairs failed: a .*--fail_on all"):
        summary.raise_if_failed("any")
    summary.raise_if_failed("all")  # one pair was written
    none_written = FusionSummary(failed=[({"id": "a"}, "x"), ({"mri": "/d/b.png"}, "y")], untrained=True)
    with pytest.raises(RunFailedError, match=r"2 of 2 pairs failed: a, /d/b\.png"):
        none_written.raise_if_failed("all")
    assert str(none_written).endswith(
        "; UNTRAINED network: random weights (--allow_untrained true), outputs are not meaningful"
    )
    FusionSummary().raise_if_failed("any")
    with pytest.raises(ValueError, match="fail_on must be 'any' or 'all'"):
        FusionSummary().raise_if_failed("never")


def test_dicom_weights_are_read_safely_and_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    """The DICOM path reads weights through ``load_network_weights`` (``weights_only``): a truncated file is a
    readable error; the CLI prints user-facing errors as one ``error:`` line with exit status 1."""
    from scripts.dicom import load_fusion_network, main

    weights = tmp_path / "model.pt"
    torch.save(ClinicalFMamba(**TINY_KW).state_dict(), weights)
    weights.write_bytes(weights.read_bytes()[:1000])
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"network_def": {"_target_": "scripts.networks.ClinicalFMamba", **TINY_KW}}))
    with pytest.raises(ValueError, match=r"model\.pt is not a readable PyTorch weights file"):
        load_fusion_network("clinicalfmamba", weights, config)
    status = main(["fuse", "--mri", str(tmp_path / "mri"), "--other", str(tmp_path / "ct"),
                   "--output", str(tmp_path / "out"), "--weights", str(weights), "--config", str(config)])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(tmp_path / "mri") in errors[0] and not (tmp_path / "out").exists()
