"""A fusion rule that takes a while per pair, so that a test can interrupt a run between two pairs."""

from __future__ import annotations

import time

import torch
from torch import nn

__all__ = ["SlowMeanFusion"]


class SlowMeanFusion(nn.Module):
    """The pixel-wise mean of the two sources ``(B, 2, *spatial) -> (B, 1, *spatial)``, after ``seconds`` of sleep."""

    def __init__(self, seconds: float = 1.0) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return image[:, :2].mean(dim=1, keepdim=True)
