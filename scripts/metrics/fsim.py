"""Feature similarity index FSIM (Zhang et al., IEEE TIP 2011), two variants.

``fsim(x, y)`` follows the authors' ``FSIM.m`` (grey-level part): images on their own scale (0-255
in the profiles); down-sampling by ``F = max(1, round(min(H, W) / 256))`` after an F x F box
filter (no-op for 256 px); phase congruency ``phasecong2`` (4 scales, 4 orientations, minimum
wavelength 6, mult 2, sigma_onf 0.55, k 2); gradient magnitude from the Scharr kernels
[[3, 0, -3], [10, 0, -10], [3, 0, -3]] / 16 ('same' convolution, zero padding); T1 = 0.85, T2 = 160:

    S_PC = (2 PC_x PC_y + T1) / (PC_x^2 + PC_y^2 + T1),   S_G = (2 G_x G_y + T2) / (G_x^2 + G_y^2 + T2)
    FSIM = sum(S_PC S_G PC_m) / sum(PC_m),   PC_m = max(PC_x, PC_y).

``fsim_clinicalfmamba(x, y)`` reproduces the function the ClinicalFMamba code uses (the
``image-similarity-measures`` formulation): phase congruency from ``phasecong3`` as
``phasepack.phasecong`` computes it (4 scales, 6 orientations, minimum wavelength 6, mult 2,
sigma_onf 0.5978, k 2, cut-off 0.5, g 10) **summed over the 6 orientations**; gradients from
OpenCV's Scharr kernels (3-10-3, unnormalised, reflect-101 border) **saturated to uint16**
(rounded, negatives clipped to 0) as ``cv2.Scharr(img, cv2.CV_16U, ...)`` does; same T1, T2 and
pooling. With [0, 1] inputs the gradient term is ~1, so it is essentially a PC similarity.

Both are symmetric and give 1 for identical images. When neither image has any phase congruency
(e.g. both constant) the weights vanish; the unweighted mean of ``S_PC * S_G`` is returned instead
(1.0 for two constant images), so the value is never NaN.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import correlate
from scipy.signal import convolve2d

from .phase_congruency import phase_congruency
from .utils import ArrayLike, as_numpy, check_same_shape, check_spatial_2d

__all__ = ["FSIM_T1", "FSIM_T2", "scharr_uint16_magnitude", "fsim", "fsim_clinicalfmamba"]

FSIM_T1 = 0.85
FSIM_T2 = 160.0

_SCHARR_X = np.array([[3.0, 0.0, -3.0], [10.0, 0.0, -10.0], [3.0, 0.0, -3.0]])


def _similarity(x: np.ndarray, y: np.ndarray, constant: float) -> np.ndarray:
    return (2.0 * x * y + constant) / (x * x + y * y + constant)


def _pool(pc_x: np.ndarray, pc_y: np.ndarray, g_x: np.ndarray, g_y: np.ndarray) -> float:
    local = _similarity(pc_x, pc_y, FSIM_T1) * _similarity(g_x, g_y, FSIM_T2)
    pc_m = np.maximum(pc_x, pc_y)
    den = float(pc_m.sum())
    if den <= 0.0:
        return float(local.mean())
    return float((local * pc_m).sum() / den)


def _downsample(x: np.ndarray) -> np.ndarray:
    factor = max(1, int(math.floor(min(x.shape) / 256.0 + 0.5)))
    if factor == 1:
        return x
    box = np.full((factor, factor), 1.0 / factor**2)
    return convolve2d(x, box, mode="same")[::factor, ::factor]


def fsim(x: ArrayLike, y: ArrayLike) -> float:
    """FSIM of two (H, W) grey images as in Zhang et al.'s ``FSIM.m`` (see module docstring)."""
    xa, ya = as_numpy(x), as_numpy(y)
    check_same_shape(xa, ya)
    check_spatial_2d(xa, name="FSIM")
    xa, ya = _downsample(xa), _downsample(ya)
    pc_x = phase_congruency(xa, variant="phasecong2")
    pc_y = phase_congruency(ya, variant="phasecong2")
    kx, ky = _SCHARR_X / 16.0, _SCHARR_X.T / 16.0
    g_x = np.hypot(convolve2d(xa, kx, mode="same"), convolve2d(xa, ky, mode="same"))
    g_y = np.hypot(convolve2d(ya, kx, mode="same"), convolve2d(ya, ky, mode="same"))
    return _pool(pc_x, pc_y, g_x, g_y)


def scharr_uint16_magnitude(image: ArrayLike) -> np.ndarray:
    """``sqrt(Sx^2 + Sy^2)`` with Sx, Sy = OpenCV Scharr responses saturated to uint16 (H, W)."""
    x = as_numpy(image)
    sx = np.clip(np.rint(correlate(x, -_SCHARR_X, mode="mirror")), 0, 65535)
    sy = np.clip(np.rint(correlate(x, -_SCHARR_X.T, mode="mirror")), 0, 65535)
    return np.sqrt(sx * sx + sy * sy)


def fsim_clinicalfmamba(x: ArrayLike, y: ArrayLike) -> float:
    """FSIM as in the ClinicalFMamba evaluation code (phasecong3 PC summed over 6 orientations,
    uint16-saturated Scharr gradients); inputs as that code feeds them ([0, 1] floats)."""
    xa, ya = as_numpy(x), as_numpy(y)
    check_same_shape(xa, ya)
    check_spatial_2d(xa, name="FSIM")
    params = dict(variant="phasecong3", nscale=4, norient=6, min_wavelength=6.0, mult=2.0, sigma_onf=0.5978)
    pc_x = phase_congruency(xa, **params).sum(axis=0)
    pc_y = phase_congruency(ya, **params).sum(axis=0)
    return _pool(pc_x, pc_y, scharr_uint16_magnitude(xa), scharr_uint16_magnitude(ya))
