"""EN, SD, SF, AG, SCD, MI, NMI and the array helpers: hand-computed values and library oracles."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy
from skimage.measure import shannon_entropy
from skimage.metrics import normalized_mutual_information as sk_nmi
from sklearn.metrics import mutual_info_score

from scripts.metrics import (
    average_gradient,
    entropy,
    minmax_to_8bit,
    mutual_information,
    normalized_mutual_information,
    quantize_8bit,
    rgb_to_y,
    scd,
    spatial_frequency,
    standard_deviation,
    unique_value_entropy,
)

RNG = np.random.default_rng(0)


def _int_image(shape=(32, 32), hi=256):
    return RNG.integers(0, hi, size=shape).astype(np.float64)


# ---------------------------------------------------------------- EN


def test_entropy_uniform_four_levels_is_two_bits():
    img = np.repeat(np.array([0.0, 10.0, 20.0, 255.0]), 16).reshape(8, 8)
    assert entropy(img) == pytest.approx(2.0)


def test_entropy_known_histogram():
    # p = (1/2, 1/4, 1/4) -> H = 1.5 bits = 1.5 ln 2 nats
    img = np.array([[5, 5, 7, 9]], dtype=float)
    assert entropy(img) == pytest.approx(1.5)
    assert entropy(img, base=math.e) == pytest.approx(1.5 * math.log(2))


def test_entropy_constant_image_is_zero():
    assert entropy(np.full((16, 16), 77.0)) == 0.0


def test_entropy_matches_shannon_entropy_on_integer_image():
    img = _int_image()
    assert entropy(img) == pytest.approx(shannon_entropy(img.astype(np.uint8), base=2))


def test_unique_value_entropy_counts_distinct_floats():
    img = np.linspace(0.0, 1.0, 64).reshape(8, 8)  # 64 distinct values, one pixel each
    assert unique_value_entropy(img) == pytest.approx(6.0)
    # the 256-bin EN of the same image scaled to 0..255 is lower (values share bins)
    assert entropy(quantize_8bit(img)) <= 6.0


# ---------------------------------------------------------------- SD, SF, AG


def test_standard_deviation_is_population_std():
    assert standard_deviation(np.array([[0.0, 2.0]])) == pytest.approx(1.0)
    assert standard_deviation(np.full((4, 4), 3.0)) == 0.0


@pytest.mark.parametrize("a, b", [(0.0, 1.0), (2.0, 0.0), (3.0, -4.0)])
def test_spatial_frequency_and_average_gradient_of_a_ramp(a, b):
    i, j = np.mgrid[0:12, 0:15].astype(np.float64)
    img = a * i + b * j
    assert spatial_frequency(img) == pytest.approx(math.hypot(a, b))
    assert average_gradient(img) == pytest.approx(math.sqrt((a * a + b * b) / 2))


def test_spatial_frequency_uses_separate_means():
    # one horizontal step of height 6 in a 2x3 image: RF^2 = (6^2*2)/(2*2) = 18, CF^2 = 0
    img = np.array([[0.0, 0.0, 6.0], [0.0, 0.0, 6.0]])
    assert spatial_frequency(img) == pytest.approx(math.sqrt(18.0))


def test_average_gradient_one_sided_borders():
    # row [0, 0, 6]: np.gradient -> [0, 3, 6]; gy = 0 -> AG = mean(|g| / sqrt 2)
    img = np.array([[0.0, 0.0, 6.0], [0.0, 0.0, 6.0]])
    assert average_gradient(img) == pytest.approx((0 + 3 + 6) / 3 / math.sqrt(2))


def test_sf_ag_sd_constant_and_3d():
    assert spatial_frequency(np.full((5, 5), 9.0)) == 0.0
    assert average_gradient(np.full((5, 5), 9.0)) == 0.0
    k, i, j = np.mgrid[0:6, 0:7, 0:8].astype(np.float64)
    vol = 1.0 * k + 2.0 * i + 2.0 * j
    assert spatial_frequency(vol) == pytest.approx(3.0)
    assert average_gradient(vol) == pytest.approx(math.sqrt(9.0 / 3))


# ---------------------------------------------------------------- SCD


def test_scd_of_sum_image_is_two():
    a, b = RNG.random((32, 32)), RNG.random((32, 32))
    assert scd(a + b, a, b) == pytest.approx(2.0)


def test_scd_fused_equal_to_source():
    a, b = RNG.random((32, 32)), RNG.random((32, 32))
    expected = np.corrcoef(a.ravel(), (a - b).ravel())[0, 1]  # second term: corr(B, 0) := 0
    assert scd(a, a, b) == pytest.approx(expected)
    assert scd(a, a, b) == pytest.approx(scd(a, b, a))


def test_scd_constant_images_no_nan():
    c = np.full((8, 8), 4.0)
    assert scd(c, c, c) == 0.0
    a = RNG.random((8, 8))
    assert np.isfinite(scd(c, a, c))


# ---------------------------------------------------------------- MI, NMI


def test_mi_matches_sklearn_labels_and_is_symmetric():
    x, y = _int_image(), _int_image(hi=16)
    y = np.clip(y * 8 + x // 32, 0, 255)  # dependent on x
    ref = mutual_info_score(x.astype(int).ravel(), y.astype(int).ravel())
    assert mutual_information(x, y) == pytest.approx(ref, abs=1e-12)
    assert mutual_information(y, x) == pytest.approx(ref, abs=1e-12)


def test_mi_of_image_with_itself_is_its_entropy():
    x = _int_image()
    assert mutual_information(x, x) == pytest.approx(entropy(x) * math.log(2))
    assert mutual_information(x, x, base=2) == pytest.approx(entropy(x))


def test_mi_constant_is_zero():
    x = _int_image()
    assert mutual_information(x, np.full_like(x, 3.0)) == 0.0
    assert mutual_information(np.zeros((4, 4)), np.zeros((4, 4))) == 0.0


def test_mi_ten_bins_matches_histogramdd_recipe():
    f, s = RNG.random((40, 40)), RNG.random((40, 40))
    s = 0.5 * s + 0.5 * f
    joint, _ = np.histogramdd([f.ravel(), s.ravel()], bins=10, density=True)
    hf = scipy_entropy(np.histogram(f.ravel(), bins=10, density=True)[0])
    hs = scipy_entropy(np.histogram(s.ravel(), bins=10, density=True)[0])
    hfs = scipy_entropy(joint.ravel())
    assert mutual_information(f, s, bins=10, value_range=None) == pytest.approx(hf + hs - hfs)


def test_nmi_matches_skimage():
    f, s = RNG.random((40, 40)), RNG.random((40, 40))
    s = 0.3 * s + 0.7 * f
    assert normalized_mutual_information(f, s, bins=100, value_range=None) == pytest.approx(sk_nmi(f, s, bins=100))
    x, y = _int_image(), _int_image()
    edges = np.arange(257.0)
    assert normalized_mutual_information(x, y) == pytest.approx(sk_nmi(x, y, bins=[edges, edges]))


def test_nmi_identity_and_constant():
    x = _int_image()
    assert normalized_mutual_information(x, x) == pytest.approx(2.0)
    assert normalized_mutual_information(x, np.zeros_like(x)) == pytest.approx(1.0)
    assert normalized_mutual_information(np.zeros((4, 4)), np.ones((4, 4))) == 1.0


# ---------------------------------------------------------------- helpers


def test_quantize_and_minmax():
    x = np.array([[-0.1, 0.0, 0.5, 1.0, 1.2]])
    np.testing.assert_array_equal(quantize_8bit(x), [[0, 0, 128, 255, 255]])  # 127.5 -> 128 (half to even)
    np.testing.assert_array_equal(minmax_to_8bit(np.array([[0.2, 0.3, 0.6]])), [[0, 64, 255]])
    np.testing.assert_array_equal(minmax_to_8bit(np.full((2, 2), 0.5)), np.full((2, 2), 128.0))


def test_rgb_to_y_matches_pil():
    from PIL import Image

    rgb = RNG.integers(0, 256, size=(16, 16, 3)).astype(np.uint8)
    pil_y = np.asarray(Image.fromarray(rgb, "RGB").convert("YCbCr"))[..., 0].astype(float)
    assert np.abs(np.rint(rgb_to_y(rgb)) - pil_y).max() <= 1.0


def test_torch_input_accepted():
    x = torch.from_numpy(_int_image()).reshape(1, 1, 32, 32)
    assert entropy(x) == pytest.approx(entropy(x.numpy()[0, 0]))
