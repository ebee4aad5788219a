"""Full-reference similarity of the fused image to one source: SSIM, MS-SSIM, PSNR.

Thin wrappers that fix every convention explicitly and reuse library code:

* ``ssim`` / ``ms_ssim`` / ``psnr``: MONAI (``monai.metrics.compute_ssim_and_cs``,
  ``compute_ms_ssim``, ``PSNRMetric``); 2-D or 3-D images; 'valid' filtering (no padding),
  population statistics, mean over the SSIM map.
* ``ssim_skimage``: ``skimage.metrics.structural_similarity`` (default 7x7 uniform window with
  sample covariance, as the CDDFuse evaluator calls it), with ``data_range`` always explicit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import PSNRMetric, compute_ms_ssim, compute_ssim_and_cs
from skimage.metrics import structural_similarity

from .utils import ArrayLike, as_numpy, check_same_shape

__all__ = ["MS_SSIM_WEIGHTS", "ssim", "ms_ssim", "psnr", "ssim_skimage", "fit_ms_ssim_weights"]

#: Wang et al. 2003 five-scale weights.
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _as_batch(x: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, D) numpy -> (1, 1, ...) float64 tensor."""
    if x.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D or 3-D image, got shape {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))[None, None]


def ssim(
    x: ArrayLike,
    y: ArrayLike,
    data_range: float,
    kernel_size: int = 11,
    kernel_sigma: float = 1.5,
    kernel_type: str = "gaussian",
    k1: float = 0.01,
    k2: float = 0.03,
    padding: str = "valid",
) -> float:
    """Mean SSIM (Wang et al. 2004) of two same-shape 2-D/3-D images via MONAI.

    Default: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, map averaged over the 'valid' region
    (windows fully inside the image; as skimage with ``gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False``). ``padding="reflect"`` first reflect-pads by half a window and
    averages the full-size map, as torchmetrics 1.x ``structural_similarity_index_measure`` does.
    Symmetric in ``x`` and ``y``; two identical images give 1 (also when constant).
    """
    xa, ya = as_numpy(x), as_numpy(y)
    check_same_shape(xa, ya)
    nd = xa.ndim
    xt, yt = _as_batch(xa), _as_batch(ya)
    if padding == "reflect":
        pad = [(kernel_size - 1) // 2] * (2 * nd)
        xt, yt = F.pad(xt, pad, mode="reflect"), F.pad(yt, pad, mode="reflect")
    elif padding != "valid":
        raise ValueError(f"padding must be 'valid' or 'reflect', got {padding!r}")
    ssim_map, _ = compute_ssim_and_cs(
        xt,
        yt,
        spatial_dims=nd,
        kernel_size=(kernel_size,) * nd,
        kernel_sigma=(kernel_sigma,) * nd,
        data_range=data_range,
        kernel_type=kernel_type,
        k1=k1,
        k2=k2,
    )
    return float(ssim_map.mean())


def fit_ms_ssim_weights(
    shape: Sequence[int], kernel_size: int = 11, weights: Sequence[float] = MS_SSIM_WEIGHTS
) -> tuple[float, ...]:
    """The leading weights that MONAI's MS-SSIM size check accepts for ``shape``.

    MONAI requires ``side // (n_scales - 1)**2 > kernel_size - 1``; e.g. 256 px keeps all 5 scales
    (weights returned unchanged), 128 px (BraTS 3-D) keeps 4, renormalised to sum 1.
    """
    for n in range(len(weights), 0, -1):
        div = max(1, n - 1) ** 2
        if all(s // div > kernel_size - 1 for s in shape):
            if n == len(weights):
                return tuple(float(v) for v in weights)
            w = np.asarray(weights[:n], dtype=np.float64)
            return tuple(float(v) for v in w / w.sum())
    raise ValueError(f"image of shape {tuple(shape)} is too small for MS-SSIM with kernel {kernel_size}")


def ms_ssim(
    x: ArrayLike,
    y: ArrayLike,
    data_range: float,
    kernel_size: int = 11,
    kernel_sigma: float = 1.5,
    weights: Sequence[float] | None = MS_SSIM_WEIGHTS,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Multi-scale SSIM (Wang et al. 2003) via MONAI ``compute_ms_ssim`` (2x average-pool per scale).

    ``weights=None`` picks ``fit_ms_ssim_weights`` for the image size (fewer scales for small
    images); explicit weights that do not fit raise ``ValueError``. Negative contrast terms are
    clipped to 0 (MONAI), so the value is in [0, 1].
    """
    xa, ya = as_numpy(x), as_numpy(y)
    check_same_shape(xa, ya)
    if weights is None:
        weights = fit_ms_ssim_weights(xa.shape, kernel_size)
    value = compute_ms_ssim(
        _as_batch(xa),
        _as_batch(ya),
        spatial_dims=xa.ndim,
        data_range=data_range,
        kernel_size=kernel_size,
        kernel_sigma=kernel_sigma,
        k1=k1,
        k2=k2,
        weights=tuple(weights),
    )
    return float(value.reshape(-1)[0])


def psnr(x: ArrayLike, y: ArrayLike, data_range: float) -> float:
    """PSNR ``10 log10(data_range^2 / MSE)`` over the whole image via MONAI ``PSNRMetric``.

    Identical images (MSE = 0) give ``inf``, never NaN.
    """
    xa, ya = as_numpy(x), as_numpy(y)
    check_same_shape(xa, ya)
    if np.array_equal(xa, ya):
        return float("inf")
    metric = PSNRMetric(max_val=data_range)
    return float(metric(y_pred=_as_batch(xa), y=_as_batch(ya)).reshape(-1)[0])


def ssim_skimage(
    x: ArrayLike,
    y: ArrayLike,
    data_range: float,
    win_size: int = 7,
    gaussian_weights: bool = False,
    sigma: float = 1.5,
    use_sample_covariance: bool = True,
) -> float:
    """``skimage.metrics.structural_similarity`` with an explicit ``data_range``.

    Defaults are skimage's own (7x7 uniform window, sample covariance, border of half a window
    cropped before averaging), i.e. the CDDFuse evaluator's call. The scikit-image the evaluator
    pinned (0.19) took ``data_range = 2`` (the float dtype range -1..1) for float input without one;
    0.26 raises instead. Pass ``data_range=2.0`` to emulate the old numbers on 0-255 float images.
    """
    xa, ya = as_numpy(x), as_numpy(y)
    check_same_shape(xa, ya)
    return float(
        structural_similarity(
            xa,
            ya,
            win_size=win_size,
            data_range=data_range,
            gaussian_weights=gaussian_weights,
            sigma=sigma,
            use_sample_covariance=use_sample_covariance,
        )
    )
