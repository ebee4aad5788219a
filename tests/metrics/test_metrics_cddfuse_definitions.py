"""The ``cddfuse`` profile against plain transcriptions of the CDDFuse evaluator's definitions.

Each definition below is written from the description in the project's reference notes (8-bit
images on the 0-255 scale, the fused image min-max stretched and rounded as by a PNG round trip),
independently of ``scripts.metrics``; on real Harvard pairs fused by max and by mean, the profile
must agree to 3 significant digits (SSIM: skimage's 7x7 uniform window at data_range 255).
"""

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.signal import convolve2d
from skimage.metrics import structural_similarity
from sklearn.metrics import mutual_info_score

from scripts.baselines import MaxFusion, MeanFusion
from scripts.metrics import compute_metrics


def _pair(root, task):
    with open(root / "harvard" / "pairs.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["task"] == task and r["split"] == "test"]
    row = sorted(rows, key=lambda r: int(r["pair_id"]))[1]
    mri = np.asarray(Image.open(root / "harvard" / row["mri"]).convert("L"), dtype=np.float64) / 255
    other = Image.open(root / "harvard" / row["other"])
    if other.mode == "RGB":
        other = other.convert("YCbCr").getchannel(0)
    return mri, np.asarray(other.convert("L"), dtype=np.float64) / 255


def _en(f):
    p = np.bincount(f.astype(np.uint8).ravel(), minlength=256) / f.size
    p = p[p > 0]
    return -(p * np.log2(p)).sum()


def _sf(f):
    return math.sqrt(np.mean(np.diff(f, axis=1) ** 2) + np.mean(np.diff(f, axis=0) ** 2))


def _corr(x, y):
    return np.corrcoef(x.ravel(), y.ravel())[0, 1]


def _qabf(a, b, f):
    h1 = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], float)
    h3 = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float)

    def sobel(x):
        gx, gy = convolve2d(x, h3, mode="same"), convolve2d(x, h1, mode="same")
        with np.errstate(divide="ignore", invalid="ignore"):
            angle = np.where(gx == 0, math.pi / 2, np.arctan(gy / gx))
        return np.sqrt(gx**2 + gy**2), angle

    def q(gs, a_s, gf, a_f):
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.where(gs > gf, gf / gs, np.where(gs == gf, gf, gf * 0 + gs / gf))
        d_alpha = 1 - np.abs(a_s - a_f) / (math.pi / 2)
        qg = 0.9994 / (1 + np.exp(-15 * (g - 0.5)))
        qa = 0.9879 / (1 + np.exp(-22 * (d_alpha - 0.8)))
        return qg * qa

    (ga, aa), (gb, ab), (gf, af) = sobel(a), sobel(b), sobel(f)
    return ((q(ga, aa, gf, af) * ga).sum() + (q(gb, ab, gf, af) * gb).sum()) / (ga + gb).sum()


def cddfuse_transcription(fused, a, b):
    """CDDFuse evaluator definitions on a fused image in [0, 1] and sources in [0, 1]."""
    f = np.round((fused - fused.min()) / (fused.max() - fused.min()) * 255)
    a, b = np.round(a * 255), np.round(b * 255)
    return {
        "EN": _en(f),
        "SD": f.std(),
        "SF": _sf(f),
        "MI": mutual_info_score(f.ravel().astype(int), a.ravel().astype(int))
        + mutual_info_score(f.ravel().astype(int), b.ravel().astype(int)),
        "SCD": _corr(a, f - b) + _corr(b, f - a),
        "Qabf": _qabf(a, b, f),
        "SSIM": structural_similarity(f, a, data_range=255) + structural_similarity(f, b, data_range=255),
    }


@pytest.mark.parametrize("task", ["CT-MRI", "SPECT-MRI"])
@pytest.mark.parametrize("rule", [MaxFusion(), MeanFusion()], ids=["max", "mean"])
def test_cddfuse_profile_agrees_with_the_evaluator_definitions(shared_data, task, rule):
    a, b = _pair(shared_data, task)
    fused = rule(torch.tensor(np.stack([a, b]), dtype=torch.float32)[None])[0, 0].double().numpy()
    expected = cddfuse_transcription(fused, a, b)
    got = compute_metrics(fused, a, b, profile="cddfuse", metrics=list(expected))
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=5e-4), name
