"""Speed as a separate layer: :func:`optimize_for_inference` swaps fast modules into a plain network.

The network (:mod:`scripts.networks.clinicalfmamba`, :mod:`scripts.networks.blocks`, :mod:`scripts.networks.mamba`)
is the paper's model with one plain forward per module; training and export run it as it is. For inference on a
CPU, :func:`optimize_for_inference` changes the class of each module it knows to a subclass here (the mechanism of
:func:`scripts.export.prepare_export`): same parameters, buffers and state-dict keys, same outputs up to float
summation order, fewer passes over full-resolution memory (docs/inference_rewrites.md):

- :class:`FastClinicalFMamba`: channels-last memory in 2D; the stem and first down-sampling composed into one
  convolution of the image; down-sampling convolutions with kept oneDNN weights; the latent image as a view of the
  tokens; head and source-selection logits in one matrix product;
- :class:`FastDilatedGatedConvBlock`: the gate's BatchNorm folded into its 1x1 convolution, activations fused into
  the convolutions, element-wise steps in place;
- :class:`FastUpStage`: nearest up-sampling + 3x3 convolution as one phase-decomposed convolution on the coarse
  grid, the following BatchNorm folded in;
- :class:`FastCrossModalChannelAttention`: the attention added in place by one matrix product per modality;
- :class:`FastFullResolutionRefinement`: the convolution of the concatenation as two convolutions;
- :class:`FusedDirectionalMamba`: the scan engine's fused mixer kernel (causal convolution, x projection, scan and,
  with a thread per (batch, member) set, the direction merge, gate and norm) where the backend has one.

Each fast module runs its fast path only in eval mode, without autograd and outside tracing; otherwise it runs the
plain forward it inherits, so an optimised network can still be trained or traced. The derived weights a fast
module keeps (folded, composed, packed) are its own attributes, keyed by the version counters of the parameters
they come from, so loading a state dict or an optimiser step is picked up on the next call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scripts.ssm import (
    causal_conv_silu,
    fused_mixer_ops,
    gather_directions,
    merge_directions,
    selective_scan_time_major,
)

from .blocks import (
    CrossModalChannelAttention,
    DilatedGatedConvBlock,
    FullResolutionRefinement,
    UpStage,
    pointwise,
    pointwise_conv,
)
from .clinicalfmamba import ClinicalFMamba
from .mamba import DirectionalMamba
from .packed_conv import KeptConvWeights
from .rewrites import (
    batch_norm_tensors,
    channels_last,
    conv3_by_matmul,
    conv3_by_matmul_fits,
    conv3_then_down2,
    fold_batch_norm,
    fold_batch_norm_before,
    foldable_batch_norm,
    interleave_phases,
    is_channels_last,
    source_versions,
    upsample_conv,
    upsample_conv_kernel,
)

__all__ = [
    "FastClinicalFMamba",
    "FastCrossModalChannelAttention",
    "FastDilatedGatedConvBlock",
    "FastFullResolutionRefinement",
    "FastUpStage",
    "FusedDirectionalMamba",
    "optimize_for_inference",
]


def runs_fast(module: nn.Module) -> bool:
    """Whether a fast module may take its fast path now: eval mode, no autograd, not tracing."""
    return not module.training and not torch.is_grad_enabled() and not torch.jit.is_tracing()


class _Fast:
    """Mixin of the swapped-in modules: :meth:`init_fast_state` makes the caches a fast module owns."""

    def init_fast_state(self, packed_conv: bool) -> None:
        self.kept = KeptConvWeights(packed_conv)


class FastClinicalFMamba(_Fast, ClinicalFMamba):
    """:class:`ClinicalFMamba` with the whole-network rewrites (made by :func:`optimize_for_inference`)."""

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not runs_fast(self):
            return super().encode(image)
        x = torch.cat([image[:, 0:1], image[:, 1:2]], dim=0)
        if self.spatial_dims == 2:  # channels-last memory throughout: oneDNN's 3x3 convolutions run faster there; in
            x = channels_last(x)  # 3D the one-channel stem convolution is slower channels-last, so the 3D stem and
            # skips stay NCDHW and the encoder turns channels-last after the composed convolution below
        skips = self.stem(x)
        f = skips
        for i, (down, block) in enumerate(zip(self.downsamples, self.encoder_blocks)):
            if i == 0:  # down(stem(x)) as one convolution of the image
                f = block(channels_last(conv3_then_down2(x, self.stem, down)))
            elif f.dim() == 4:
                sources = [down.weight, down.bias]
                weights = lambda d=down: (d.weight, d.bias)  # noqa: E731
                f = block(self.kept.conv2d(f"down{i}", f, weights, sources, stride=down.stride))
            else:
                f = block(down(f))
        return f, skips

    def tokens_to_image(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        if not runs_fast(self):
            return super().tokens_to_image(tokens, grid)
        return tokens.view(tokens.shape[0], *grid, -1).movedim(-1, 1)  # a channels-last view, no copy

    def output(self, h: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        convs = [self.head] + ([self.selection.logits] if self.selection is not None else [])
        if not runs_fast(self) or not conv3_by_matmul_fits(h, sum(c.out_channels for c in convs)):
            return super().output(h, image)
        # head and selection logits in one pass over h
        biases = [c.bias if c.bias is not None else c.weight.new_zeros(c.out_channels) for c in convs]
        out = conv3_by_matmul(h, torch.cat([c.weight for c in convs]), torch.cat(biases))
        fused = torch.sigmoid(out[:, : self.head.out_channels])
        return fused if self.selection is None else self.selection.mix(out[:, self.head.out_channels :], fused, image)


class FastDilatedGatedConvBlock(_Fast, DilatedGatedConvBlock):
    """:class:`DilatedGatedConvBlock` with fewer passes: the gate's BatchNorm folded into its 1x1 convolution, the
    activations, the gating product and the residual sums in place on fresh outputs; in 2D the 3x3 convolutions with
    kept oneDNN weights and the activations fused into them."""

    def init_fast_state(self, packed_conv: bool) -> None:
        super().init_fast_state(packed_conv)
        self.folded_gate: tuple | None = None  # (source versions, (weight, bias) or None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not runs_fast(self):
            return super().forward(x)
        slope = self.act.negative_slope
        gate = self._folded_gate()
        g = pointwise(x, *gate) if gate is not None else pointwise_conv(self.gate, self.norm_gate(x))
        u = self._conv(self.query, "query", self.norm_query(x), slope).mul_(F.leaky_relu_(g, slope))
        v = self._conv(self.dilated, "dilated", self.norm_mid(u), slope)
        if not self.pyramid:
            return v.add_(x)
        p1 = self._conv(self.pyramid_conv, "pyramid", F.leaky_relu_(self.norm_out(v), slope))
        p2 = self._conv(self.pyramid_conv, "pyramid", p1)
        return (x + p1).add_(p2).add_(self._conv(self.pyramid_conv, "pyramid", p2))

    def _folded_gate(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The gate's 1x1 weight and bias with its BatchNorm folded in, kept until a parameter or statistic changes."""
        key = source_versions([self.gate.weight, self.gate.bias, *batch_norm_tensors(self.norm_gate)])
        if self.folded_gate is None or self.folded_gate[0] != key:
            self.folded_gate = (key, fold_batch_norm_before(self.gate.weight, self.gate.bias, self.norm_gate))
        return self.folded_gate[1]

    def _conv(self, conv: nn.Module, tag: str, x: torch.Tensor, slope: float | None = None) -> torch.Tensor:
        """``conv(x)`` (then LeakyReLU with ``slope``): with kept weights in 2D, the module itself otherwise."""
        if x.dim() == 4:
            return self.kept.conv2d(
                tag, x, lambda: (conv.weight, conv.bias), [conv.weight, conv.bias], padding=conv.padding,
                dilation=conv.dilation, negative_slope=slope,
            )  # fmt: skip
        y = conv(x)
        return y if slope is None else F.leaky_relu_(y, slope)


class FastUpStage(_Fast, UpStage):
    """:class:`UpStage` with "up" right before "conv" as one :func:`upsample_conv` (no up-sampled tensor, 4/9 of the
    multiply-adds in 2D), a BatchNorm right after the conv folded into its weight and bias, and in 2D kept oneDNN
    weights with the activation fused where it comes next."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not runs_fast(self):
            return super().forward(x)
        names, i = self.layout, 0
        while i < len(names):
            if names[i] not in ("up", "conv") or (names[i] == "up" and names[i + 1 : i + 2] != ("conv",)):
                x = getattr(self, names[i])(x)
                i += 1
                continue
            upsample = names[i] == "up"
            i += 2 if upsample else 1
            fold = names[i : i + 1] == ("norm",) and foldable_batch_norm(self.norm)
            i += 1 if fold else 0
            if x.dim() == 4:
                slope = self._fusable_slope() if names[i : i + 1] == ("act",) else None
                i += 1 if slope is not None else 0
                x = self._conv2d_kept(x, upsample, fold, slope)
                continue
            weight, bias = self._conv_weights(fold)
            x = upsample_conv(x, weight, bias) if upsample else self.conv._conv_forward(x, weight, bias)
        return x

    def _conv_weights(self, fold: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The conv's weight and bias, with the following BatchNorm folded in when ``fold``."""
        if fold:
            return fold_batch_norm(self.conv.weight, self.conv.bias, self.norm)
        return self.conv.weight, self.conv.bias

    def _fusable_slope(self) -> float | None:
        """The negative slope of the activation as a LeakyReLU (0 for ReLU), None for any other activation."""
        if isinstance(self.act, nn.LeakyReLU):
            return float(self.act.negative_slope)
        return 0.0 if isinstance(self.act, nn.ReLU) else None

    def _conv2d_kept(self, x: torch.Tensor, upsample: bool, fold: bool, slope: float | None) -> torch.Tensor:
        """The 2D conv (after "up": the phase convolution of :func:`upsample_conv`; with ``fold``: the norm folded in)
        with kept weights, then ``leaky_relu(., slope)`` fused when a slope is given (it commutes with the
        interleaving of the phases)."""
        sources = [self.conv.weight, self.conv.bias, *(batch_norm_tensors(self.norm) if fold else [])]

        def weights():
            weight, bias = self._conv_weights(fold)
            return upsample_conv_kernel(weight, bias) if upsample else (weight, bias)

        tag = f"conv{'_up' if upsample else ''}{'_norm' if fold else ''}"
        y = self.kept.conv2d(tag, x, weights, sources, padding=1, negative_slope=slope)
        return interleave_phases(y, self.conv.out_channels) if upsample else y


class FastCrossModalChannelAttention(_Fast, CrossModalChannelAttention):
    """:class:`CrossModalChannelAttention` whose ``add_to``/``add_both`` update ``h`` in place by one matrix product
    with the channel weights folded into ``W_v`` (no scaled copy, no sum pass), and whose channel weights take the
    mean of ``W_q q`` as ``W_q`` times the mean of ``q`` (a linear map commutes with the mean)."""

    def add_to(self, h: torch.Tensor, query: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        if not self._adds_in_place(h, ref):
            return super().add_to(h, query, ref)
        return self._add_weighted(h, ref, self._weights(query))

    def add_both(self, h: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        if not self._adds_in_place(h, pair):
            return super().add_both(h, pair)
        batch = pair.shape[0] // 2
        weights = self._weights(pair)  # both modalities' channel weights in one batched pass
        return self._add_weighted(self._add_weighted(h, pair[batch:], weights[:batch]), pair[:batch], weights[batch:])

    def _adds_in_place(self, h: torch.Tensor, ref: torch.Tensor) -> bool:
        same_layout = is_channels_last(h) == is_channels_last(ref)
        return runs_fast(self) and same_layout and (h.is_contiguous() or is_channels_last(h))

    def _add_weighted(self, h: torch.Tensor, ref: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``h += (W_v ref) * weights`` in place, as one matrix product with the weights folded into W_v."""
        batch, channels = ref.shape[:2]
        scaled = weights.unsqueeze(-1) * self.value.weight.view(1, -1, channels)  # (B, C_out, C_in)
        if is_channels_last(h):  # (B, voxels, C) rows as they lie
            rows = h.movedim(1, -1).view(batch, -1, h.shape[1])
            rows.baddbmm_(ref.movedim(1, -1).reshape(batch, -1, channels), scaled.transpose(1, 2))
        else:
            h.view(batch, -1, h[0, 0].numel()).baddbmm_(scaled, ref.reshape(batch, channels, -1))
        return h

    def _weights(self, query: torch.Tensor) -> torch.Tensor:
        if not runs_fast(self):
            return super()._weights(query)
        a = pointwise_conv(self.query, query)
        spatial = tuple(range(2, a.dim()))  # reduced in place, whatever the memory layout
        mean = query.mean(dim=spatial) @ self.query.weight.view(a.shape[1], -1).t()
        if self.query.bias is not None:
            mean = mean + self.query.bias
        return torch.sigmoid(a.amax(dim=spatial) + mean)


class FastFullResolutionRefinement(_Fast, FullResolutionRefinement):
    """:class:`FullResolutionRefinement` with ``mix(cat(h, image))`` as two convolutions (no concatenated copy, no
    34-channel convolution), kept oneDNN weights in 2D, and the sums in place."""

    def forward(self, h: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if not runs_fast(self):
            return super().forward(h, image)
        image = image.to(h.dtype)
        if is_channels_last(h):
            image = channels_last(image)  # both convolutions then return h's layout
        channels, weight, slope = h.shape[1], self.mix.weight, self.act.negative_slope
        if h.dim() == 4:
            sources = [self.mix.weight, self.mix.bias]
            mixed = self.kept.conv2d("mix_h", h, lambda: (weight[:, :channels], self.mix.bias), sources, padding=1)
            from_image = self.kept.conv2d("mix_image", image, lambda: (weight[:, channels:], None), sources, padding=1)
            mixed = mixed.add_(from_image)
            out = self.kept.conv2d(
                "out", F.leaky_relu_(mixed, slope), lambda: (self.out.weight, self.out.bias),
                [self.out.weight, self.out.bias], padding=1,
            )  # fmt: skip
            return out.add_(h)
        mixed = self.mix._conv_forward(h, weight[:, :channels], self.mix.bias)
        mixed = mixed.add_(self.mix._conv_forward(image, weight[:, channels:], None))  # fresh tensors: in place
        return self.out(F.leaky_relu_(mixed, slope)).add_(h)


class FusedDirectionalMamba(DirectionalMamba):
    """:class:`DirectionalMamba` running the scan engine's fused mixer kernel where the backend has one
    (:func:`scripts.ssm.fused_mixer_ops`) and it takes the inputs: the causal convolution reads the direction gather
    in place, and convolution, x projection and scan (with a thread per (batch, member) set also the direction
    merge, gate and output norm) run as one pass per lane, so the time-major intermediates are never written. The
    kernel's weight layouts are kept until a parameter changes."""

    def init_fast_state(self, packed_conv: bool) -> None:
        self.kernel_weights: tuple | None = None  # (parameter versions, the backend's prepared weights)

    def scan_directions(
        self,
        xs: torch.Tensor,
        z: torch.Tensor,
        extra: torch.Tensor | None,
        A: torch.Tensor,
        forward_index: torch.Tensor,
        backward_index: torch.Tensor,
    ) -> torch.Tensor:
        ops = fused_mixer_ops(self.scan_backend, xs.device)
        if ops is None or not runs_fast(self):
            return super().scan_directions(xs, z, extra, A, forward_index, backward_index)
        n, r, norm, batch = self.d_state, self.dt_rank, self.norm, xs.shape[1]
        lanes = batch * self.members * self.num_directions
        if ops.fused_supported(xs, self.d_inner, n, r, self.d_conv, lanes, *self.parameters()):
            merge = ops.fused_merges(batch * self.members, self.d_inner, norm is not None)
            norm_args = dict(norm_weight=norm.weight, norm_bias=norm.bias, eps=norm.eps) if norm is not None else {}
            y = ops.fused(
                xs, forward_index, *self._conv_parameters(), self.x_proj_weight, self.dt_proj_weight, self.dt_proj_bias,
                A, self.D, source=extra, **(dict(z=z, **norm_args) if merge else {}),
                prepared=self._prepared(ops, A, norm if merge else None), check_index=False,
            )  # fmt: skip
            if merge:  # merged, gated and normalised in the kernel
                return y
        else:
            u = causal_conv_silu(xs, *self._conv_parameters(), forward_index, backend=self.scan_backend)
            source = u if extra is None else gather_directions(extra, forward_index)
            dt, b_sel, c_sel = torch.einsum("lbgp,gcp->lbgc", source, self.x_proj_weight).split([r, n, n], dim=-1)
            y = selective_scan_time_major(
                u, dt, A, b_sel, c_sel, self.D, delta_bias=self.dt_proj_bias, delta_softplus=True,
                backend=self.scan_backend, delta_proj_weight=self.dt_proj_weight,
            )  # fmt: skip
        if norm is None:
            return merge_directions(y, backward_index, z, backend=self.scan_backend)
        return merge_directions(y, backward_index, z, norm.weight, norm.bias, norm.eps, backend=self.scan_backend)

    def _prepared(self, ops, A: torch.Tensor, norm: nn.Module | None):
        """The fused kernel's weight layouts, kept while no parameter changes (each parameter's identity, storage and
        version counter make the key)."""
        params = [self.conv_weight, self.conv_bias, self.x_proj_weight, self.dt_proj_weight, self.dt_proj_bias]
        params += [self.A_log, self.D]
        params += [norm.weight, norm.bias] if norm is not None else []
        key = source_versions(params)
        if self.kernel_weights is None or self.kernel_weights[0] != key:
            weights = ops.prepare_fused(
                *self._conv_parameters(), self.x_proj_weight, self.dt_proj_weight, self.dt_proj_bias, A, self.D,
                None if norm is None else norm.weight, None if norm is None else norm.bias,
            )  # fmt: skip
            self.kernel_weights = (key, weights)
        return self.kernel_weights[1]


_SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    ClinicalFMamba: FastClinicalFMamba,
    DilatedGatedConvBlock: FastDilatedGatedConvBlock,
    UpStage: FastUpStage,
    CrossModalChannelAttention: FastCrossModalChannelAttention,
    FullResolutionRefinement: FastFullResolutionRefinement,
    DirectionalMamba: FusedDirectionalMamba,
}


def optimize_for_inference(net: nn.Module, packed_conv: bool = True) -> nn.Module:
    """Swap the fast modules into ``net`` in place (and return it) for inference.

    Every module whose class is one of the plain classes above (by module and name, so a network built from an
    earlier import of this package, as a MONAI Label app re-imports it, matches too; sub-classes such as the
    export's traceable modules are left alone) becomes its fast subclass. Parameters, buffers and state-dict keys are
    unchanged, so weights can be loaded before or after. Applying it again keeps what the fast modules hold, unless
    ``packed_conv`` changes. Any module works: one without ClinicalFMamba parts (a baseline, a TorchScript model) is
    returned unchanged.

    Args:
        net: the network (or any module containing its blocks).
        packed_conv: keep 2D convolution weights in oneDNN's layout (``False``: ``F.conv2d`` with the same weights).
    """
    swaps = {(plain.__module__, plain.__qualname__): fast for plain, fast in _SWAPS.items()}
    fast_classes = {(fast.__module__, fast.__qualname__) for fast in _SWAPS.values()}
    for module in net.modules():
        name = (type(module).__module__, type(module).__qualname__)
        if name in swaps:
            module.__class__ = swaps[name]
        elif name not in fast_classes or getattr(module, "fast_packed_conv", None) == packed_conv:
            continue
        module.init_fast_state(packed_conv)
        module.fast_packed_conv = packed_conv
    return net
