"""Single-image contrast / sharpness statistics: SD, SF, AG, and the two-source SCD.

All are defined on whatever scale the image is given (they scale linearly with intensity), so the
profiles feed them 0-255 images. SD, SF and AG accept 2-D or 3-D arrays.
"""

from __future__ import annotations

import numpy as np

from .utils import ArrayLike, as_numpy, check_same_shape, pearson_correlation

__all__ = ["standard_deviation", "spatial_frequency", "average_gradient", "scd"]


def standard_deviation(image: ArrayLike) -> float:
    """Population standard deviation of all pixel values (SD, ``ddof=0``); 0 for a constant image."""
    return float(np.std(as_numpy(image)))


def spatial_frequency(image: ArrayLike) -> float:
    """Spatial frequency ``sqrt(RF^2 + CF^2)`` (SF).

    ``RF^2`` is the mean of the squared horizontal first differences (over H x (W-1) pairs), ``CF^2``
    the mean of the squared vertical ones (over (H-1) x W pairs); for a volume the squared means
    along every axis are summed. A ramp ``I[i, j] = a*i + b*j`` gives ``sqrt(a^2 + b^2)``.
    """
    x = as_numpy(image)
    total = 0.0
    for axis in range(x.ndim):
        if x.shape[axis] > 1:
            total += float(np.mean(np.diff(x, axis=axis) ** 2))
    return float(np.sqrt(total))


def average_gradient(image: ArrayLike) -> float:
    """Average gradient ``mean(sqrt((gx^2 + gy^2) / 2))`` (AG).

    Gradients are central differences with one-sided differences at the borders
    (``numpy.gradient``, unit spacing); for a volume the mean of the squared components is used.
    A ramp ``I[i, j] = a*i + b*j`` gives ``sqrt((a^2 + b^2) / 2)``.
    """
    x = as_numpy(image)
    axes = [ax for ax in range(x.ndim) if x.shape[ax] > 1]
    if not axes:
        return 0.0
    grads = np.gradient(x, axis=axes)
    if len(axes) == 1:
        grads = [grads]
    sq = sum(g * g for g in grads)
    return float(np.mean(np.sqrt(sq / x.ndim)))


def scd(fused: ArrayLike, a: ArrayLike, b: ArrayLike) -> float:
    """Sum of the correlations of differences: ``corr(A, F - B) + corr(B, F - A)`` (SCD, in [-2, 2]).

    Pearson correlation over all pixels; a term whose image has zero variance counts as 0.
    """
    f, aa, bb = as_numpy(fused), as_numpy(a), as_numpy(b)
    check_same_shape(f, aa, bb)
    return pearson_correlation(aa, f - bb) + pearson_correlation(bb, f - aa)
