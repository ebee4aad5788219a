"""Property-based tests (hypothesis, profile ``reliability``): padding round trips, colour round trips, metric
invariants."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from monai.transforms import Compose, ConcatItemsd, DivisiblePadd, Invertd, ScaleIntensityd
from reliability_helpers import RELIABILITY, examples

from scripts.metrics import compute_metrics, get_profile
from scripts.transforms import AttachChromad, SplitLumaChromad, rgb_to_ycbcr, ycbcr_to_rgb

KEYS = ["mri", "other"]
SEEDS = st.integers(0, 2**32 - 1)


# --- padding to the network's multiple, cropped back after fusion ---------------------------------------------


@settings(RELIABILITY, max_examples=examples(25))
@given(data=st.data(), spatial_dims=st.sampled_from([2, 3]), k=st.sampled_from([2, 4, 8, 16]), seed=SEEDS)
def test_pad_then_invert_restores_every_size(data, spatial_dims: int, k: int, seed: int) -> None:
    size = data.draw(
        st.lists(st.integers(1, 21 if spatial_dims == 2 else 9), min_size=spatial_dims, max_size=spatial_dims)
    )
    g = torch.Generator().manual_seed(seed)
    mri = MetaTensor(torch.rand(1, *size, generator=g), meta={"filename_or_obj": "mri.nii.gz"})
    other = MetaTensor(torch.rand(1, *size, generator=g), meta={"filename_or_obj": "other.nii.gz"})
    pre = Compose([ConcatItemsd(keys=KEYS, name="image", dim=0), DivisiblePadd(keys="image", k=k)])
    d = pre({"mri": mri, "other": other})
    padded = d["image"].shape[1:]
    assert all(p % k == 0 and 0 <= p - s < k for p, s in zip(padded, size))
    # the "fused" image is the padded reference channel: cropping back must give the reference exactly
    d["pred"] = d["image"][0:1].clone()
    out = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(d)
    assert tuple(out["pred"].shape) == (1, *size)
    assert torch.equal(out["pred"].as_tensor(), mri.as_tensor())


# --- colour: SplitLumaChromad then AttachChromad ------------------------------------------------------------------


def _colour(seed: int, h: int, w: int, alpha: bool) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (3, h, w)).astype(np.float32)
    rgb[:, 0, 0] = (255.0, 0.0, 0.0)  # at least one pixel is really coloured
    if alpha:
        rgb = np.concatenate([rgb, np.full((1, h, w), 255.0, np.float32)])
    return torch.from_numpy(rgb)


@settings(RELIABILITY, max_examples=examples(25))
@given(
    seed=SEEDS,
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    alpha=st.booleans(),
    y_range=st.sampled_from(["source", "full"]),
)
def test_split_then_attach_restores_the_colour_image(seed: int, h: int, w: int, alpha: bool, y_range: str) -> None:
    colour = _colour(seed, h, w, alpha)
    d = SplitLumaChromad(keys="other")({"other": MetaTensor(colour, meta={"filename_or_obj": "pet.png"})})
    y, ycbcr = d["other"].as_tensor(), d["other_ycbcr"].as_tensor()
    assert y.shape == (1, h, w) and ycbcr.shape == (3, h, w) and torch.equal(ycbcr[0:1], y)
    # identity "fusion": the fused Y is the source's own Y, on [0, 1] as the network returns it
    if y_range == "source":
        span = float(y.max() - y.min())
        pred = (y - y.min()) / span if span > 0 else torch.zeros_like(y)
    else:
        pred = y / 255.0
    rgb = AttachChromad(y_range=y_range)({"pred": pred, "other_ycbcr": ycbcr})["pred_rgb"]
    assert rgb.shape == (3, h, w)
    assert (rgb - colour[:3]).abs().max() <= 1e-3


@settings(RELIABILITY, max_examples=examples(15))
@given(seed=SEEDS, h=st.integers(1, 12), w=st.integers(1, 12), channels=st.sampled_from([3, 4]))
def test_grey_stored_as_rgb_becomes_one_grey_channel(seed: int, h: int, w: int, channels: int) -> None:
    grey = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (1, h, w)).astype(np.float32))
    img = MetaTensor(grey.repeat(channels, 1, 1), meta={"filename_or_obj": "grey.png"})
    d = SplitLumaChromad(keys="mri")({"mri": img})
    assert "mri_ycbcr" not in d and torch.equal(d["mri"].as_tensor(), grey)


@settings(RELIABILITY, max_examples=examples(25))
@given(seed=SEEDS, h=st.integers(1, 9), w=st.integers(1, 9))
def test_ycbcr_conversion_is_invertible(seed: int, h: int, w: int) -> None:
    rgb = _colour(seed, h, w, False)
    assert (ycbcr_to_rgb(rgb_to_ycbcr(rgb)) - rgb).abs().max() <= 1e-3


# --- normalisation and metrics --------------------------------------------------------------------------------------

KINDS = ["noise", "smooth", "edges", "constant", "zeros", "ones", "two_levels"]


def _image(kind: str, seed: int, shape=(48, 48)) -> np.ndarray:
    """A test image on [0, 1] of one of :data:`KINDS` (constant kinds included)."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.random(shape)
    if kind == "smooth":
        yy, xx = np.mgrid[: shape[0], : shape[1]] / max(shape)
        return 0.5 + 0.5 * np.sin(rng.uniform(2, 9) * xx + rng.uniform(2, 9) * yy)
    if kind == "edges":
        return (rng.random(shape) > 0.7).astype(float) * rng.uniform(0.2, 1.0)
    if kind == "constant":
        return np.full(shape, rng.uniform(0.0, 1.0))
    if kind == "zeros":
        return np.zeros(shape)
    if kind == "ones":
        return np.ones(shape)
    out = np.zeros(shape)
    out[:, shape[1] // 2 :] = 1.0
    return out


IMAGES = st.tuples(st.sampled_from(KINDS), SEEDS)
# PSNR is infinite by definition when the fused image equals the sources (+inf) or, in the cddfuse profile whose
# peak is max(F), when F is all zeros (-inf); it is never NaN. Every other metric is finite on every image.
MAY_BE_INFINITE = {"PSNR"}


def _finite_or_inf(name: str, value: float) -> bool:
    return math.isfinite(value) or (name in MAY_BE_INFINITE and math.isinf(value))


def _same(x: float, y: float) -> bool:
    return x == y or math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("profile,n", [("cddfuse", 10), ("default", 5), ("clinicalfmamba", 3)])
def test_metrics_are_symmetric_in_the_sources_and_finite_on_constant_images(profile: str, n: int) -> None:
    names = list(get_profile(profile).metrics)
    if profile == "default":
        names.remove("MS-SSIM")  # the slowest metric: covered by the clinicalfmamba profile's examples

    @settings(RELIABILITY, max_examples=examples(n))
    @given(f=IMAGES, a=IMAGES, b=IMAGES)
    def check(f, a, b) -> None:
        F, A, B = _image(*f), _image(*a), _image(*b)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no division by zero, no invalid values
            ab = compute_metrics(F, A, B, profile=profile, metrics=names)
            ba = compute_metrics(F, B, A, profile=profile, metrics=names)
        for name in names:
            assert _finite_or_inf(name, ab[name]), (name, ab[name], f, a, b)
            assert _same(ab[name], ba[name]), (name, ab[name], ba[name], f, a, b)

    check()


@settings(RELIABILITY, max_examples=examples(6))
@given(x=st.tuples(st.sampled_from(["noise", "smooth", "edges"]), SEEDS))
def test_metrics_of_identical_images(x) -> None:
    img = _image(*x)
    img = (img - img.min()) / (img.max() - img.min())  # spans [0, 1]: no profile rescales it
    d = compute_metrics(
        img, img, img, profile="default", metrics=["SSIM", "NMI", "FMI", "PSNR", "MI", "EN", "Qabf", "SCD"]
    )
    assert d["SSIM"] == pytest.approx(1.0) and d["NMI"] == pytest.approx(2.0) and d["FMI"] == pytest.approx(1.0)
    assert d["PSNR"] == math.inf and d["SCD"] == pytest.approx(0.0, abs=1e-12)
    assert d["MI"] == pytest.approx(2 * d["EN"] * math.log(2), rel=1e-9)  # MI in nats, summed; EN in bits
    assert 0.0 < d["Qabf"] <= 1.0
    c = compute_metrics(img, img, img, profile="cddfuse", metrics=["SSIM", "SD", "EN"])
    assert c["SSIM"] == pytest.approx(2.0)  # summed over the two sources
    assert c["SD"] == pytest.approx(_sd_8bit(img), rel=1e-6)


def _sd_8bit(img: np.ndarray) -> float:
    """Population std on the 8-bit scale (the cddfuse stretch of an image spanning [0, 1] is the identity)."""
    return float(np.std(np.rint(img * 255)))


@settings(RELIABILITY, max_examples=examples(15))
@given(x=IMAGES)
def test_normalisation_is_finite_and_in_range_for_every_image(x) -> None:
    img = torch.from_numpy(_image(*x) * 300.0 - 20.0)[None].float()
    out = ScaleIntensityd(keys="mri", minv=0.0, maxv=1.0)({"mri": img})["mri"]
    assert torch.isfinite(out).all() and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    if float(img.max()) == float(img.min()):
        assert torch.count_nonzero(out) == 0  # a constant image becomes zeros, not NaN
