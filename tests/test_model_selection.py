"""``scripts.model_selection``: the protocol's ranking, targets and records, by hand and end to end.

The end-to-end test scores a tiny synthetic val split with two tiny candidate networks and the baselines,
then checks that the records agree with each other and that a split is scored once.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.model_selection import (
    RANK_METRICS,
    Candidate,
    check_targets,
    mean_ranks,
    read_summary,
    score_split,
    select_candidate,
)
from scripts.networks import ClinicalFMamba

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
TINY = {"features": [8, 8, 16], "depth": 1, "decoder_depth": 1, "d_state": 4, "swap_d_state": 4}


def _summary(values: dict[str, dict[str, float]]) -> dict:
    """One task (CT-MRI), every rank metric of a method set to values[method][metric] (default 0)."""
    return {m: {"CT-MRI": {k: {"mean": v.get(k, 0.0), "std": 0.0} for k in RANK_METRICS}} for m, v in values.items()}


def test_mean_ranks_share_the_best_rank_on_ties() -> None:
    summary = _summary({"a": {"EN": 2.0, "SD": 1.0}, "b": {"EN": 2.0, "SD": 3.0}, "c": {"EN": 1.0, "SD": 2.0}})
    ranks = mean_ranks(summary, ["a", "b", "c"])
    # EN: a 1, b 1, c 3; SD: b 1, c 2, a 3; the other 6 metrics: all tie at 1
    assert ranks == pytest.approx({"a": (1 + 3 + 6) / 8, "b": (1 + 1 + 6) / 8, "c": (3 + 2 + 6) / 8})
    assert select_candidate(ranks, ["a", "c"]) == "a"
    assert select_candidate({"a": 1.5, "b": 1.5}, ["b", "a"]) == "b"  # tie: the first listed (the paper's network)
    missing = _summary({"a": {"EN": 1.0}, "b": {"EN": float("nan")}})
    assert mean_ranks(missing, ["a", "b"])["b"] == pytest.approx((2 + 7) / 8)  # NaN ranks last


def test_targets_by_hand() -> None:
    net = dict(zip(RANK_METRICS, (5.0, 80.0, 40.0, 2.0, 1.5, 0.7, 0.7, 1.4)))
    mean = dict(zip(RANK_METRICS, (4.0, 60.0, 20.0, 2.5, 1.2, 0.4, 0.4, 1.4)))
    high = dict(zip(RANK_METRICS, (3.0, 90.0, 39.0, 3.0, 1.6, 0.6, 0.71, 1.45)))
    got = check_targets(_summary({"net": net, "mean": mean, "max": high}), "net")["CT-MRI"]
    assert got["beats_max"] == ["SF"]  # Q^AB/F 0.70 < 0.71
    assert got["beats_mean"] == ["EN", "SD", "SF", "SCD", "VIF", "Qabf"]  # MI below, SSIM equal
    # CDDFuse CT-MRI: 4.88 79.17 38.14 2.61 1.41 0.61 0.68 1.34
    assert got["reaches_cddfuse"] == ["EN", "SD", "SF", "SCD", "VIF", "Qabf", "SSIM"]
    assert got["met"] is False
    high["Qabf"] = 0.69
    assert check_targets(_summary({"net": net, "mean": mean, "max": high}), "net")["CT-MRI"]["met"] is True


def _pairs(root: Path, size: int = 48) -> Path:
    """2 CT-MRI and 2 PET-MRI (colour) val pairs plus one train pair, Harvard layout with pairs.csv."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:size, :size] / size
    rows = []
    for i, (task, folder, split) in enumerate(
        [
            ("CT-MRI", "CT", "val"),
            ("CT-MRI", "CT", "val"),
            ("PET-MRI", "PET", "val"),
            ("PET-MRI", "PET", "val"),
            ("CT-MRI", "CT", "train"),
        ]
    ):
        d = np.hypot(xx - 0.5, yy - 0.5)
        mri = np.clip(180 * (d < 0.35) * (0.6 + 0.4 * np.cos(9 * xx + i)) + 30 * rng.random((size, size)), 0, 255)
        other = np.clip((np.abs(d - 0.3) < 0.05) * 230.0 + 50 * (d < 0.15), 0, 255).astype(np.uint8)
        for sub in ("MRI", folder):
            (root / task / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(mri.astype(np.uint8)).save(root / task / "MRI" / f"{i}.png")
        image = (
            Image.fromarray(np.stack([other, other // 2, 255 - other], -1), "RGB")
            if folder == "PET"
            else (Image.fromarray(other))
        )
        image.save(root / task / folder / f"{i}.png")
        rows.append(
            {
                "task": task,
                "pair_id": str(i),
                "mri": f"{task}/MRI/{i}.png",
                "other": f"{task}/{folder}/{i}.png",
                "split": split,
            }
        )
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def _candidate(root: Path, name: str, **switches) -> Candidate:
    torch.manual_seed(len(name))
    run = root / "runs" / name
    run.mkdir(parents=True)
    torch.save(ClinicalFMamba(spatial_dims=2, **TINY, **switches).state_dict(), run / "model.pt")
    (run / "training_log.csv").write_text("epoch,val_qabf,best_metric,best_epoch\n1,0.5,0.5,1\n2,,0.5,1\n")
    return Candidate(name, name, str(run), {**TINY, **switches})


def test_score_split_writes_consistent_records_once(tmp_path: Path) -> None:
    data = _pairs(tmp_path / "data")
    candidates = [
        _candidate(tmp_path, "paper", refine=False, source_selection=False),
        _candidate(tmp_path, "selection", refine=True, source_selection=True),
    ]
    out = tmp_path / "results" / "val"
    result = score_split(
        "val",
        output_dir=out,
        candidates=candidates,
        bundle_root=BUNDLE_ROOT,
        work_dir=tmp_path / "work",
        dataset_dir=str(data),
    )
    methods = ["paper", "selection", "mean", "max", "laplacian"]
    for profile in ("cddfuse", "clinicalfmamba", "characterisation"):
        with open(out / f"pairs_{profile}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert sorted({r["method"] for r in rows}) == sorted(methods)
        assert sorted(r["id"] for r in rows if r["method"] == "max") == ["0", "1", "2", "3"]  # val pairs only
        summary = read_summary(out / f"summary_{profile}.json")["methods"]
        for m in methods:  # the summary is the per-pair mean of the CSV
            for task in ("CT-MRI", "PET-MRI"):
                values = [r for r in rows if r["method"] == m and r["task"] == task]
                assert summary[m][task]["n"] == 2
                metric = "Qabf" if profile == "cddfuse" else "EN" if profile == "clinicalfmamba" else "copy_max"
                mean = np.mean([float(r[metric]) for r in values])
                assert summary[m][task][metric]["mean"] == pytest.approx(mean, rel=1e-12)
    characterisation = read_summary(out / "summary_characterisation.json")["methods"]
    assert characterisation["max"]["CT-MRI"]["copy_max"]["mean"] == pytest.approx(1.0)  # the max rule copies max
    assert characterisation["mean"]["CT-MRI"]["copy_max"]["mean"] < 0.5

    selection = json.loads((out / "selection.json").read_text())
    assert selection == result and selection["selected"] in ("paper", "selection")
    ranks = mean_ranks(read_summary(out / "summary_cddfuse.json")["methods"], methods)
    assert selection["mean_ranks"] == pytest.approx(ranks)
    assert selection["selected"] == select_candidate(ranks, ["paper", "selection"])
    assert selection["candidates"]["paper"]["best_epoch"] == 1 and selection["candidates"]["paper"]["epochs_run"] == 2
    assert set(selection["candidates"]["selection"]["targets"]) == {"CT-MRI", "PET-MRI"}
    assert not (tmp_path / "work").exists()  # scratch reports removed

    with pytest.raises(FileExistsError, match="scored once"):
        score_split("val", output_dir=out, candidates=candidates, bundle_root=BUNDLE_ROOT, dataset_dir=str(data))
    with pytest.raises(FileNotFoundError, match="validation split first"):
        score_split("test", output_dir=tmp_path / "other" / "test", candidates=candidates, bundle_root=BUNDLE_ROOT)
    assert math.isfinite(selection["mean_ranks"]["paper"])


def test_the_shipped_configs_build_the_selected_candidate() -> None:
    """models/model.pt is the selected candidate's checkpoint, and every 2D config builds that candidate's network."""
    selection = json.loads((BUNDLE_ROOT / "docs" / "results" / "val" / "selection.json").read_text())
    chosen = selection["candidates"][selection["selected"]]
    shipped = torch.load(BUNDLE_ROOT / "models" / "model.pt", map_location="cpu", weights_only=True)
    trained = torch.load(BUNDLE_ROOT / chosen["run_dir"] / "model.pt", map_location="cpu", weights_only=True)
    assert shipped.keys() == trained.keys() and all(torch.equal(shipped[k], trained[k]) for k in shipped)
    for name in ("train.json", "inference.json", "evaluate.json"):
        config = json.loads((BUNDLE_ROOT / "configs" / name).read_text())
        key = "clinicalfmamba_def" if name == "evaluate.json" else "network_def"
        options = {k: v for k, v in config[key].items() if k in ("refine", "source_selection")}
        assert options == chosen["network"], f"configs/{name}: {options} is not the selected {chosen['network']}"


@pytest.mark.parametrize("overlay", ["train_paper.json", "train_refine.json"])
def test_train_json_alone_is_the_selected_candidates_recipe(overlay: str) -> None:
    """``configs/train.json`` alone resolves to the selected candidate's configuration (its overlay changes
    nothing but the description), so one command reproduces the shipped run from scratch."""
    from monai.bundle import ConfigParser

    selection = json.loads((BUNDLE_ROOT / "docs" / "results" / "val" / "selection.json").read_text())
    chosen = selection["candidates"][selection["selected"]]
    if f"train_{selection['selected']}.json" != overlay:
        overlay_network = json.loads((BUNDLE_ROOT / "configs" / overlay).read_text())
        assert {k.split("#")[1]: v for k, v in overlay_network.items() if k.startswith("network_def#")} != chosen[
            "network"
        ]
        return
    alone, layered = ConfigParser(), ConfigParser()
    alone.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    layered.read_config([str(BUNDLE_ROOT / "configs" / "train.json"), str(BUNDLE_ROOT / "configs" / overlay)])
    a, b = alone.get(), layered.get()
    a.pop("_desc_", None), b.pop("_desc_", None)
    assert a == b
