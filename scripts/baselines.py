"""Classic pixel-level fusion rules used as comparison rows.

Each rule is an ``nn.Module`` with the same interface as the network, so a config can swap
``network_def`` for a baseline: input ``image`` (B, 2, *spatial) in [0, 1] (channel 0 = reference
MRI, channel 1 = other modality), output (B, 1, *spatial) in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BASELINES",
    "MeanFusion",
    "MaxFusion",
    "LaplacianPyramidFusion",
    "laplacian_pyramid",
    "reconstruct_laplacian_pyramid",
]


class MeanFusion(nn.Module):
    """Pixel-wise average of the two sources."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image[:, :2].mean(dim=1, keepdim=True)


class MaxFusion(nn.Module):
    """Pixel-wise maximum of the two sources."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image[:, :2].amax(dim=1, keepdim=True)


_BINOMIAL_5 = (1.0, 4.0, 6.0, 4.0, 1.0)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Separable 5-tap binomial low-pass [1, 4, 6, 4, 1] / 16 along every spatial axis, replicate border."""
    nd = x.ndim - 2
    kernel = x.new_tensor(_BINOMIAL_5)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    for axis in range(nd):
        shape = [1] * nd
        shape[axis] = 5
        weight = kernel.reshape(1, 1, *shape).expand(channels, 1, *shape)
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = 2  # F.pad lists the last axis first
        x = conv(F.pad(x, pad, mode="replicate"), weight, groups=channels)
    return x


def _downsample(x: torch.Tensor) -> torch.Tensor:
    """Blur, then keep every second sample per spatial axis (size n -> ceil(n / 2))."""
    x = _blur(x)
    return x[(slice(None), slice(None)) + (slice(None, None, 2),) * (x.ndim - 2)]


def _upsample(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Zero-insertion up-sampling to ``size`` followed by the blur scaled by 2 per axis."""
    nd = x.ndim - 2
    up = x.new_zeros(x.shape[:2] + tuple(2 * s for s in x.shape[2:]))
    up[(slice(None), slice(None)) + (slice(None, None, 2),) * nd] = x
    up = up[(slice(None), slice(None)) + tuple(slice(0, s) for s in size)]
    return _blur(up) * (2**nd)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Burt-Adelson Laplacian pyramid of (B, C, *spatial): ``levels`` detail bands, then the base.

    Reconstruction (``reconstruct_laplacian_pyramid``) is exact for any size, since the same
    up-sampling is used to build and to collapse the pyramid.
    """
    bands = []
    current = x
    for _ in range(levels):
        if min(current.shape[2:]) < 2:
            break
        low = _downsample(current)
        bands.append(current - _upsample(low, tuple(current.shape[2:])))
        current = low
    bands.append(current)
    return bands


def reconstruct_laplacian_pyramid(bands: list[torch.Tensor]) -> torch.Tensor:
    """Collapse a pyramid made by ``laplacian_pyramid``."""
    current = bands[-1]
    for detail in reversed(bands[:-1]):
        current = detail + _upsample(current, tuple(detail.shape[2:]))
    return current


class LaplacianPyramidFusion(nn.Module):
    """Laplacian-pyramid fusion (Burt & Adelson; Burt & Kolczynski 1993 style).

    Both sources are decomposed into ``levels`` detail bands plus a low-pass base (5-tap binomial
    filter, factor-2 decimation, replicate borders; any spatial size, 2-D or 3-D). Each detail
    coefficient is taken from the source with the larger absolute value (ties -> channel 0), the
    bases are averaged, the pyramid is collapsed and clamped to [0, 1].

    Args:
        levels: number of detail bands (fewer if the image becomes smaller than 2 pixels).
    """

    def __init__(self, levels: int = 4) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.levels = levels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim not in (4, 5) or image.shape[1] < 2:
            raise ValueError(f"expected image (B, 2, H, W[, D]), got {tuple(image.shape)}")
        x = image[:, :2]
        bands = laplacian_pyramid(x, self.levels)
        fused = []
        for detail in bands[:-1]:
            pick_b = detail[:, 1:2].abs() > detail[:, 0:1].abs()
            fused.append(torch.where(pick_b, detail[:, 1:2], detail[:, 0:1]))
        fused.append(bands[-1].mean(dim=1, keepdim=True))
        return reconstruct_laplacian_pyramid(fused).clamp(0.0, 1.0)


#: the baseline registry: method name -> fusion rule, used by evaluation, model selection and DICOM fusion
BASELINES: dict[str, type[nn.Module]] = {"mean": MeanFusion, "max": MaxFusion, "laplacian": LaplacianPyramidFusion}
