"""The companion bundle's configs on a tiny subset of the LGG cohort, reproducibility, metadata."""

import csv
import json
from pathlib import Path

import pytest
import torch

from scripts.classification import ChannelArm, ClassificationStudy, FusionArm, load_cohort

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundle" / "tumor_classification"
CONFIGS = BUNDLE / "configs"


def tiny_overrides(shared_data, tmp_path, name="out"):
    """1 fold of a 2-fold split, 8 patients x 4 slices, 32x32, 1 epoch, tiny classifier and tiny fusion network."""
    return {
        "bundle_root": str(BUNDLE),
        "dataset_dir": str(shared_data / "lgg_tcga"),
        "output_dir": str(tmp_path / name),
        "cache_dir": str(tmp_path / "cache"),
        "max_patients": 8,
        "max_slices_per_patient": 4,
        "n_folds": 2,
        "folds_to_run": 1,
        "seeds": [0],
        "epochs": 1,
        "batch_size": 8,
        "image_size": 32,
        "n_boot": 50,
        "classifier_def#block_inplanes": [4, 8, 8, 8],
        "fusion_ckpt": str(tmp_path / "no_fusion_weights.pt"),
        "allow_untrained": True,
        "fusion_network_def#features": [8, 16],
        "fusion_network_def#dilations": [1, 3],
        "fusion_network_def#depth": 1,
        "fusion_network_def#decoder_depth": 1,
    }


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _run(config_files, overrides):
    from monai.bundle import run

    run(config_file=[str(CONFIGS / c) for c in config_files], meta_file=str(BUNDLE / "metadata.json"), **overrides)


@pytest.fixture
def tiny_study(shared_data, tmp_path):
    ov = tiny_overrides(shared_data, tmp_path)
    _run(["study.json"], ov)
    return Path(ov["output_dir"])


def test_study_config_tiny_outputs(tiny_study):
    out = tiny_study
    for name in ("report.md", "results.csv", "comparisons.csv", "fold_metrics.csv", "predictions.csv", "folds.csv", "roc_curves.png", "run_info.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = _rows(out / "results.csv")
    arms = ["flair", "t1c", "flair+t1c", "clinicalfmamba", "mean", "max"]
    assert [(r["task"], r["arm"]) for r in results] == [(t, a) for t in ("patient", "slice") for a in arms]
    for r in results:
        assert 0.0 <= float(r["pooled_auc"]) <= 1.0
        assert float(r["pooled_auc_ci_low"]) <= float(r["pooled_auc"]) <= float(r["pooled_auc_ci_high"])
        assert 0.0 <= float(r["accuracy_mean"]) <= 1.0
    fused = [r for r in results if r["arm"] == "clinicalfmamba"]
    assert all(r["fusion_weights"] == "untrained" and "UNTRAINED" in r["arm_label"] for r in fused)
    comps = _rows(out / "comparisons.csv")
    assert len(comps) == 10 and {c["other_arm"] for c in comps} == set(arms) - {"clinicalfmamba"}
    assert all(0.0 <= float(c["delong_p"]) <= 1.0 for c in comps)
    info = json.loads((out / "run_info.json").read_text())
    assert info["cohort"]["n_patients"] == 8 and info["cohort"]["n_excluded"] == 10
    assert info["folds_run"] == 1 and info["seeds"] == [0]
    report = (out / "report.md").read_text()
    assert "Excluded: 10 patients" in report and "WITHOUT trained weights" in report
    assert ("does not beat the single-sequence arms" in report) or ("beats" in report)
    # patient-level: every test patient appears once per arm; the folds are shared by all arms
    preds = _rows(out / "predictions.csv")
    per_arm = {a: sorted(r["unit"] for r in preds if r["task"] == "patient" and r["arm"] == a) for a in arms}
    assert all(v == per_arm["flair"] for v in per_arm.values()) and len(per_arm["flair"]) == 4
    folds = _rows(out / "folds.csv")
    test_patients = sorted(r["patient"] for r in folds if r["fold"] == "0")
    assert test_patients == per_arm["flair"]


def test_study_reproducible(shared_data, tmp_path):
    """Same seed -> same folds and the same numbers on CPU (two independent runs)."""
    from monai.networks.nets import ResNet
    from functools import partial

    from scripts.baselines import MeanFusion

    cohort = load_cohort(shared_data / "lgg_tcga", max_patients=8, max_slices_per_patient=3)
    clf = partial(ResNet, block="basic", layers=[1, 1, 1, 1], block_inplanes=[4, 8, 8, 8], spatial_dims=2, conv1_t_stride=2, num_classes=1)

    def once(name):
        arms = [ChannelArm("flair", [0]), FusionArm("mean", MeanFusion())]
        study = ClassificationStudy(
            cohort, arms, clf, fused_arm="mean", n_folds=2, seeds=[3], folds_to_run=1, image_size=32, epochs=1,
            batch_size=8, n_boot=50, output_dir=tmp_path / name, device="cpu",
        )
        return study.run()

    a, b = once("a"), once("b")
    assert a["predictions"] == b["predictions"]
    assert a["results"] == b["results"]
    assert (tmp_path / "a" / "folds.csv").read_text() == (tmp_path / "b" / "folds.csv").read_text()
    with pytest.raises(FileExistsError):
        once("a")  # never silently overwrites an earlier run


def test_train_and_evaluate_configs_tiny(shared_data, tmp_path):
    from monai.bundle import ConfigWorkflow

    ov = tiny_overrides(shared_data, tmp_path, "train")
    ov.update({"arm": "flair+t1c", "task": "patient", "fold": 0, "ckpt_dir": str(tmp_path / "models")})
    files = [str(CONFIGS / "study.json"), str(CONFIGS / "train.json")]
    wf = ConfigWorkflow(config_file=files, meta_file=str(BUNDLE / "metadata.json"), workflow_type="train", **ov)
    wf.initialize()
    assert not wf.check_properties()
    wf.run()
    wf.finalize()
    ckpt = tmp_path / "models" / "model.pt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["conv1.weight"].shape[1] == 2  # two input channels for the two-channel arm

    ov["output_dir"] = str(tmp_path / "evaluate")
    _run(["study.json", "train.json", "evaluate.json"], ov)
    summary = json.loads((tmp_path / "evaluate" / "summary.json").read_text())
    assert summary["task"] == "patient" and summary["n_patients"] == 4
    assert (tmp_path / "evaluate" / "metrics.csv").is_file()
    assert len(_rows(tmp_path / "evaluate" / "predictions.csv")) == summary["n_slices"]


def test_metadata_valid_and_classifier_io():
    schema = ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"
    if not schema.is_file():
        pytest.skip(f"schema not found at {schema}")
    from monai.bundle import ConfigParser, verify_metadata

    verify_metadata(meta_file=str(BUNDLE / "metadata.json"), filepath=str(schema))
    assert (CONFIGS / "metadata.json").read_bytes() == (BUNDLE / "metadata.json").read_bytes()
    assert not (CONFIGS / "metadata.json").is_symlink()
    meta = json.loads((BUNDLE / "metadata.json").read_text())
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "study.json"))
    net = parser.get_parsed_content("classifier_def")(n_input_channels=meta["network_data_format"]["inputs"]["image"]["num_channels"])
    x = torch.rand(2, 1, *meta["network_data_format"]["inputs"]["image"]["spatial_shape"])
    assert net.eval()(x).shape == (2, meta["network_data_format"]["outputs"]["pred"]["num_channels"])
