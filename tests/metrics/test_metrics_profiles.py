"""Profiles, ``compute_metrics`` and the MONAI ``FusionMetric``: conventions, invariants, no NaN."""

import math

import numpy as np
import pytest
import torch

from scripts.metrics import (
    FusionMetric,
    FusionProfile,
    available_profiles,
    compute_metrics,
    entropy,
    get_profile,
    quantize_8bit,
    ssim,
    vif_p,
)

RNG = np.random.default_rng(3)
PROFILES = ("default", "cddfuse", "cddfuse_legacy", "clinicalfmamba")


def _pair(shape=(48, 48)):
    i, j = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    a = 0.5 + 0.3 * np.sin(i / 4) * np.cos(j / 7) + 0.05 * RNG.standard_normal(shape)
    b = 0.3 * ((i - 20) ** 2 + (j - 26) ** 2 < 150) + 0.4 * (j > 30) + 0.05 * RNG.standard_normal(shape)
    return np.clip(a, 0, 1), np.clip(b, 0, 1)


def test_registry():
    assert set(PROFILES) <= set(available_profiles())
    with pytest.raises(KeyError):
        get_profile("nope")
    prof = get_profile("cddfuse", ssim_data_range=2.0)
    assert prof.name == "cddfuse_legacy" and isinstance(prof, FusionProfile)
    assert get_profile(prof) is prof
    for name in PROFILES:
        desc = get_profile(name).describe()
        assert "scale" in desc and all(isinstance(v, str) and v for v in desc.values())


def test_default_metric_lists():
    assert get_profile("cddfuse").default_metrics == ("EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM")
    assert get_profile("clinicalfmamba").default_metrics == ("PSNR", "SSIM", "FMI", "FSIM", "EN")
    assert get_profile("clinicalfmamba").default_metrics_3d == ("PSNR", "MS-SSIM", "EN")


@pytest.mark.parametrize("profile", PROFILES)
def test_all_metrics_finite_and_symmetric(profile):
    a, b = _pair()
    f = np.maximum(a, b)
    names = tuple(get_profile(profile).metrics)
    ab = compute_metrics(f, a, b, profile=profile, metrics=names)
    ba = compute_metrics(f, b, a, profile=profile, metrics=names)
    assert list(ab) == list(names)
    for k in names:
        assert math.isfinite(ab[k]), k
        assert ab[k] == pytest.approx(ba[k], rel=1e-9, abs=1e-12), k


@pytest.mark.parametrize("profile", PROFILES)
def test_constant_images_never_nan(profile):
    a, b = _pair()
    c = np.full_like(a, 0.4)
    names = tuple(get_profile(profile).metrics)
    for f, s1, s2 in ((c, a, b), (c, c, c), (c, np.zeros_like(a), np.ones_like(a)), (a, c, c)):
        out = compute_metrics(f, s1, s2, profile=profile, metrics=names)
        for k, v in out.items():
            assert not math.isnan(v), (k, v)
            # only PSNR may be infinite, and only for an exact copy
            assert math.isfinite(v) or (k == "PSNR" and v == math.inf), (k, v)


def test_default_profile_fused_equal_source():
    a, b = _pair()
    out = compute_metrics(a, a, a, profile="default")
    qa = quantize_8bit(a)
    assert out["EN"] == pytest.approx(entropy(qa))
    assert out["MI"] == pytest.approx(2 * entropy(qa) * math.log(2))  # nats, summed
    assert out["NMI"] == pytest.approx(2.0)
    assert out["SSIM"] == pytest.approx(1.0, abs=1e-6)
    assert out["VIF"] == pytest.approx(2.0, abs=1e-6)  # summed over the two (identical) sources
    assert out["FMI"] == 1.0 and out["FMI_pixel"] == 1.0 and out["FSIM"] == pytest.approx(1.0)
    assert out["PSNR"] == math.inf
    # fused = one source: that source's SSIM term is 1, the mean is (1 + SSIM(A, B)) / 2
    got = compute_metrics(a, a, b, profile="default", metrics=["SSIM", "VIF"])
    qb = quantize_8bit(b)
    assert got["SSIM"] == pytest.approx((1 + ssim(qa, qb, 255.0)) / 2, abs=1e-6)
    assert got["VIF"] == pytest.approx(1 + vif_p(qb, qa), abs=1e-6)


def test_default_profile_quantises_and_accepts_uint8_and_torch():
    a, b = _pair()
    f = (a + b) / 2
    ref = compute_metrics(f, a, b, metrics=["EN", "SD", "MI", "SSIM"])
    u8 = [np.rint(x * 255).astype(np.uint8) for x in (f, a, b)]
    assert compute_metrics(*u8, metrics=["EN", "SD", "MI", "SSIM"]) == pytest.approx(ref)
    t = [torch.from_numpy(x).float()[None, None] for x in (f, a, b)]
    assert compute_metrics(*t, metrics=["EN", "SD", "MI", "SSIM"]) == pytest.approx(ref, rel=1e-5)
    # values outside [0, 1] are clipped for the default profile
    assert compute_metrics(f * 1.5, a, b, metrics=["SD"])["SD"] == pytest.approx(
        np.std(quantize_8bit(np.clip(f * 1.5, 0, 1)))
    )


def test_cddfuse_stretches_the_fused_image():
    a, b = _pair()
    f = 0.2 + 0.5 * np.maximum(a, b) / np.maximum(a, b).max()
    dull = compute_metrics(f, a, b, profile="cddfuse", metrics=["SD", "EN"])
    stretched = compute_metrics((f - f.min()) / (f.max() - f.min()), a, b, profile="cddfuse", metrics=["SD", "EN"])
    assert dull == pytest.approx(stretched, rel=1e-3)
    no_stretch = compute_metrics(f, a, b, profile="cddfuse", normalize_fused=False, metrics=["SD"])
    assert no_stretch["SD"] < dull["SD"]


def test_cddfuse_sums_and_legacy_ssim():
    a, b = _pair()
    f = (a + b) / 2
    out = compute_metrics(f, a, b, profile="cddfuse", metrics=["SSIM"])
    legacy = compute_metrics(f, a, b, profile="cddfuse_legacy", metrics=["SSIM"])
    assert 0.0 < out["SSIM"] <= 2.0 and legacy["SSIM"] != pytest.approx(out["SSIM"])


def test_clinicalfmamba_en_counts_unique_float_values():
    a, b = _pair()
    f = np.clip((a + b) / 2 + 1e-4 * RNG.standard_normal(a.shape), 0, 1)  # ~all values distinct
    en_cf = compute_metrics(f, a, b, profile="clinicalfmamba", metrics=["EN"])["EN"]
    en_default = compute_metrics(f, a, b, profile="default", metrics=["EN"])["EN"]
    assert en_cf == pytest.approx(math.log2(f.size), abs=0.05) and en_default < 8.0 < en_cf


def test_3d_volumes():
    vol_a = np.clip(RNG.random((24, 24, 24)) * 0.5 + 0.25, 0, 1)
    vol_b = np.clip(vol_a**2 + 0.1 * RNG.random((24, 24, 24)), 0, 1)
    out = compute_metrics((vol_a + vol_b) / 2, vol_a, vol_b, profile="clinicalfmamba")
    assert list(out) == ["PSNR", "MS-SSIM", "EN"] and all(math.isfinite(v) for v in out.values())
    out = compute_metrics((vol_a + vol_b) / 2, vol_a, vol_b, profile="default")
    assert "VIF" not in out and all(math.isfinite(v) for v in out.values())
    with pytest.raises(ValueError):
        compute_metrics(vol_a, vol_a, vol_b, profile="default", metrics=["VIF"])


def test_bad_inputs():
    a, b = _pair()
    with pytest.raises(ValueError):
        compute_metrics(a[:40], a, b)
    with pytest.raises(KeyError):
        compute_metrics(a, a, b, metrics=["NOPE"])


# ---------------------------------------------------------------- FusionMetric


def _batch(n=2):
    pairs = [_pair() for _ in range(n)]
    y = torch.tensor(np.stack([np.stack(p) for p in pairs]), dtype=torch.float32)  # (B, 2, H, W)
    y_pred = y.amax(dim=1, keepdim=True)
    return y_pred, y


def test_fusion_metric_matches_compute_metrics():
    y_pred, y = _batch(2)
    metric = FusionMetric(profile="clinicalfmamba", metrics=["PSNR", "SSIM"])
    step = metric(y_pred=y_pred, y=y)
    assert step.shape == (2, 2)
    metric(y_pred=list(y_pred), y=list(y))  # decollated channel-first lists
    agg = metric.aggregate()
    assert agg.shape == (2,)
    expected = [compute_metrics(y_pred[i, 0], y[i, 0], y[i, 1], profile="clinicalfmamba") for i in range(2)]
    for j, name in enumerate(["PSNR", "SSIM"]):
        assert agg[j].item() == pytest.approx(np.mean([e[name] for e in expected]), rel=1e-6)
    assert metric.aggregate_dict() == pytest.approx({"PSNR": agg[0].item(), "SSIM": agg[1].item()})
    assert metric.aggregate(reduction="none").shape == (4, 2)
    metric.reset()
    single = FusionMetric(profile="default", metrics="SSIM")
    single(y_pred=y_pred, y=y)
    assert single.aggregate().ndim == 0


def test_fusion_metric_shape_checks():
    y_pred, y = _batch(1)
    metric = FusionMetric(metrics=["SD"])
    with pytest.raises(ValueError):
        metric(y_pred=y, y=y)
    with pytest.raises(ValueError):
        metric(y_pred=y_pred, y=None)
    with pytest.raises(ValueError):
        FusionMetric(reduction="median")


def test_fusion_metric_as_ignite_key_metric():
    pytest.importorskip("ignite")
    from ignite.engine import Engine
    from monai.handlers import IgniteMetricHandler, from_engine

    y_pred, y = _batch(2)

    def step(engine, batch):
        return {"pred": batch[0], "label": batch[1]}

    engine = Engine(step)
    handler = IgniteMetricHandler(
        metric_fn=FusionMetric(profile="default", metrics=["SSIM"]), output_transform=from_engine(["pred", "label"])
    )
    handler.attach(engine, name="fusion_ssim")
    engine.run([(y_pred, y)], max_epochs=1)
    assert isinstance(engine.state.metrics["fusion_ssim"], float)
    assert 0.0 < engine.state.metrics["fusion_ssim"] < 1.0
