"""ClinicalFMamba: CNN-Mamba hybrid that fuses two co-registered images into one.

Zhou & Khalvati, ICML 2025 NewInML workshop; MICCAI MLMI 2025 (arXiv 2508.03008).
Deviations from the released code are listed in ``docs/architecture.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data import MetaTensor
from monai.networks.layers.factories import Conv
from torch import nn

from .blocks import (
    CrossModalChannelAttention,
    DilatedGatedConvBlock,
    FullResolutionRefinement,
    SourceSelectionOutput,
    UpStage,
)
from .mamba import CrossMambaBlock, DirectionalMamba, MemberLayerNorm, ResidualMambaBlock

__all__ = ["ClinicalFMamba"]


class TokenSwapStage(nn.Module):
    """Channel-exchange Mamba stage: swap the even channels of the two streams, then a vanilla Mamba per stream.

    Applied twice with the same weights. Streams are stacked as members: (2, B, L, C).
    ``reference_compat`` reproduces the released residual wiring (pre-Mamba tokens added a second time,
    final residual stream discarded); the default keeps a clean pre-norm residual stream.
    """

    def __init__(self, d_model: int, d_state: int, reference_compat: bool, **mixer_kwargs) -> None:
        super().__init__()
        self.reference_compat = reference_compat
        self.norm = MemberLayerNorm(2, d_model)
        self.mixer = DirectionalMamba(d_model, d_state=d_state, members=2, use_norm=False, **mixer_kwargs)

    @staticmethod
    def exchange(x: torch.Tensor) -> torch.Tensor:
        """Take channels 0, 2, 4, ... from the other stream; x: (2, B, L, C)."""
        even = torch.arange(x.shape[-1], device=x.device) % 2 == 0
        return torch.where(even, x.flip(0), x)

    def _step(self, hidden: torch.Tensor, residual: torch.Tensor | None, grid) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden if residual is None else hidden + residual
        return self.mixer(self.exchange(self.norm(residual)), grid), residual

    def forward(self, streams: torch.Tensor, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        if self.reference_compat:
            hidden, residual = self._step(streams, tokens, grid)
            hidden, _ = self._step(hidden, residual, grid)
            return hidden
        hidden, residual = self._step(streams, None, grid)
        hidden, residual = self._step(hidden, residual, grid)
        return hidden + residual


class ClinicalFMamba(nn.Module):
    """Fuse a 2-channel image (reference, other modality) into one channel in [0, 1].

    Shared (Siamese) encoder: 3x3 stem, then per stage a 2x down-sampling conv and a Dilated Gated
    Conv block. Latent module on the token grid (input size / 2**len(features)): ``depth``
    multi-directional Mamba blocks per modality, a channel-exchange stage (twice, shared weights),
    cross-modal blocks where each modality selects (delta, B, C) for the other, and a linear merge.
    Decoder: ``decoder_depth`` vanilla Mamba blocks, LayerNorm, up-sampling conv stages back to full
    resolution, cross-modal channel attention from both full-resolution stems, 3x3 conv and sigmoid.

    Args:
        spatial_dims: 2 (cross-scan, 4 directions) or 3 (tri-plane scan, 6 directions).
        in_channels: must be 2 (channel 0 = reference/MRI, channel 1 = other modality).
        out_channels: fused channels (1).
        features: encoder widths per stage; the last one is d_model of the Mamba latent.
        dilations: dilation of each stage's DGC block.
        depth: single-modality Mamba blocks per modality (K).
        decoder_depth: vanilla Mamba blocks in the decoder.
        d_state: SSM state size of the latent and decoder mixers.
        swap_d_state: SSM state size of the channel-exchange mixers.
        expand, d_conv, dt_rank: Mamba mixer settings.
        channel_exchange: use the channel-exchange stage.
        pyramid: use the DGC pyramid (the released 3D model has none).
        scan_order: order set of the single-modality mixers; default ``cross2d`` (2D) / ``triplane`` (3D);
            ``released3d_single`` reproduces the released 3D code's orders.
        cross_scan_order: order set of the cross-modal mixers (default: ``scan_order``;
            ``released3d_cross`` for the released 3D code).
        negative_slope: LeakyReLU slope.
        reference_compat: reproduce the released code's quirks (delta-bias init of the first direction
            only, token-swap residual wiring, decoder activation layout, dead parameters).
        scan_backend: selective-scan backend for every mixer (None = process default).
        refine: add a :class:`FullResolutionRefinement` before the head (not in the paper; off by default,
            see docs/architecture.md).
        source_selection: mix the head's image per pixel with the sources through a
            :class:`SourceSelectionOutput` (not in the paper; off by default, see docs/architecture.md);
            needs ``out_channels`` 1.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 2,
        out_channels: int = 1,
        features: Sequence[int] = (32, 64, 128),
        dilations: Sequence[int] = (1, 3, 5),
        depth: int = 5,
        decoder_depth: int = 3,
        d_state: int = 8,
        swap_d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        dt_rank: int | str = "auto",
        channel_exchange: bool = True,
        pyramid: bool = True,
        scan_order: str | None = None,
        cross_scan_order: str | None = None,
        negative_slope: float = 0.2,
        reference_compat: bool = False,
        scan_backend: str | None = None,
        refine: bool = False,
        source_selection: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if in_channels != 2:
            raise ValueError(f"ClinicalFMamba fuses two images: in_channels must be 2, got {in_channels}")
        if source_selection and out_channels != 1:
            raise ValueError(
                f"source_selection mixes one fused channel with the sources: out_channels must be 1, got {out_channels}"
            )
        if len(dilations) != len(features):
            raise ValueError(f"one dilation per encoder stage: got {len(dilations)} for {len(features)} stages")
        self.spatial_dims = spatial_dims
        self.size_divisor = 2 ** len(features)
        conv = Conv[Conv.CONV, spatial_dims]
        d_model = features[-1]
        act = nn.LeakyReLU(negative_slope)
        mixer = dict(
            expand=expand,
            d_conv=d_conv,
            dt_rank=dt_rank,
            scan_backend=scan_backend,
            dt_init_all_directions=not reference_compat,
        )

        # shared encoder
        self.stem = conv(1, features[0], 3, padding=1)
        widths = [features[0], *features]
        self.downsamples = nn.ModuleList(conv(widths[i], widths[i + 1], 2, stride=2) for i in range(len(features)))
        self.encoder_blocks = nn.ModuleList(
            DilatedGatedConvBlock(spatial_dims, c, d, pyramid=pyramid, negative_slope=negative_slope)
            for c, d in zip(features, dilations)
        )

        # latent module (the two modality streams are the two members of each module)
        order = scan_order or ("cross2d" if spatial_dims == 2 else "triplane")
        dead_a = 3 if reference_compat and spatial_dims == 2 else 0  # the released 2D mixers allocate 3 unused A
        self.single_blocks = nn.ModuleList(
            ResidualMambaBlock(d_model, members=2, d_state=d_state, order_set=order, dead_a_matrices=dead_a, **mixer)
            for _ in range(depth)
        )
        self.token_swap = TokenSwapStage(d_model, swap_d_state, reference_compat, **mixer) if channel_exchange else None
        self.cross_blocks = CrossMambaBlock(
            d_model, members=2, d_state=d_state, order_set=cross_scan_order or order, dead_a_matrices=dead_a, **mixer
        )
        self.merge = nn.Linear(d_model, d_model)

        # decoder
        self.decoder_blocks = nn.ModuleList(
            ResidualMambaBlock(
                d_model, d_state=d_state, order_set="identity", use_norm=False, dead_norm=reference_compat, **mixer
            )
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(d_model)
        ups = [*reversed(features[:-1]), features[0]]
        ins = [d_model, *ups[:-1]]
        if reference_compat and spatial_dims == 2 and len(features) == 3:
            layouts = [("up", "conv", "norm", "act"), ("up", "conv", "act", "norm"), ("act", "up", "conv", "norm")]
            acts = [nn.ReLU(), nn.ReLU(), nn.LeakyReLU(negative_slope)]
        elif reference_compat and spatial_dims == 3:  # released 3D decoder: no activation after the last stage
            layouts = [("up", "conv", "norm", "act")] * (len(ups) - 1) + [("up", "conv", "norm")]
            acts = [act] * len(ups)
        else:
            layouts, acts = [("up", "conv", "norm", "act")] * len(ups), [act] * len(ups)
        self.up_stages = nn.ModuleList(
            UpStage(spatial_dims, i, o, a, lay) for i, o, a, lay in zip(ins, ups, acts, layouts)
        )
        self.attention = CrossModalChannelAttention(spatial_dims, features[0])
        self.refine = FullResolutionRefinement(spatial_dims, features[0], 2, negative_slope) if refine else None
        self.head = conv(features[0], out_channels, 3, padding=1)
        self.selection = SourceSelectionOutput(spatial_dims, features[0]) if source_selection else None

    def _check_input(self, image: torch.Tensor) -> None:
        if image.dim() != self.spatial_dims + 2 or image.shape[1] != 2:
            dims = "H, W" if self.spatial_dims == 2 else "D, H, W"
            raise ValueError(f"ClinicalFMamba ({self.spatial_dims}D) expects (B, 2, {dims}), got {tuple(image.shape)}")
        bad = [s for s in image.shape[2:] if s % self.size_divisor]
        if bad:
            raise ValueError(
                f"spatial size {tuple(image.shape[2:])} is not divisible by {self.size_divisor}; "
                "pad the input (the bundle transforms pad and crop back automatically)"
            )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 2, *spatial) -> fused (B, 1, *spatial) in [0, 1]."""
        self._check_input(image)
        if isinstance(image, MetaTensor):  # plain tensors inside: no metadata tracking on every op
            image = image.as_tensor()
        features, skips = self.encode(image)
        latent = self.mamba_latent(features)
        return self.decode(latent, skips, image)

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both modalities through the shared encoder: image (B, 2, *S) -> token-grid features (2B, C, *(S / 2^n))
        (modality 0 then 1 on the batch axis) and the full-resolution stem features (2B, features[0], *S)."""
        x = torch.cat([image[:, 0:1], image[:, 1:2]], dim=0)
        skips = self.stem(x)
        f = skips
        for down, block in zip(self.downsamples, self.encoder_blocks):
            f = block(down(f))
        return f, skips

    def mamba_latent(self, features: torch.Tensor) -> torch.Tensor:
        """The Mamba latent module and decoder blocks on the token grid: (2B, C, *grid) -> fused (B, C, *grid)."""
        batch, grid = features.shape[0] // 2, features.shape[2:]
        tokens = features.movedim(1, -1).reshape(2, batch, -1, features.shape[1])  # (2, B, L, C), row-major

        streams = tokens
        for block in self.single_blocks:
            streams = block(streams, grid)
        if self.token_swap is not None:
            streams = self.token_swap(streams, tokens, grid)
        fused = self.cross_blocks(streams, streams.flip(0), grid)  # each stream selects for the other
        latent = self.merge(fused.mean(0, keepdim=True))  # (1, B, L, C)
        for block in self.decoder_blocks:
            latent = block(latent, grid)
        return self.tokens_to_image(self.decoder_norm(latent[0]), grid)  # (B, C, *grid)

    def tokens_to_image(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Row-major tokens (B, L, C) -> image (B, C, *grid)."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

    def decode(self, latent: torch.Tensor, skips: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Up-sampling stages, cross-modal channel attention from both stems, optional refinement, output head:
        latent (B, C, *grid), skips (2B, features[0], *S), image (B, 2, *S) -> fused (B, out_channels, *S)."""
        h = latent
        for up in self.up_stages:
            h = up(h)
        h = self.attention.add_both(h, skips)  # each modality's stem features attend to the other's
        if self.refine is not None:
            h = self.refine(h, image)
        return self.output(h, image)

    def output(self, h: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The head (3x3 conv, sigmoid) and the optional source selection: h (B, features[0], *S) -> (B, 1, *S)."""
        fused = torch.sigmoid(self.head(h))
        if self.selection is not None:
            fused = self.selection(h, fused, image)
        return fused
