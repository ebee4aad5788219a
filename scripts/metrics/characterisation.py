"""How a fused image relates to its sources pixel by pixel: copying, closeness to the max rule, edge overshoot.

These are not quality scores. They describe what a fusion method does, so that a table of quality metrics can
be read correctly: a method that copies the brighter source scores like the max rule on label-based MI and
Q^AB/F, and a method that switches between sources can create edges stronger than in either source where it
switches. All functions take 8-bit images on the 0-255 scale (``quantize_8bit``) and look only at the
foreground, the pixels where ``max(A, B) > FOREGROUND_LEVEL``, so that the black background (which every
method copies) does not dominate.

- ``source_copy_fraction``: share of foreground pixels where ``F == A`` or ``F == B``;
- ``max_copy_fraction``: share of foreground pixels where ``F == max(A, B)``;
- ``mean_abs_to_max``: mean ``|F - max(A, B)|`` over the foreground (grey levels);
- ``edge_overshoot_fraction``: share of foreground pixels whose Sobel gradient magnitude in ``F`` exceeds the
  larger of the two sources' by more than ``EDGE_MARGIN`` grey levels per pixel (switching artefacts).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "EDGE_MARGIN",
    "FOREGROUND_LEVEL",
    "edge_overshoot_fraction",
    "foreground",
    "gradient_magnitude",
    "max_copy_fraction",
    "mean_abs_to_max",
    "source_copy_fraction",
]

#: pixels where both sources are at most this grey level are background
FOREGROUND_LEVEL = 10.0
#: a fused edge counts as overshoot when its Sobel magnitude exceeds both sources' by more than this
EDGE_MARGIN = 4.0


def foreground(a: np.ndarray, b: np.ndarray, level: float = FOREGROUND_LEVEL) -> np.ndarray:
    """Boolean mask of the pixels where ``max(A, B) > level``."""
    return np.maximum(a, b) > level


def _share(mask: np.ndarray, region: np.ndarray) -> float:
    n = int(region.sum())
    return float(np.count_nonzero(mask & region) / n) if n else float("nan")


def source_copy_fraction(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Share of foreground pixels whose fused value equals one of the sources exactly."""
    return _share((f == a) | (f == b), foreground(a, b))


def max_copy_fraction(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Share of foreground pixels whose fused value equals ``max(A, B)`` exactly."""
    return _share(f == np.maximum(a, b), foreground(a, b))


def mean_abs_to_max(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Mean ``|F - max(A, B)|`` over the foreground, in grey levels."""
    region = foreground(a, b)
    return float(np.abs(f - np.maximum(a, b))[region].mean()) if region.any() else float("nan")


def gradient_magnitude(x: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude ``sqrt(sum_d (sobel_d x)^2) / 8`` with mirrored borders (grey levels per pixel).

    The division by 8 (the sum of the positive Sobel weights of one axis in 2D) makes a unit ramp give 1.
    """
    x = np.asarray(x, dtype=np.float64)
    squares = sum(ndimage.sobel(x, axis=d, mode="reflect") ** 2 for d in range(x.ndim))
    return np.sqrt(squares) / (2.0 * 4.0 ** (x.ndim - 1))


def edge_overshoot_fraction(f: np.ndarray, a: np.ndarray, b: np.ndarray, margin: float = EDGE_MARGIN) -> float:
    """Share of foreground pixels where ``|grad F| > max(|grad A|, |grad B|) + margin``."""
    stronger = gradient_magnitude(f) > np.maximum(gradient_magnitude(a), gradient_magnitude(b)) + margin
    return _share(stronger, foreground(a, b))
