"""Convolutional blocks of ClinicalFMamba, dims-generic through MONAI's layer factories."""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Conv, Norm
from torch import nn

__all__ = [
    "pointwise_conv",
    "CrossModalChannelAttention",
    "DilatedGatedConvBlock",
    "FullResolutionRefinement",
    "SourceSelectionOutput",
    "UpStage",
]


def pointwise_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a kernel-size-1 convolution module as one matrix product over channels;
    (B, C, *spatial) -> (B, O, *spatial).

    Same result as ``conv(x)`` (up to summation order) with the module's own weight and bias, so state dicts are
    unchanged. On CPU, oneDNN's NCHW path re-lays the tensor out around every 1x1 convolution, which costs several
    times the matrix product at full resolution.
    """
    return pointwise(x, conv.weight, conv.bias)


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`pointwise_conv` with explicit weight (O, C, 1, ..) and bias (O,); (B, C, *spatial) -> (B, O, *spatial)."""
    batch, channels = x.shape[:2]
    if x.dim() > 2 and x.stride(1) == 1 and channels > 1:  # channels-last memory: one (voxels, C) x (C, O) product
        y = torch.matmul(x.movedim(1, -1), weight.view(weight.shape[0], channels).t())
        if bias is not None:
            y = y.add_(bias)
        return y.movedim(-1, 1)
    matrix = weight.view(1, weight.shape[0], channels).expand(batch, -1, -1)
    flat = x.reshape(batch, channels, -1)
    # bmm, not matmul: matmul folds a 2D weight into one (B * HW, C) product and copies the transposed result
    y = torch.bmm(matrix, flat) if bias is None else torch.baddbmm(bias.view(1, -1, 1), matrix, flat)
    return y.view(batch, -1, *x.shape[2:])


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

    def __init__(
        self, spatial_dims: int, channels: int, dilation: int, pyramid: bool = True, negative_slope: float = 0.2
    ):
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
        u = self.act(self.query(self.norm_query(x))) * self.act(pointwise_conv(self.gate, self.norm_gate(x)))
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
        return pointwise_conv(self.value, ref) * self._weights(query).view(*query.shape[:2], *([1] * (ref.dim() - 2)))

    def add_to(self, h: torch.Tensor, query: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """``h + attention(query, ref)``; h: (B, C_out, *spatial)."""
        return h + self(query, ref)

    def add_both(self, h: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        """``h + attention(a, b) + attention(b, a)`` for ``pair`` = (a, b) stacked on the batch axis (2B, C, *spatial):
        both modalities attend to each other. h: (B, C_out, *spatial)."""
        batch = pair.shape[0] // 2
        first, second = pair[:batch], pair[batch:]
        return self.add_to(self.add_to(h, first, second), second, first)

    def _weights(self, query: torch.Tensor) -> torch.Tensor:
        """Channel weights (B, C) from the query: ``sigmoid(max + mean)`` of ``W_q q`` over space."""
        a = pointwise_conv(self.query, query)
        spatial = tuple(range(2, a.dim()))
        return torch.sigmoid(a.amax(dim=spatial) + a.mean(dim=spatial))


class FullResolutionRefinement(nn.Module):
    """Residual refinement at full resolution with the source images (an option, not in the paper).

    ``h + out(act(mix(cat(h, image))))``: the decoder's only full-resolution path in the paper is linear in
    the stem features (channel attention, then the head), so it cannot switch per pixel between the
    sources as the max rule does; this block gives it one nonlinearity with the sources themselves as input.
    ``out`` starts at zero, so a network with the block computes exactly what it computed without it
    (fine-tuning starts from the trained fusion). h: (B, C, *spatial), image: (B, 2, *spatial).
    """

    def __init__(self, spatial_dims: int, channels: int, image_channels: int = 2, negative_slope: float = 0.2) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.mix = conv(channels + image_channels, channels, 3, padding=1)
        self.act = nn.LeakyReLU(negative_slope)
        self.out = conv(channels, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return h + self.out(self.act(self.mix(torch.cat([h, image.to(h.dtype)], dim=1))))


class SourceSelectionOutput(nn.Module):
    """Per-pixel convex mix of the decoder's image and the two sources (an option, not in the paper).

    ``F = g * (w * A + (1 - w) * B) + (1 - g) * D`` with ``w = sigmoid(conv(h))_0`` (which source),
    ``g = sigmoid(conv(h))_1`` (how much of the selected sources against the decoded image ``D``). Where
    ``w`` and ``g`` saturate, ``F`` copies a source's pixels exactly, texture included, as the max rule does;
    elsewhere it blends. Output stays in [0, 1] when ``D`` and the sources are. The conv starts at zero with
    gate bias ``gate_bias`` (``g = sigmoid(gate_bias)``, 0.12 for -2), so fine-tuning starts near ``D``.

    h: (B, C, *spatial), direct: (B, 1, *spatial), image: (B, 2, *spatial) -> (B, 1, *spatial).
    """

    def __init__(self, spatial_dims: int, channels: int, gate_bias: float = -2.0) -> None:
        super().__init__()
        self.logits = Conv[Conv.CONV, spatial_dims](channels, 2, 3, padding=1)
        nn.init.zeros_(self.logits.weight)
        with torch.no_grad():
            self.logits.bias.copy_(torch.tensor([0.0, float(gate_bias)]))

    def forward(self, h: torch.Tensor, direct: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.mix(self.logits(h), direct, image)

    def mix(self, logits: torch.Tensor, direct: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The output from the two logit maps (B, 2, *spatial) of ``logits``."""
        weights = torch.sigmoid(logits)
        w, g = weights[:, :1], weights[:, 1:]
        image = image.to(direct.dtype)
        selected = w * image[:, :1] + (1 - w) * image[:, 1:]
        return g * selected + (1 - g) * direct


class UpStage(nn.Module):
    """Nearest x2 up-sampling and a 3x3 conv with BatchNorm and activation.

    ``layout`` gives the order of operations: the default ``("up", "conv", "norm", "act")``; the
    released 2D decoder uses ``("up", "conv", "norm", "act")`` with ReLU, then
    ``("up", "conv", "act", "norm")`` and ``("act", "up", "conv", "norm")``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        act: nn.Module,
        layout=("up", "conv", "norm", "act"),
    ):
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
