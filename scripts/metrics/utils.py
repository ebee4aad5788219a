"""Array helpers shared by the fusion metrics: conversion, quantisation, safe division, colour."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = [
    "ArrayLike",
    "as_numpy",
    "as_unit_range",
    "quantize_8bit",
    "minmax_to_8bit",
    "check_same_shape",
    "check_spatial_2d",
    "pearson_correlation",
    "safe_ratio",
    "combine_sources",
    "rgb_to_y",
]

ArrayLike = Any  # numpy array, torch tensor or nested sequence


def as_numpy(x: ArrayLike, dtype: type = np.float64) -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor, sequence) as a numpy array of ``dtype``.

    Singleton leading dimensions (batch / channel) are squeezed, so ``(1, 1, H, W)`` becomes ``(H, W)``.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.double().numpy() if x.is_floating_point() else x.numpy()
    arr = np.asarray(x)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    return arr.astype(dtype, copy=False)


def as_unit_range(x: ArrayLike) -> np.ndarray:
    """Float64 image on the [0, 1] scale: ``uint8`` input is divided by 255, other dtypes are kept as is."""
    if isinstance(x, torch.Tensor):
        is_u8 = x.dtype == torch.uint8
    else:
        is_u8 = np.asarray(x).dtype == np.uint8
    arr = as_numpy(x)
    return arr / 255.0 if is_u8 else arr


def quantize_8bit(x: np.ndarray) -> np.ndarray:
    """Clip a [0, 1] image, scale by 255 and round to integers (returned as float64 in 0..255).

    This is what saving a [0, 1] float image as an 8-bit PNG does (round half to even).
    """
    return np.rint(np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0) * 255.0)


def minmax_to_8bit(x: np.ndarray) -> np.ndarray:
    """Per-image min-max normalisation to 0..255, rounded to integers (the CDDFuse saving step).

    A constant image cannot be stretched; it is quantised as it is (``quantize_8bit``).
    """
    x = np.asarray(x, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return quantize_8bit(x)
    return np.rint((x - lo) / (hi - lo) * 255.0)


def check_same_shape(*arrays: np.ndarray) -> None:
    """Raise ``ValueError`` unless all arrays share one shape."""
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images must have the same shape, got {[a.shape for a in arrays]}")


def check_spatial_2d(*arrays: np.ndarray, name: str = "metric") -> None:
    """Raise ``ValueError`` unless every array is 2-D (H, W)."""
    for a in arrays:
        if a.ndim != 2:
            raise ValueError(f"{name} is defined for 2-D (H, W) images, got shape {a.shape}")


def safe_ratio(num: float, den: float, default: float = 0.0) -> float:
    """``num / den``, or ``default`` where ``den`` is 0 (keeps constant images away from NaN)."""
    return float(num) / float(den) if den != 0 else float(default)


def pearson_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation over all pixels; 0.0 where either image has zero variance."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    xc = x - x.mean()
    yc = y - y.mean()
    den = np.sqrt(np.sum(xc * xc) * np.sum(yc * yc))
    return safe_ratio(np.sum(xc * yc), den, 0.0)


def combine_sources(
    fn: Callable[[np.ndarray, np.ndarray], float], combine: str
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], float]:
    """Turn a one-source metric ``fn(fused, source)`` into ``(fused, a, b) -> fn(F, A) (+|mean) fn(F, B)``."""
    if combine not in ("sum", "mean"):
        raise ValueError(f"combine must be 'sum' or 'mean', got {combine!r}")
    scale = 1.0 if combine == "sum" else 0.5

    def two_source(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        return scale * (float(fn(fused, a)) + float(fn(fused, b)))

    two_source.__name__ = f"{getattr(fn, '__name__', 'metric')}_{combine}"
    return two_source


def rgb_to_y(rgb: ArrayLike) -> np.ndarray:
    """ITU-R BT.601 luma of an RGB image (H, W, 3) on its own scale: 0.299 R + 0.587 G + 0.114 B.

    PIL's ``convert("YCbCr")`` computes the same weights in fixed point and rounds to uint8; for
    8-bit inputs ``np.rint(rgb_to_y(x))`` matches it to within one grey level.
    """
    arr = as_numpy(rgb)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    return arr @ np.array([0.299, 0.587, 0.114])
