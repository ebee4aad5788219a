"""Convolutional blocks of ClinicalFMamba, dims-generic through MONAI's layer factories."""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Conv, Norm
from torch import nn

__all__ = ["CrossModalChannelAttention", "DilatedGatedConvBlock", "UpStage"]


class DilatedGatedConvBlock(nn.Module):
    """Dilated Gated Convolution block (DGCB); (B, C, *spatial) -> same shape.

    ``u = LReLU(conv3(BN x)) * LReLU(conv1(BN x))`` (gating), ``v = LReLU(BN(LReLU(dilconv3(BN u))))``,
    then a pyramid of 1, 2 and 3 applications of one shared 3x3 conv ``P`` summed, plus the residual:
    ``out = x + P(v) + P(P(v)) + P(P(P(v)))``.

    Args:
        spatial_dims: 2 or 3.
        channels: C (in = out).
        dilation: dilation of the middle convolution (1, 3, 5 in the three encoder stages).
        pyramid: use the pyramid (and its BN); False gives the released 3D block
            ``out = x + LReLU(dilconv3(BN u))``.
        negative_slope: LeakyReLU slope.
    """

    def __init__(self, spatial_dims: int, channels: int, dilation: int, pyramid: bool = True, negative_slope: float = 0.2):
        super().__init__()
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
        self.norm_query, self.norm_gate, self.norm_mid = norm(channels), norm(channels), norm(channels)
        self.query = conv(channels, channels, 3, padding=1)
        self.gate = conv(channels, channels, 1)
        self.dilated = conv(channels, channels, 3, padding=dilation, dilation=dilation)
        self.act = nn.LeakyReLU(negative_slope)
        self.pyramid = pyramid
        if pyramid:
            self.norm_out = norm(channels)
            self.pyramid_conv = conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.act(self.query(self.norm_query(x))) * self.act(self.gate(self.norm_gate(x)))
        v = self.act(self.dilated(self.norm_mid(u)))
        if not self.pyramid:
            return x + v
        p1 = self.pyramid_conv(self.act(self.norm_out(v)))
        p2 = self.pyramid_conv(p1)
        return x + p1 + p2 + self.pyramid_conv(p2)


class CrossModalChannelAttention(nn.Module):
    """Cross-modal channel attention (CMCA): channel weights from ``query`` re-weight a projection of ``ref``.

    ``w = sigmoid(maxpool(W_q q) + avgpool(W_q q))``, output ``(W_r r) * w``; q, r: (B, C, *spatial).
    """

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.query = conv(channels, channels, 1, bias=False)
        self.value = conv(channels, channels, 1, bias=False)

    def forward(self, query: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        a = self.query(query).flatten(2)
        weights = torch.sigmoid(a.amax(dim=2) + a.mean(dim=2))
        return self.value(ref) * weights.view(*weights.shape, *([1] * (ref.dim() - 2)))


class UpStage(nn.Module):
    """Nearest x2 up-sampling and a 3x3 conv with BatchNorm and activation.

    ``layout`` gives the order of operations: the default ``("up", "conv", "norm", "act")``; the
    released 2D decoder uses ``("up", "conv", "norm", "act")`` with ReLU, then
    ``("up", "conv", "act", "norm")`` and ``("act", "up", "conv", "norm")``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, act: nn.Module, layout=("up", "conv", "norm", "act")):
        super().__init__()
        ops = {
            "up": nn.Upsample(scale_factor=2, mode="nearest"),
            "conv": Conv[Conv.CONV, spatial_dims](in_channels, out_channels, 3, padding=1),
            "norm": Norm[Norm.BATCH, spatial_dims](out_channels),
            "act": act,
        }
        self.layout = tuple(layout)
        self.up, self.conv, self.norm, self.act = ops["up"], ops["conv"], ops["norm"], ops["act"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.layout:
            x = getattr(self, name)(x)
        return x
