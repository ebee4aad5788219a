"""Classic pixel-level fusion rules used as comparison rows.

Each rule is an ``nn.Module`` with the same interface as the network, so a config can swap
``network_def`` for a baseline: input ``image`` (B, 2, *spatial) in [0, 1] (channel 0 = reference
MRI, channel 1 = other modality), output (B, 1, *spatial) in [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MeanFusion", "MaxFusion"]


class MeanFusion(nn.Module):
    """Pixel-wise average of the two sources."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image[:, :2].mean(dim=1, keepdim=True)


class MaxFusion(nn.Module):
    """Pixel-wise maximum of the two sources."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image[:, :2].amax(dim=1, keepdim=True)
