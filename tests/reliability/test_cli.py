"""Whole-run reliability at the command line (issue #24, items 0-4): each test runs the command as a user would
(``python -m monai.bundle run ...`` in a subprocess) and checks the exit status, the message and the files.

0. missing weights refuse to run; only ``--allow_untrained true`` fuses with random weights, and says so;
1. an unknown override key stops the run with the closest known id;
2. the exit status is 1 when a pair failed (``--fail_on all``: only when every pair failed);
3. user-facing errors are one ``error:`` line, without MONAI's instantiation traceback;
4. ``on_error=skip`` sets aside a datalist entry naming a missing file; ``raise`` stops before compute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from reliability_helpers import BUNDLE_ROOT, TINY_KW, files_under, good_pair, png, write_datalist

from scripts.cli import TRACEBACK_ENV

MEAN = json.dumps({"_target_": "scripts.baselines.MeanFusion"})
TINY = json.dumps({"_target_": "scripts.networks.ClinicalFMamba", **TINY_KW})


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != TRACEBACK_ENV}
    return {**env, "PYTHONWARNINGS": "ignore", **extra}


def bundle_run(
    *args: str, config: str = "configs/inference.json", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """``python -m monai.bundle run --config_file CONFIG ARGS`` from the bundle root: (status, stdout, stderr)."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, *args]
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=600, env=_env(**(env or {})))
    return proc.returncode, proc.stdout, proc.stderr


def _one_error_line(stderr: str) -> str:
    """The run's error: exactly one ``error:`` line and no traceback."""
    assert "Traceback" not in stderr and "Failed to instantiate" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def test_unknown_option_stops_the_run_with_the_closest_id(tmp_path: Path) -> None:
    """Items 1 and 3: ``--datset_dir`` (a typo) would fuse the embedded samples; it stops with a suggestion."""
    data = tmp_path / "mydata"
    good_pair(data / "CT-MRI")
    status, out, err = bundle_run(
        "--datset_dir", str(data), "--output_dir", str(tmp_path / "out"), "--network_def", MEAN
    )
    assert status == 1
    line = _one_error_line(err)
    assert "unknown option --datset_dir (did you mean --dataset_dir?)" in line and "nothing was run" in line
    assert not (tmp_path / "out").exists()
    assert "fusing" not in out  # stopped in 'initialize', before the pairs were even listed


def test_missing_dataset_is_one_message_and_the_traceback_is_behind_an_option(tmp_path: Path) -> None:
    """Item 3: the message of the error that matters, not MONAI's 'Failed to instantiate component' chain."""
    args = ("--dataset_dir", str(tmp_path / "absent"), "--output_dir", str(tmp_path / "out"), "--network_def", MEAN)
    status, _, err = bundle_run(*args)
    assert status == 1
    assert (
        _one_error_line(err)
        == f"error: datalist source not found: {tmp_path / 'absent'} (expected a folder, a .csv or a .json file)"
    )
    assert len(err.strip().splitlines()) <= 3, err  # the error, the hint, at most MONAI's config warning
    status, _, err = bundle_run(*args, env={"CLINICALFMAMBA_TRACEBACK": "1"})
    assert status == 1 and "Traceback" in err and "datalist source not found" in err


def test_missing_weights_refuse_and_allow_untrained_says_so(tmp_path: Path) -> None:
    """Item 0: a mistyped --ckpt_path stops the run naming the path and the fix; --allow_untrained true runs."""
    data = tmp_path / "data"
    datalist = write_datalist(data / "pairs.csv", [good_pair(data, size=(16, 16))])
    common = ("--datalist", str(datalist), "--network_def", TINY, "--ckpt_path", str(tmp_path / "modle.pt"))
    status, out, err = bundle_run(*common, "--output_dir", str(tmp_path / "refused"))
    assert status == 1
    line = _one_error_line(err)
    assert f"weights file not found: {tmp_path / 'modle.pt'}" in line
    assert "--ckpt_path FILE" in line and "--allow_untrained true" in line
    assert not (tmp_path / "refused").exists()

    status, out, err = bundle_run(*common, "--output_dir", str(tmp_path / "untrained"), "--allow_untrained", "true")
    assert status == 0, err[-3000:]
    assert files_under(tmp_path / "untrained") == ["CT-MRI/p_fused.png"]
    assert "weights: UNTRAINED: random initialisation" in out
    assert "fusion summary: 1 pairs written, 0 skipped, 0 failed; UNTRAINED network: random weights" in out


def _mixed_datalist(tmp_path: Path) -> Path:
    """Two good pairs, one pair of different sizes, one entry naming a missing file."""
    data = tmp_path / "data"
    rows = [good_pair(data, "good1"), good_pair(data, "good2"), good_pair(data, "bad_size")]
    png(data / "CT" / "bad_size.png", size=(16, 14))
    rows.append({"task": "CT-MRI", "id": "gone", "mri": "MRI/gone.png", "other": "CT/good1.png"})
    return write_datalist(data / "pairs.csv", rows)


def test_failed_pairs_set_the_exit_status_and_are_named(tmp_path: Path) -> None:
    """Items 2 and 4: the valid pairs are fused, the bad pair and the bad datalist entry are named, exit 1;
    --fail_on all exits 0 unless every pair failed."""
    datalist = _mixed_datalist(tmp_path)
    status, out, err = bundle_run(
        "--datalist", str(datalist), "--output_dir", str(tmp_path / "out"), "--network_def", MEAN
    )
    assert status == 1, err[-3000:]
    assert files_under(tmp_path / "out") == ["CT-MRI/good1_fused.png", "CT-MRI/good2_fused.png"]
    assert "fusion summary: 2 pairs written, 0 skipped, 2 failed (gone, bad_size)" in out
    assert "entry 3: 'mri' file not found: " in out and "MRI/gone.png" in out
    line = _one_error_line(err)
    assert line.startswith("error: 2 of 4 pairs failed: gone, bad_size") and "--fail_on all" in line

    status, out, err = bundle_run(
        "--datalist", str(datalist), "--output_dir", str(tmp_path / "out2"), "--network_def", MEAN, "--fail_on", "all"
    )
    assert status == 0, err[-3000:]
    assert files_under(tmp_path / "out2") == ["CT-MRI/good1_fused.png", "CT-MRI/good2_fused.png"]


def test_on_error_raise_stops_at_a_missing_file_before_compute(tmp_path: Path) -> None:
    """Item 4: ``--on_error raise`` stops at the bad datalist entry; nothing is fused or written."""
    datalist = _mixed_datalist(tmp_path)
    args = ("--datalist", str(datalist), "--output_dir", str(tmp_path / "out"), "--network_def", MEAN)
    status, out, err = bundle_run(*args, "--on_error", "raise")
    assert status == 1
    assert (
        _one_error_line(err)
        == f"error: {datalist}, entry 3: 'mri' file not found: {datalist.parent / 'MRI' / 'gone.png'}"
    )
    assert not (tmp_path / "out").exists() and "fusing" not in out


def test_evaluate_cli_refuses_an_unknown_option(tmp_path: Path) -> None:
    """Item 1 for ``python -m scripts.evaluate``: its ``--key value`` overrides are checked the same way."""
    cmd = [sys.executable, "-m", "scripts.evaluate", "--methods", "mean", "--output_dir", str(tmp_path / "out"),
           "--datalst", str(tmp_path / "pairs.csv")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 1
    assert "unknown option --datalst (did you mean --datalist?)" in _one_error_line(proc.stderr)
    assert not (tmp_path / "out").exists()
