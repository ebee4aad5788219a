"""VIF-P, Qabf, SSIM, MS-SSIM, PSNR: analytic values, invariants and library oracles."""

import math

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from scripts.metrics import (
    MS_SSIM_WEIGHTS,
    QABF_CONSTANTS,
    QABF_MAX,
    fit_ms_ssim_weights,
    matlab_gaussian_window,
    ms_ssim,
    psnr,
    qabf,
    ssim,
    ssim_skimage,
    vif_p,
)

RNG = np.random.default_rng(1)


def _smooth_image(shape=(64, 64), seed=0):
    """Textured 0-255 test image (sum of sinusoids + a disc)."""
    i, j = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    rng = np.random.default_rng(seed)
    img = 100 + 50 * np.sin(i / (3 + seed)) * np.cos(j / 5) + 40 * ((i - 30) ** 2 + (j - 25) ** 2 < 150)
    return np.rint(np.clip(img + 5 * rng.standard_normal(shape), 0, 255))


# ---------------------------------------------------------------- VIF


def test_matlab_gaussian_window():
    w = matlab_gaussian_window(17, 17 / 5)
    assert w.shape == (17, 17) and w.sum() == pytest.approx(1.0)
    assert w[8, 8] == w.max() and np.allclose(w, w.T)


def test_vif_identity_is_one_and_constant_reference_is_zero():
    ref = _smooth_image()
    assert vif_p(ref, ref) == pytest.approx(1.0, abs=1e-8)
    assert vif_p(np.full((64, 64), 50.0), ref) == 0.0
    assert 0.0 <= vif_p(ref, np.full((64, 64), 50.0)) < 1e-6  # no information left


def test_vif_degrades_with_noise_and_depends_on_scale():
    ref = _smooth_image()
    noisy = ref + 20 * RNG.standard_normal(ref.shape)
    assert 0.0 < vif_p(ref, noisy) < 1.0
    # sigma_nsq = 2 is absolute: the same images on 0-1 give a different value
    assert vif_p(ref / 255, noisy / 255) != pytest.approx(vif_p(ref, noisy), rel=1e-3)


def test_vif_too_small_raises():
    with pytest.raises(ValueError):
        vif_p(np.zeros((30, 30)), np.zeros((30, 30)))


# ---------------------------------------------------------------- Qabf


def _qg(g):
    tg, kg, dg, *_ = QABF_CONSTANTS
    return tg / (1 + math.exp(kg * (g - dg)))


def _qa(a):
    *_, ta, ka, da = QABF_CONSTANTS
    return ta / (1 + math.exp(ka * (a - da)))


def test_qabf_max_constant():
    assert QABF_MAX == pytest.approx(_qg(1.0) * _qa(1.0))
    assert QABF_MAX == pytest.approx(0.97479, abs=1e-5)


def test_qabf_identical_images():
    img = _smooth_image()
    assert qabf(img, img, img) == pytest.approx(QABF_MAX, abs=1e-12)


def test_qabf_identical_images_matlab_quirk():
    # quirk: where gA == gF the "ratio" is gF itself; on a two-level image every non-zero Sobel
    # magnitude is >= 40, so Qg(gF) = Tg to double precision
    img = np.zeros((20, 20))
    img[5:15, 5:15] = 10.0
    tg = QABF_CONSTANTS[0]
    assert qabf(img, img, img, matlab_quirk=True) == pytest.approx(tg * _qa(1.0), abs=1e-12)


def test_qabf_half_contrast_by_hand():
    # F = A/2: relative strength 0.5 wherever gA > 0, orientations equal -> Qabf = Qg(0.5) Qa(1)
    a = np.zeros((9, 9))
    a[:, 5:] = 8.0
    a[6:, :] += 4.0
    assert qabf(a / 2, a, a) == pytest.approx(_qg(0.5) * _qa(1.0), abs=1e-12)


def test_qabf_constant_fused_and_sources():
    a, b = _smooth_image(seed=0), _smooth_image(seed=1)
    bound = _qg(0.0)  # Tg / (1 + e^7.5) = 5.5e-4: relative strength 0 everywhere
    assert 0.0 <= qabf(np.zeros_like(a), a, b) < bound
    assert 0.0 <= qabf(np.full_like(a, 128.0), a, b, boundary="symm") < bound
    # the evaluators' zero padding turns the border of a grey constant image into an edge
    assert qabf(np.full_like(a, 128.0), a, b, boundary="fill") > 0.05
    c = np.full((16, 16), 7.0)
    assert qabf(a[:16, :16], c, c, boundary="symm") == 0.0
    assert qabf(a[:16, :16], 0 * c, 0 * c) == 0.0


def test_qabf_symmetric_and_scale_invariant():
    a, b = _smooth_image(seed=0), _smooth_image(seed=1)
    f = np.maximum(a, b)
    assert qabf(f, a, b) == pytest.approx(qabf(f, b, a))
    assert qabf(f / 255, a / 255, b / 255) == pytest.approx(qabf(f, a, b))
    assert qabf(f, a, b) > qabf(np.full_like(f, 1.0), a, b)


# ---------------------------------------------------------------- SSIM / MS-SSIM / PSNR


def test_ssim_matches_skimage_gaussian():
    x, y = _smooth_image(seed=0), _smooth_image(seed=1)
    ref = structural_similarity(x, y, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(x, y, data_range=255.0) == pytest.approx(ref, abs=1e-5)


def test_ssim_uniform_window_matches_skimage():
    x, y = _smooth_image(seed=0), _smooth_image(seed=2)
    ref = structural_similarity(x, y, data_range=255, win_size=7, use_sample_covariance=False)
    got = ssim(x, y, data_range=255.0, kernel_size=7, kernel_type="uniform")
    assert got == pytest.approx(ref, abs=1e-5)


def test_ssim_identity_symmetry_constants():
    x, y = _smooth_image(seed=0), _smooth_image(seed=1)
    assert ssim(x, x, 255.0) == pytest.approx(1.0, abs=1e-6)
    assert ssim(x, y, 255.0) == pytest.approx(ssim(y, x, 255.0), abs=1e-6)
    c = np.full((32, 32), 90.0)
    assert ssim(c, c, 255.0) == pytest.approx(1.0)
    # two different constants: luminance term only
    c1, k1 = (0.01 * 255) ** 2, 90.0
    expected = (2 * k1 * 30 + c1) / (k1**2 + 30**2 + c1)
    assert ssim(c, np.full((32, 32), 30.0), 255.0) == pytest.approx(expected, rel=1e-5)


def test_ssim_reflect_padding_differs_and_is_finite():
    x, y = _smooth_image(seed=0) / 255, _smooth_image(seed=1) / 255
    valid, reflect = ssim(x, y, 1.0), ssim(x, y, 1.0, padding="reflect")
    assert np.isfinite(reflect) and reflect != pytest.approx(valid, abs=1e-6)


def test_ssim_skimage_wrapper_and_legacy_data_range():
    x, y = _smooth_image(seed=0), _smooth_image(seed=1)
    assert ssim_skimage(x, y, data_range=255.0) == pytest.approx(structural_similarity(x, y, data_range=255))
    # smaller data_range -> smaller stabilising constants -> a different (here lower) value
    assert ssim_skimage(x, y, data_range=2.0) < ssim_skimage(x, y, data_range=255.0)
    with pytest.raises(ValueError):  # the pitfall: current skimage refuses float input without data_range
        structural_similarity(x, y)


def test_ms_ssim_identity_and_weight_fitting():
    x = np.rint(np.clip(np.kron(_smooth_image(seed=3), np.ones((3, 3))), 0, 255))[:180, :180]
    assert ms_ssim(x, x, 255.0) == pytest.approx(1.0, abs=1e-5)
    assert fit_ms_ssim_weights((256, 256)) == MS_SSIM_WEIGHTS
    assert len(fit_ms_ssim_weights((128, 128, 128))) == 4
    assert sum(fit_ms_ssim_weights((64, 64))) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ms_ssim(x[:64, :64], x[:64, :64], 255.0, weights=MS_SSIM_WEIGHTS)


def test_psnr_by_hand():
    x = np.zeros((16, 16))
    assert psnr(x, np.full((16, 16), 0.1), data_range=1.0) == pytest.approx(20.0, abs=1e-4)
    assert psnr(x, np.full((16, 16), 25.5), data_range=255.0) == pytest.approx(20.0, abs=1e-4)
    assert psnr(x, x, data_range=1.0) == math.inf
