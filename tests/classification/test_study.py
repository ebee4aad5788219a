"""The companion bundle: copied out of the repository and run with only the fusion bundle's path, reproducibility,
external validation on a split of the shared cohort, metadata."""

import csv
import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from monai.networks.nets import ResNet
from tumor_classification_scripts import (
    ChannelArm,
    ClassificationStudy,
    CNNClassifier,
    FusionArm,
    MeanFusion,
    RadiomicsClassifier,
    load_cohort,
)

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundle" / "tumor_classification"
CONFIGS = BUNDLE / "configs"
ARMS = ["flair", "t1c", "flair+t1c", "clinicalfmamba", "mean", "max"]
# the smallest MONAI ResNet the studies in these tests train
TINY_RESNET = partial(
    ResNet, block="basic", layers=[1, 1, 1, 1], block_inplanes=[4, 8, 8, 8], spatial_dims=2, conv1_t_stride=2,
    num_classes=1,
)  # fmt: skip


def tiny_args(shared_data: Path, out: Path) -> dict:
    """1 fold of a 2-fold split, 8 patients x 4 slices, 32x32 (CNN inputs too), 1 epoch, tiny CNN, 2-fold inner CV, tiny
    grids."""
    return {
        "dataset_dir": str(shared_data / "lgg_tcga"),
        "fusion_bundle_dir": str(ROOT),
        "output_dir": str(out / "study"),
        "cache_dir": str(out / "cache"),
        "max_patients": 8,
        "max_slices_per_patient": 4,
        "n_folds": 2,
        "folds_to_run": 1,
        "seeds": [0],
        "epochs": 1,
        "batch_size": 8,
        "image_size": 32,
        "n_boot": 50,
        "inner_folds": 2,
        "c_grid": [0.1, 1.0],
        "k_grid": [5],
        "wholeslice_inner_folds": 2,
        "wholeslice_c_grid": [1.0],
        "wholeslice_k_grid": [5],
        "cnn_input_size": 32,
        "classifier_def#block_inplanes": [4, 8, 8, 8],
    }


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_bundle_copy(bundle_copy: Path, args: dict) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` in the copied bundle folder, as a user would (a fresh process)."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/study.json"]
    for k, v in args.items():
        cmd += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "2"}
    return subprocess.run(cmd, cwd=bundle_copy, env=env, capture_output=True, text=True, timeout=900)


def test_copied_bundle_runs_with_only_the_fusion_bundle_path(shared_data, tmp_path):
    copy = tmp_path / "tumor_classification"
    shutil.copytree(BUNDLE, copy, ignore=shutil.ignore_patterns("eval", "__pycache__", "results"))
    args = tiny_args(shared_data, tmp_path)
    proc = run_bundle_copy(copy, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(args["output_dir"])
    for name in (
        "report.md",
        "results.csv",
        "comparisons.csv",
        "fold_metrics.csv",
        "predictions.csv",
        "folds.csv",
        "roc_curves.png",
        "run_info.json",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = _rows(out / "results.csv")
    expected = [("radiomics", "patient", a) for a in ARMS] + [("radiomics_image", "patient", a) for a in ARMS]
    expected += [("wholeslice", "slice", a) for a in ARMS] + [("cnn", t, a) for t in ("patient", "slice") for a in ARMS]
    assert [(r["classifier"], r["task"], r["arm"]) for r in results] == expected
    for r in results:
        assert float(r["pooled_auc_ci_low"]) <= float(r["pooled_auc"]) <= float(r["pooled_auc_ci_high"])
    fused = [r for r in results if r["arm"] == "clinicalfmamba"]
    assert all(r["fusion_weights"] == "trained" for r in fused)  # the shipped weights, through the bundle API
    comps = _rows(out / "comparisons.csv")
    assert len(comps) == 5 * 5 and all(0.0 <= float(c["delong_p"]) <= 1.0 for c in comps)
    info = json.loads((out / "run_info.json").read_text())
    fusion = next(a for a in info["arms"] if a["arm"] == "clinicalfmamba")
    assert fusion["module"] == "ClinicalFMamba" and Path(fusion["ckpt_path"]) == ROOT / "models" / "model.pt"
    assert info["cohort"]["n_patients"] == 8 and info["cohort"]["n_excluded"] == 10
    report = (out / "report.md").read_text()
    assert "Excluded: 10 patients" in report and "Classifier `radiomics_image`" in report
    assert "32x32 crops around the tumour (patient task) and the head (slice task, never the mask)" in report
    # the same test patients in every classifier and arm: the shared folds
    preds = _rows(out / "predictions.csv")
    folds = _rows(out / "folds.csv")
    test_patients = sorted(r["patient"] for r in folds if r["fold"] == "0")
    for clf in ("radiomics", "radiomics_image", "cnn"):
        for arm in ARMS:
            got = sorted(
                r["unit"] for r in preds if r["classifier"] == clf and r["task"] == "patient" and r["arm"] == arm
            )
            assert got == test_patients, (clf, arm)
    # a second run refuses to overwrite; a missing fusion path is a clear error
    again = run_bundle_copy(copy, args)
    assert again.returncode != 0 and "already holds study results" in again.stderr
    no_fusion = {k: v for k, v in args.items() if k != "fusion_bundle_dir"}
    no_fusion["output_dir"] = str(tmp_path / "other")
    proc = run_bundle_copy(copy, no_fusion)
    assert proc.returncode != 0 and "--fusion_bundle_dir DIR" in proc.stderr + proc.stdout


def _split_cohort(shared: Path, dest: Path, patients: list[str]) -> Path:
    """An lgg_tcga-format folder holding only ``patients`` (tables filtered, image folders linked)."""
    dest.mkdir()
    (dest / "images").mkdir()
    for table in ("patients.csv", "slices.csv"):
        rows = _rows(shared / table)
        keep = [r for r in rows if r["patient"] in patients]
        with open(dest / table, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(keep)
        if table == "patients.csv":
            for r in keep:
                (dest / "images" / r["case"]).symlink_to(shared / "images" / r["case"], target_is_directory=True)
    return dest


def test_external_validation_on_a_split_of_the_shared_cohort(shared_data, tmp_path):
    lgg = shared_data / "lgg_tcga"
    full = load_cohort(lgg)
    pos = [p for p in full.patients if full.labels[p] == 1]
    neg = [p for p in full.patients if full.labels[p] == 0]
    dev_p, ext_p = pos[:5] + neg[:5], pos[5:8] + neg[5:8]
    dev = load_cohort(_split_cohort(lgg, tmp_path / "dev", dev_p), max_slices_per_patient=3)
    ext = load_cohort(_split_cohort(lgg, tmp_path / "ext", ext_p), max_slices_per_patient=3)
    assert dev.patients == sorted(dev_p) and ext.patients == sorted(ext_p)
    classifiers = [
        RadiomicsClassifier(with_shape=False, c_grid=[0.1, 1.0], k_grid=[5], inner_folds=2),
        CNNClassifier(TINY_RESNET, epochs=1, batch_size=8, device="cpu"),
    ]
    arms = [ChannelArm("flair", [0]), ChannelArm("t1c", [1]), FusionArm("mean", MeanFusion())]
    study = ClassificationStudy(
        dev, arms, classifiers, fused_arm="mean", n_folds=2, seeds=[0, 1], folds_to_run=1, image_size=32,
        n_boot=50, output_dir=tmp_path / "out", external_cohort=ext, progress=False,
    )  # fmt: skip
    res = study.run()
    out = tmp_path / "out"
    for name in (
        "external_results.csv",
        "external_comparisons.csv",
        "external_predictions.csv",
        "external_roc_curves.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert list(_rows(out / "external_results.csv")[0]) == list(_rows(out / "results.csv")[0])
    assert list(_rows(out / "external_comparisons.csv")[0]) == list(_rows(out / "comparisons.csv")[0])
    ext_rows = _rows(out / "external_results.csv")
    assert {(r["classifier"], r["task"]) for r in ext_rows} == {
        ("radiomics_image", "patient"),
        ("cnn", "patient"),
        ("cnn", "slice"),
    }
    # every external patient scored once per seed and arm, by a model trained on all development patients
    preds = _rows(out / "external_predictions.csv")
    for arm in ("flair", "t1c", "mean"):
        units = sorted(r["unit"] for r in preds if r["classifier"] == "radiomics_image" and r["arm"] == arm)
        assert units == sorted(ext_p * 2)
    fm = [r for r in res["external"]["fold_metrics"] if r["classifier"] == "cnn" and r["task"] == "patient"]
    assert {r["n_train_units"] for r in fm} == {10} and {r["fold"] for r in fm} == {-1}
    report = (out / "report.md").read_text()
    assert "## External validation" in report and "6 patients" in report


def test_study_reproducible(shared_data, tmp_path):
    """Same seed -> same folds and the same numbers on CPU (two independent runs)."""
    cohort = load_cohort(shared_data / "lgg_tcga", max_patients=8, max_slices_per_patient=3)

    def once(name):
        arms = [ChannelArm("flair", [0]), FusionArm("mean", MeanFusion())]
        classifiers = [
            CNNClassifier(TINY_RESNET, epochs=1, batch_size=8, device="cpu"),
            RadiomicsClassifier(c_grid=[0.1, 1.0], k_grid=[5], inner_folds=2),
        ]
        study = ClassificationStudy(
            cohort, arms, classifiers, fused_arm="mean", n_folds=2, seeds=[3], folds_to_run=1, image_size=32,
            n_boot=50, output_dir=tmp_path / name, progress=False,
        )  # fmt: skip
        return study.run()

    a, b = once("a"), once("b")
    assert a["predictions"] == b["predictions"]
    assert a["results"] == b["results"]
    assert (tmp_path / "a" / "folds.csv").read_text() == (tmp_path / "b" / "folds.csv").read_text()
    with pytest.raises(FileExistsError):
        once("a")  # never silently overwrites an earlier run


def test_metadata_valid_and_classifier_io():
    schema = ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"
    if not schema.is_file():
        pytest.skip(f"schema not found at {schema}")
    from monai.bundle import ConfigParser, verify_metadata

    verify_metadata(meta_file=str(BUNDLE / "metadata.json"), filepath=str(schema))
    assert json.loads((CONFIGS / "metadata.json").read_text()) == json.loads((BUNDLE / "metadata.json").read_text())
    meta = json.loads((BUNDLE / "metadata.json").read_text())
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "study.json"))
    net = parser.get_parsed_content("classifier_def")(
        n_input_channels=meta["network_data_format"]["inputs"]["image"]["num_channels"]
    )
    x = torch.rand(2, 1, *meta["network_data_format"]["inputs"]["image"]["spatial_shape"])
    assert net.eval()(x).shape == (2, meta["network_data_format"]["outputs"]["pred"]["num_channels"])
