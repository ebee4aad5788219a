"""Pixel-domain visual information fidelity (VIF-P, Sheikh & Bovik 2006), multiscale.

Re-implemented from the published algorithm: at scale s = 1..4 a MATLAB-style Gaussian window of
size N = 2^(5-s) + 1 and sigma N / 5 (``fspecial``: entries below eps * max are zeroed, then
normalised to sum 1) gives local means / variances / covariance with 'valid' filtering; before
scales 2..4 both images are low-passed with that scale's window ('valid') and decimated by 2.
Per pixel, g = s12 / (s1 + 1e-10), sv = s2 - g * s12, with the usual clamps (negative variances to
0; where s1 < 1e-10: g = 0, sv = s2, s1 = 0; where s2 < 1e-10: g = 0, sv = 0; where g < 0: sv = s2,
g = 0; sv floored at 1e-10). Then

    VIF = sum_s sum log10(1 + g^2 s1 / (sv + sigma_nsq)) / sum_s sum log10(1 + s1 / sigma_nsq).

``sigma_nsq = 2`` is an absolute noise variance, so the value depends on the intensity scale
(0-255 and 0-1 inputs give different numbers).
"""

from __future__ import annotations

import numpy as np
from scipy.signal import correlate2d

from .utils import ArrayLike, as_numpy, check_same_shape, check_spatial_2d

__all__ = ["matlab_gaussian_window", "vif_p"]

_EPS = 1e-10


def matlab_gaussian_window(size: int, sigma: float) -> np.ndarray:
    """2-D Gaussian window as MATLAB ``fspecial('gaussian', size, sigma)`` builds it (size x size)."""
    r = (size - 1) / 2.0
    ax = np.arange(-r, r + 1)
    xx, yy = np.meshgrid(ax, ax)
    h = np.exp(-(xx * xx + yy * yy) / (2.0 * sigma * sigma))
    h[h < np.finfo(np.float64).eps * h.max()] = 0.0
    return h / h.sum()


def _filter_valid(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    """'valid' correlation of a 2-D image with a 2-D window (MATLAB ``filter2(win, x, 'valid')``)."""
    return correlate2d(x, window, mode="valid")


def vif_p(reference: ArrayLike, distorted: ArrayLike, sigma_nsq: float = 2.0, scales: int = 4) -> float:
    """VIF-P of ``distorted`` with respect to ``reference`` (both (H, W), same scale).

    Requires H, W >= 41 for 4 scales. Returns 1.0 for ``distorted == reference`` (non-constant),
    and 0.0 when the reference is constant (it carries no information: the ratio is 0 / 0).
    """
    ref = as_numpy(reference)
    dist = as_numpy(distorted)
    check_same_shape(ref, dist)
    check_spatial_2d(ref, name="VIF")
    num = 0.0
    den = 0.0
    for scale in range(1, scales + 1):
        n = 2 ** (scales - scale + 1) + 1
        win = matlab_gaussian_window(n, n / 5.0)
        if min(ref.shape) < n:
            raise ValueError(f"image too small for {scales}-scale VIF (needs at least 41x41 pixels)")
        if scale > 1:
            ref = _filter_valid(ref, win)[::2, ::2]
            dist = _filter_valid(dist, win)[::2, ::2]
        if min(ref.shape) < n:
            raise ValueError(f"image too small for {scales}-scale VIF (needs at least 41x41 pixels)")
        mu1 = _filter_valid(ref, win)
        mu2 = _filter_valid(dist, win)
        s1 = np.maximum(_filter_valid(ref * ref, win) - mu1 * mu1, 0.0)
        s2 = np.maximum(_filter_valid(dist * dist, win) - mu2 * mu2, 0.0)
        s12 = _filter_valid(ref * dist, win) - mu1 * mu2

        g = s12 / (s1 + _EPS)
        sv = s2 - g * s12
        low1 = s1 < _EPS
        g[low1] = 0.0
        sv[low1] = s2[low1]
        s1[low1] = 0.0
        low2 = s2 < _EPS
        g[low2] = 0.0
        sv[low2] = 0.0
        neg = g < 0
        sv[neg] = s2[neg]
        g[neg] = 0.0
        sv = np.maximum(sv, _EPS)

        num += float(np.sum(np.log10(1.0 + g * g * s1 / (sv + sigma_nsq))))
        den += float(np.sum(np.log10(1.0 + s1 / sigma_nsq)))
    return num / den if den > 0 else 0.0
