"""Real Harvard pairs: magnitudes against the measured baselines, and pinned independent oracles.

Oracles pinned below were measured once in a throw-away environment with independent
implementations (torchmetrics 1.9 ``visual_information_fidelity`` and
``structural_similarity_index_measure``; phasepack 1.5 + OpenCV 5.0 for the ClinicalFMamba FSIM
recipe) on pair CT-MRI 34002 (test split). Neither library is a dependency of this bundle.
"""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import mutual_info_score

from scripts.baselines import LaplacianPyramidFusion, MaxFusion, MeanFusion
from scripts.metrics import (
    QABF_MAX,
    FusionMetric,
    compute_metrics,
    entropy,
    fsim_clinicalfmamba,
    ssim,
    vif_p,
)


def _test_pair(root: Path, task: str):
    with open(root / "harvard" / "pairs.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["task"] == task and r["split"] == "test"]
    row = sorted(rows, key=lambda r: int(r["pair_id"]))[0]
    mri = np.asarray(Image.open(root / "harvard" / row["mri"]).convert("L"), dtype=np.float64) / 255
    other = Image.open(root / "harvard" / row["other"])
    if other.mode == "RGB":  # PET / SPECT pseudo-colour: score the BT.601 Y channel (PIL's YCbCr)
        other = other.convert("YCbCr").getchannel(0)
    return row, mri, np.asarray(other.convert("L"), dtype=np.float64) / 255


def _fuse(module, a, b):
    image = torch.tensor(np.stack([a, b]), dtype=torch.float32)[None]
    return module(image)[0, 0].double().numpy()


@pytest.mark.parametrize("task", ["CT-MRI", "PET-MRI"])
def test_cddfuse_profile_on_real_pair(shared_data, task):
    _, a, b = _test_pair(shared_data, task)
    mean = compute_metrics(_fuse(MeanFusion(), a, b), a, b, profile="cddfuse")
    mx = compute_metrics(_fuse(MaxFusion(), a, b), a, b, profile="cddfuse")
    for out in (mean, mx):
        assert 0.0 < out["EN"] <= 8.0
        assert 1.0 < out["SSIM"] < 2.0  # summed over the two sources
        assert 0.0 < out["VIF"] < 2.0 and 0.0 < out["Qabf"] < QABF_MAX
        assert 0.0 < out["MI"] < 2 * 8 * math.log(2)
    # the max rule keeps more contrast and more of each source's intensities than the mean rule
    assert mx["SD"] > mean["SD"]
    assert mx["MI"] > mean["MI"]
    assert mx["Qabf"] > mean["Qabf"]
    if task == "CT-MRI":
        # same order of magnitude as the measured mean-fusion row (another pair): SSIM 1.44, VIF 0.45, MI 2.67
        assert 1.1 < mean["SSIM"] < 1.7 and 0.25 < mean["VIF"] < 0.7 and 1.5 < mean["MI"] < 4.0


def test_pitfalls_on_real_pair(shared_data):
    _, a, b = _test_pair(shared_data, "CT-MRI")
    f = _fuse(MeanFusion(), a, b)
    new = compute_metrics(f, a, b, profile="cddfuse", metrics=["SSIM", "MI"])
    legacy = compute_metrics(f, a, b, profile="cddfuse_legacy", metrics=["SSIM"])
    assert legacy["SSIM"] < new["SSIM"]  # data_range 2 (old skimage float default) lowers the sum
    # label MI on a float image where every value is its own label degenerates to H(source)
    a_labels = np.rint(a * 255).astype(int).ravel()
    f_float = (f + 1e-9 * np.arange(a.size).reshape(a.shape)).ravel()
    with pytest.warns(UserWarning):  # sklearn itself warns about continuous labels
        float_mi = mutual_info_score(f_float, a_labels)
    quantised_mi = mutual_info_score(np.rint(f * 255).astype(int).ravel(), a_labels)
    assert float_mi == pytest.approx(entropy(a_labels.astype(float), base=math.e))
    assert float_mi > quantised_mi
    # EN over unique float values (ClinicalFMamba code) rewards float outputs: a network-like output
    # (float, background not exactly 0) reaches ~log2(65536) = 16 bits, the paper's ~15 range
    lp = _fuse(LaplacianPyramidFusion(), a, b)
    en_cf = compute_metrics(lp, a, b, profile="clinicalfmamba", metrics=["EN"])["EN"]
    en_default = compute_metrics(lp, a, b, profile="default", metrics=["EN"])["EN"]
    assert en_default <= 8.0 and en_cf > en_default
    net_like = np.clip(lp + 1e-3 * np.random.default_rng(0).random(lp.shape), 0, 1)
    assert compute_metrics(net_like, a, b, profile="clinicalfmamba", metrics=["EN"])["EN"] > 15.0


def test_pinned_independent_oracles(shared_data):
    row, a, b = _test_pair(shared_data, "CT-MRI")
    assert row["pair_id"] == "34002"
    a8, b8 = np.rint(a * 255), np.rint(b * 255)
    f255 = (a8 + b8) / 2
    # torchmetrics VIF-P, preds = fused, target = source, 0-255 floats
    assert vif_p(a8, f255) == pytest.approx(0.12726720241219092, abs=1e-9)
    assert vif_p(b8, f255) == pytest.approx(0.2825205662896376, abs=1e-9)
    f = (a + b) / 2
    # torchmetrics SSIM(data_range=1.0): reflect padding, full map averaged
    assert ssim(f, a, 1.0, padding="reflect") == pytest.approx(0.6321955078559018, abs=2e-6)
    assert ssim(f, b, 1.0, padding="reflect") == pytest.approx(0.728998459100638, abs=2e-6)
    # phasepack phasecong + cv2.Scharr(CV_16U) FSIM recipe (OpenCV rounds a few exact .5 ties differently)
    assert fsim_clinicalfmamba(f, a) == pytest.approx(0.7102166101948458, abs=1e-5)
    assert fsim_clinicalfmamba(f, b) == pytest.approx(0.881549346634488, abs=1e-5)


def test_fusion_metric_on_real_batch(shared_data):
    _, a, b = _test_pair(shared_data, "CT-MRI")
    image = torch.tensor(np.stack([a, b]), dtype=torch.float32)[None]
    fused = torch.cat([MeanFusion()(image), MaxFusion()(image), LaplacianPyramidFusion()(image)])
    metric = FusionMetric(profile="clinicalfmamba", metrics=["PSNR", "SSIM", "EN"])
    values = metric(y_pred=fused, y=image.expand(3, -1, -1, -1))
    assert values.shape == (3, 3) and torch.isfinite(values).all()
    expected = compute_metrics(fused[2], a, b, profile="clinicalfmamba", metrics=["PSNR", "SSIM", "EN"])
    assert values[2].tolist() == pytest.approx(list(expected.values()), rel=1e-6)
    # paper-range magnitudes: PSNR ~14-22 dB, SSIM (mean over sources) ~0.6-0.8 for classic rules
    assert (values[:, 0] > 10).all() and (values[:, 0] < 30).all()
    assert (values[:, 1] > 0.5).all() and (values[:, 1] < 0.9).all()
