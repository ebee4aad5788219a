"""``configs/evaluate.json`` (layered on ``configs/inference.json``) and ``scripts/evaluate.py``.

Real-data tests score two Harvard test pairs (one grey MRI-CT pair, one colour MRI-PET pair) with the
``cddfuse`` profile, which is cheap (about 1 s per pair on a 2-core CPU).
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from scripts.evaluate import (
    FusionReport,
    compare,
    evaluation_datalist,
    format_mean_std,
    fusion_method,
    read_rows,
    summarise,
)
from scripts.metrics import get_profile

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [str(BUNDLE_ROOT / "configs" / "inference.json"), str(BUNDLE_ROOT / "configs" / "evaluate.json")]
TINY_NET = {
    "_target_": "scripts.networks.ClinicalFMamba",
    "features": [8, 8, 16],
    "depth": 1,
    "decoder_depth": 1,
    "d_state": 4,
    "swap_d_state": 4,
}
PAIRS = [("CT-MRI", "34002"), ("PET-MRI", "30025")]
CDDFUSE = get_profile("cddfuse").default_metrics


def _datalist(shared_data: Path, tmp_path: Path) -> Path:
    """A CSV datalist of the two test pairs (absolute paths; nothing is copied)."""
    root = shared_data / "harvard"
    with open(root / "pairs.csv", newline="") as f:
        rows = {(r["task"], r["pair_id"]): r for r in csv.DictReader(f)}
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "id", "mri", "other", "split"])
        for key in PAIRS:
            r = rows[key]
            writer.writerow([r["task"], r["pair_id"], root / r["mri"], root / r["other"], r["split"]])
    return path


def _workflow(tmp_path: Path, **override) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=CONFIGS,
        meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"),
        logging_file=str(BUNDLE_ROOT / "configs" / "logging.conf"),
        workflow_type="infer",
        **{"bundle_root": str(BUNDLE_ROOT), **override},
    )
    wf.initialize()
    return wf


def _messages(err: BaseException) -> str:
    texts = []
    while err is not None:
        texts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(texts)


def test_compare_baselines_on_real_pairs(shared_data: Path, tmp_path: Path) -> None:
    datalist = _datalist(shared_data, tmp_path)
    out = tmp_path / "eval"
    written = compare(["mean", "max"], profile="cddfuse", output_dir=out, datalist=str(datalist))
    assert set(written) == {"comparison_cddfuse_md", "comparison_cddfuse_csv"}
    rows = {}
    for method in ("mean", "max"):
        folder = out / method
        assert {p.name for p in folder.iterdir()} == {
            "metrics_cddfuse.csv", "summary_cddfuse.csv", "summary_cddfuse.md", "figure.png",
        }  # fmt: skip
        per_pair, names = read_rows(folder / "metrics_cddfuse.csv")
        assert names == list(CDDFUSE)
        assert [(r["task"], r["id"], r["method"]) for r in per_pair] == [(t, i, method) for t, i in PAIRS]
        for r in per_pair:
            assert all(math.isfinite(r[m]) for m in names)
            assert 1.0 < r["SSIM"] < 2.0  # summed over the two sources
            assert 0.0 < r["EN"] <= 8.0 and 0.0 < r["Qabf"] < 1.0 and r["MI"] > 0.0
        rows[method] = {r["task"]: r for r in per_pair}
        md = (folder / "summary_cddfuse.md").read_text()
        assert get_profile("cddfuse").describe()["scale"] in md  # conventions at the top
        assert md.index("conventions") < md.index("| task | n | EN |")
        assert "| CT-MRI | 1 |" in md and "| PET-MRI | 1 |" in md and "| all | 2 |" in md
        with open(folder / "summary_cddfuse.csv", newline="") as f:
            summary = list(csv.DictReader(f))
        assert [s["task"] for s in summary] == ["CT-MRI", "PET-MRI", "all"]
        pooled = np.mean([r["SD"] for r in per_pair])
        assert float(summary[-1]["SD_mean"]) == pytest.approx(pooled)
        figure = Image.open(folder / "figure.png")
        assert figure.size[0] > 500 and figure.size[1] > 300  # 2 rows x (MRI, other, 3 fused) panels
    for task, _ in PAIRS:  # the max rule keeps more contrast and more of each source than the mean rule
        assert rows["max"][task]["SD"] > rows["mean"][task]["SD"]
        assert rows["max"][task]["MI"] > rows["mean"][task]["MI"]
    table = (out / "comparison_cddfuse.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| CT-MRI |") or line.startswith("| PET-MRI |")]
    assert [line.split(" | ")[1] for line in lines] == ["mean", "max", "mean", "max"]
    with pytest.raises(FileExistsError, match="comparison_cddfuse"):
        compare(["mean"], profile="cddfuse", output_dir=out, datalist=str(datalist))
    # reuse: the per-pair CSVs cover the same pairs, so nothing is re-scored
    compare(["max", "mean"], profile="cddfuse", output_dir=out, datalist=str(datalist), reuse=True, overwrite=True)
    with open(out / "comparison_cddfuse.csv", newline="") as f:
        assert [(r["task"], r["method"]) for r in csv.DictReader(f)][:2] == [("CT-MRI", "max"), ("CT-MRI", "mean")]


def test_cli_single_method_and_existing_reports(shared_data: Path, tmp_path: Path) -> None:
    datalist = _datalist(shared_data, tmp_path)
    out = tmp_path / "max"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", "['configs/inference.json','configs/evaluate.json']",
        "--datalist", str(datalist), "--tasks", "['PET-MRI']",
        "--method", "max", "--profile", "default", "--metrics", "['SD','SSIM','Qabf']",
        "--output_dir", str(out), "--save_fused", "true",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=300, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "evaluating max (MaxFusion) on 1 pairs" in log
    per_pair, names = read_rows(out / "metrics_default.csv")
    assert names == ["SD", "SSIM", "Qabf"] and [r["task"] for r in per_pair] == ["PET-MRI"]
    assert 0.0 < per_pair[0]["SSIM"] < 1.0  # averaged over the two sources in the default profile
    assert (out / "fused" / "PET-MRI" / "30025_fused.png").is_file()  # colour, plus the grey Y
    assert Image.open(out / "fused" / "PET-MRI" / "30025_fused.png").mode == "RGB"
    # a second run refuses to replace the reports before fusing anything
    wf = _workflow(tmp_path, datalist=str(datalist), method="max", profile="default", output_dir=str(out))
    with pytest.raises(Exception) as err:
        wf.run()
    assert "metrics_default.csv" in _messages(err.value) and "--overwrite true" in _messages(err.value)


def test_network_method_with_weights_and_missing_checkpoint(shared_data: Path, tmp_path: Path) -> None:
    datalist = _datalist(shared_data, tmp_path)
    missing = tmp_path / "models" / "model.pt"
    wf = _workflow(tmp_path, datalist=str(datalist), clinicalfmamba_def=TINY_NET, ckpt_path=str(missing))
    with pytest.raises(Exception) as err:
        wf.run()
    message = _messages(err.value)
    assert str(missing) in message and "needs trained weights" in message and "--method" in message
    # with a checkpoint the network is loaded from it and evaluated like a baseline
    model = _tiny()
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    missing.parent.mkdir(parents=True)
    torch.save(model.state_dict(), missing)
    out = tmp_path / "net"
    wf = _workflow(
        tmp_path, datalist=str(datalist), clinicalfmamba_def=TINY_NET, ckpt_path=str(missing), tasks="CT-MRI",
        output_dir=str(out), profile="cddfuse", metrics=["SD", "SSIM"], figure_cases=0,
    )  # fmt: skip
    wf.run()
    loaded = wf.parser.get_parsed_content("network")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    per_pair, _ = read_rows(out / "metrics_cddfuse.csv")
    assert [(r["task"], r["method"]) for r in per_pair] == [("CT-MRI", "clinicalfmamba")]
    assert f"weights `{missing}`" in (out / "summary_cddfuse.md").read_text()
    assert not (out / "figure.png").exists()


def _tiny() -> torch.nn.Module:
    from scripts.networks import ClinicalFMamba

    return ClinicalFMamba(**{k: v for k, v in TINY_NET.items() if k != "_target_"})


def test_fusion_method_and_datalist_errors(tmp_path: Path) -> None:
    assert type(fusion_method("MAX")).__name__ == "MaxFusion"
    assert type(fusion_method("laplacian")).__name__ == "LaplacianPyramidFusion"
    with pytest.raises(ValueError, match="unknown fusion method 'median'"):
        fusion_method("median")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        fusion_method("clinicalfmamba", torch.nn.Identity(), tmp_path / "absent.pt")
    samples = BUNDLE_ROOT / "docs" / "samples"
    items = evaluation_datalist(samples, split="test", tasks=["CT-MRI"])  # no split field: the split is ignored
    assert [d["id"] for d in items] == ["34012", "34016"]
    with pytest.raises(ValueError, match="no pairs of tasks"):
        evaluation_datalist(samples, tasks="MR-US")


def test_summaries_and_report_without_engine(tmp_path: Path) -> None:
    rows = [
        {"task": "A", "X": 1.0, "Y": float("nan")},
        {"task": "A", "X": 3.0, "Y": 2.0},
        {"task": "B", "X": 5.0, "Y": float("inf")},
    ]
    summary = summarise(rows, ["X", "Y"])
    assert [(s["task"], s["n"]) for s in summary] == [("A", 2), ("B", 1), ("all", 3)]
    assert summary[0]["X_mean"] == 2.0 and summary[0]["X_std"] == pytest.approx(math.sqrt(2.0))
    assert summary[0]["Y_mean"] == 2.0 and math.isnan(summary[0]["Y_std"])  # NaN skipped, one value left
    assert math.isinf(summary[2]["Y_mean"])
    assert format_mean_std(92.3854, 4.6298) == "92.39 ± 4.63" and format_mean_std(1.5, math.nan) == "1.500 ± –"
    # a plain loop over dicts (no engine): a 24-pixel image is too small for VIF, which becomes NaN
    report = FusionReport(tmp_path, "mean", profile="cddfuse", metrics=["SD", "VIF"], figure_cases=1)
    img = torch.rand(1, 24, 24, generator=torch.Generator().manual_seed(0))
    report.add({"task": "T", "id": "1", "pred": img, "mri": img, "other": img.flip(-1)})
    assert math.isnan(report.rows["cddfuse"][0]["VIF"]) and report.rows["cddfuse"][0]["SD"] > 0
    written = report.write()
    assert set(written) == {"metrics_cddfuse", "summary_cddfuse", "markdown_cddfuse", "figure"}
    assert "Metrics that failed" in written["markdown_cddfuse"].read_text()
