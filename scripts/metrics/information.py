"""Histogram information measures: entropy (EN), mutual information (MI), normalised MI (NMI).

All functions take images of any dimensionality (2-D slices or 3-D volumes) and flatten them.
Histograms follow ``numpy.histogram`` / ``numpy.histogram2d`` binning: ``bins`` equal-width bins over
``value_range`` (last bin closed); ``value_range=None`` uses each image's own min..max, which is what
``numpy.histogramdd`` does by default (a constant image gets the range value +- 0.5).
"""

from __future__ import annotations

import math

import numpy as np
from skimage.measure import shannon_entropy

from .utils import ArrayLike, as_numpy, check_same_shape

__all__ = [
    "INTEGER_8BIT_RANGE",
    "entropy",
    "unique_value_entropy",
    "joint_histogram",
    "mutual_information",
    "normalized_mutual_information",
]

#: 256 unit-width bins [k, k+1) for k = 0..255: every 8-bit grey level gets its own bin.
INTEGER_8BIT_RANGE: tuple[float, float] = (0.0, 256.0)


def _entropy_of_counts(counts: np.ndarray, base: float) -> float:
    p = counts[counts > 0].astype(np.float64)
    if p.size == 0:
        return 0.0
    p = p / p.sum()
    return float(-(p * np.log(p)).sum() / math.log(base))


def entropy(
    image: ArrayLike,
    bins: int = 256,
    value_range: tuple[float, float] | None = INTEGER_8BIT_RANGE,
    base: float = 2.0,
) -> float:
    """Shannon entropy of the grey-level histogram, ``-sum p log_base p`` (EN).

    Args:
        image: image of any shape, e.g. (H, W) on the 0-255 scale.
        bins: number of equal-width histogram bins.
        value_range: histogram range; default: 256 unit bins for integer 0..255 images.
        base: logarithm base (2 -> bits).

    A constant image has entropy 0.
    """
    x = as_numpy(image).ravel()
    counts, _ = np.histogram(x, bins=bins, range=value_range)
    return _entropy_of_counts(counts, base)


def unique_value_entropy(image: ArrayLike, base: float = 2.0) -> float:
    """Entropy over the distinct values of the image (``skimage.measure.shannon_entropy``).

    On a float image nearly every pixel value is distinct, so this approaches ``log2(n_pixels)``
    (16 bits for 256x256); it equals the 256-bin ``entropy`` only for integer images.
    Used by the ClinicalFMamba reference code for EN.
    """
    return float(shannon_entropy(as_numpy(image), base=base))


def joint_histogram(
    x: ArrayLike,
    y: ArrayLike,
    bins: int = 256,
    value_range: tuple[float, float] | None = INTEGER_8BIT_RANGE,
) -> np.ndarray:
    """Joint histogram counts (bins, bins) of two same-shape images (``numpy.histogram2d``)."""
    xa = as_numpy(x)
    ya = as_numpy(y)
    check_same_shape(xa, ya)
    rng = None if value_range is None else [value_range, value_range]
    counts, _, _ = np.histogram2d(xa.ravel(), ya.ravel(), bins=bins, range=rng)
    return counts


def _entropies(counts: np.ndarray, base: float) -> tuple[float, float, float]:
    """(H(x), H(y), H(x, y)) from a joint count table."""
    return (
        _entropy_of_counts(counts.sum(axis=1), base),
        _entropy_of_counts(counts.sum(axis=0), base),
        _entropy_of_counts(counts.ravel(), base),
    )


def mutual_information(
    x: ArrayLike,
    y: ArrayLike,
    bins: int = 256,
    value_range: tuple[float, float] | None = INTEGER_8BIT_RANGE,
    base: float = math.e,
) -> float:
    """Histogram mutual information ``H(x) + H(y) - H(x, y)`` (default natural log -> nats).

    With the default 256 unit bins on integer 0..255 images this equals
    ``sklearn.metrics.mutual_info_score`` on the pixel values as labels. ``bins=10,
    value_range=None`` reproduces ``numpy.histogramdd`` with its defaults (ClinicalFMamba code).
    Zero when either image is constant; never negative beyond rounding (clipped at 0).
    """
    hx, hy, hxy = _entropies(joint_histogram(x, y, bins, value_range), base)
    return max(hx + hy - hxy, 0.0)


def normalized_mutual_information(
    x: ArrayLike,
    y: ArrayLike,
    bins: int = 256,
    value_range: tuple[float, float] | None = INTEGER_8BIT_RANGE,
) -> float:
    """Studholme normalised MI ``(H(x) + H(y)) / H(x, y)``, in [1, 2] (log base cancels).

    ``bins=100, value_range=None`` is ``skimage.metrics.normalized_mutual_information``.
    When both images are constant (H(x, y) = 0) the value is 1.0 (no shared information).
    """
    hx, hy, hxy = _entropies(joint_histogram(x, y, bins, value_range), math.e)
    if hxy <= 0.0:
        return 1.0
    return float((hx + hy) / hxy)
