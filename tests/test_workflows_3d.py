"""3D train and evaluate configs on small synthetic NIfTI volumes in BraTS case-folder layout."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.evaluate import compare
from scripts.metrics import compute_metrics
from scripts.networks import ClinicalFMamba

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = BUNDLE_ROOT / "configs"
TINY_3D = {
    "_target_": "scripts.networks.ClinicalFMamba",
    "spatial_dims": 3,
    "channel_exchange": False,
    "pyramid": False,
    "decoder_depth": 0,
    "features": [4, 8, 8],
    "depth": 1,
    "d_state": 4,
}
SHAPE = (30, 26, 20)


def _write_cases(root: Path, names: list[str], seed: int) -> None:
    """Volumes with a bright 'head' block on a constant background, like z-scored brain MRI."""
    rng = np.random.default_rng(seed)
    affine = np.array([[-1.0, 0, 0, 90], [0, -1.0, 0, 126], [0, 0, 1.5, -72], [0, 0, 0, 1]])
    for name in names:
        case = root / name
        case.mkdir(parents=True)
        for modality in ("Flair", "T1c"):
            vol = np.full(SHAPE, -2.0, np.float32)
            vol[4:-4, 3:-3, 2:-2] = rng.standard_normal((SHAPE[0] - 8, SHAPE[1] - 6, SHAPE[2] - 4))
            nib.save(nib.Nifti1Image(vol, affine), case / f"{modality}_subtrMeanDivStd.nii.gz")


def _normalised(case: Path) -> tuple[np.ndarray, np.ndarray]:
    """FLAIR and T1c of a case as the 3D configs scale them: minimum -> 0, 99.9th percentile -> 1, clipped."""
    out = []
    for modality in ("Flair", "T1c"):
        x = nib.load(case / f"{modality}_subtrMeanDivStd.nii.gz").get_fdata()
        low, high = np.percentile(x, 0.0), np.percentile(x, 99.9)
        out.append(np.clip((x - low) / (high - low), 0.0, 1.0))
    return out[0], out[1]


def _dataset(tmp_path: Path) -> Path:
    root = tmp_path / "brats"
    _write_cases(root / "train", ["case_a", "case_b"], seed=1)
    _write_cases(root / "validation", ["case_c"], seed=2)
    _write_cases(root / "test", ["case_d", "case_e"], seed=3)
    return root


def test_3d_training_config_trains_validates_and_saves(tmp_path):
    data = _dataset(tmp_path)
    out = tmp_path / "run"
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "train_3d.json")],
        meta_file=str(BUNDLE_ROOT / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="train",
        bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(data),
        output_dir=str(out),
        network_def=TINY_3D,
        patch_size=[16, 16, 16],
        roi_size=[16, 16, 16],
        num_samples=2,
        val_interval=2,
        **{"train#trainer#max_epochs": 2},
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    with open(out / "training_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # 2 volumes x 2 patches per epoch, batch 1 volume -> 2 iterations per epoch
    assert rows[-1]["iterations"] == "4"
    assert all(np.isfinite(float(r["train_loss"])) for r in rows)
    ssim = float(rows[-1]["val_ssim"])  # 3D SSIM(F, A) + SSIM(F, B) of the validation volume
    # recomputed outside the evaluator: the validation volume as the config prepares it, the final (epoch 2)
    # network through MONAI's sliding window, the cddfuse SSIM summed over the two sources
    from monai.inferers import sliding_window_inference

    image = wf.parser.get_parsed_content("validate#dataset")[0]["image"][None]
    network = wf.parser.get_parsed_content("network").eval()
    with torch.no_grad():
        fused = sliding_window_inference(image, [16, 16, 16], 1, network, overlap=0.25, mode="gaussian")
    expected = compute_metrics(fused[0, 0], image[0, 0], image[0, 1], profile="cddfuse", metrics=["SSIM"])["SSIM"]
    assert ssim == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert 0.0 < ssim <= 2.0
    assert (out / "model.pt").is_file() and (out / "resume.pt").is_file()
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    net = ClinicalFMamba(**{k: v for k, v in TINY_3D.items() if k != "_target_"})
    net.load_state_dict(state, strict=True)  # the best-model file is the network's state dict


def test_3d_evaluate_config_scores_baselines_on_volumes(tmp_path):
    """``python -m scripts.evaluate --spatial_dims 3``: the 3D config stack per method, then comparison tables."""
    data = _dataset(tmp_path)
    out = tmp_path / "eval"
    written = compare(
        methods=["mean", "max"],
        profile=["cddfuse", "clinicalfmamba"],
        output_dir=out,
        bundle_root=BUNDLE_ROOT,
        spatial_dims=3,
        dataset_dir=str(data / "test"),
        roi_size=[16, 16, 16],
    )
    for method in ("mean", "max"):
        with open(out / method / "metrics_cddfuse.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert sorted(r["id"] for r in rows) == ["case_d", "case_e"]
        assert {r["task"] for r in rows} == {"T1c-Flair"}
        for r in rows:
            # the scores of the rule applied by hand to the volumes as the 3D config normalises them
            a, b = _normalised(data / "test" / r["id"])
            fused = (a + b) / 2 if method == "mean" else np.maximum(a, b)
            expected = compute_metrics(fused, a, b, profile="cddfuse", metrics=["SSIM", "EN"])
            assert float(r["SSIM"]) == pytest.approx(expected["SSIM"], rel=1e-4, abs=1e-4)
            assert float(r["EN"]) == pytest.approx(expected["EN"], rel=1e-4, abs=1e-4)
        assert (out / method / "figure.png").is_file()
    with open(written["comparison_clinicalfmamba_csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["task"], r["method"]) for r in table] == [("T1c-Flair", "mean"), ("T1c-Flair", "max")]
    assert {"PSNR_mean", "MS-SSIM_mean", "EN_mean"} <= set(table[0])
    # the mean of two sources is closer to both than their maximum (PSNR averaged over the two sources)
    assert float(table[0]["PSNR_mean"]) > float(table[1]["PSNR_mean"])
    assert "scored volumes" in written["comparison_cddfuse_md"].read_text()


def test_3d_network_definitions_agree_across_configs():
    """inference_3d, evaluate_3d and train_3d must build the same network, or shipped 3D weights would not load."""

    def network(files: list[str], key: str) -> dict:
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in files])
        cfg = json.loads(json.dumps(parser.get(key)))
        return {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_target_"}

    infer = network(["inference.json", "inference_3d.json"], "network_def")
    train = network(["train.json", "train_3d.json"], "network_def")
    evaluate = network(
        ["inference.json", "inference_3d.json", "evaluate.json", "evaluate_3d.json"], "clinicalfmamba_def"
    )
    assert infer == train == evaluate
    assert infer["spatial_dims"] == 3
