"""Inference rewrites: the same layers computed with fewer passes over full-resolution memory.

Each function computes exactly what a plain layer sequence computes (up to float summation order). The network
itself never calls them: :func:`scripts.networks.optimize.optimize_for_inference` swaps in modules that do, for
eval mode without autograd (docs/inference_rewrites.md), so training, export and the benchmark's FLOP count run
the plain layers.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "batch_norm_affine",
    "batch_norm_tensors",
    "channels_last",
    "compose_conv3_and_down2",
    "conv3_by_matmul",
    "conv3_by_matmul_fits",
    "conv3_then_down2",
    "fold_batch_norm",
    "fold_batch_norm_before",
    "foldable_batch_norm",
    "interleave_phases",
    "is_channels_last",
    "source_versions",
    "upsample_conv",
    "upsample_conv_kernel",
]


def source_versions(tensors) -> tuple:
    """A key that changes when any of ``tensors`` is replaced or updated in place: identity, storage, version counter
    (bumped by optimiser steps and ``load_state_dict``) and dtype of each. Inference caches of derived weights use
    it."""
    return tuple((id(t), t.data_ptr(), t._version, t.dtype) for t in tensors)


def batch_norm_tensors(norm: nn.Module) -> list[torch.Tensor]:
    """The affine parameters and running statistics a BatchNorm fold reads (those that exist)."""
    return [t for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var) if t is not None]


def foldable_batch_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` is a BatchNorm in eval mode with running statistics (an affine map :func:`batch_norm_affine`
    can give)."""
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training and norm.running_mean is not None


def batch_norm_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) with ``norm(x) = scale * x + shift`` per channel, for a BatchNorm in eval mode with running
    statistics; None for anything else."""
    if not foldable_batch_norm(norm):
        return None
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    return scale, shift if norm.bias is None else shift + norm.bias


def fold_batch_norm(
    weight: torch.Tensor, bias: torch.Tensor | None, norm: nn.Module
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Weight and bias of ``norm(conv(x))`` as one convolution, for a BatchNorm in eval mode with running
    statistics; None when ``norm`` is anything else (the caller keeps it as a layer)."""
    affine = batch_norm_affine(norm)
    if affine is None:
        return None
    scale, shift = affine
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), shift if bias is None else shift + bias * scale


def fold_batch_norm_before(
    weight: torch.Tensor, bias: torch.Tensor | None, norm: nn.Module
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Weight and bias of ``conv(norm(x))`` as one convolution, for a kernel-size-1 ``conv`` (no padding, so exact)
    after a BatchNorm in eval mode with running statistics; None when ``norm`` cannot be folded."""
    if any(k != 1 for k in weight.shape[2:]):
        raise ValueError(
            f"only kernel-size-1 convolutions fold a norm before them exactly, got kernel {tuple(weight.shape[2:])}"
        )
    affine = batch_norm_affine(norm)
    if affine is None:
        return None
    scale, shift = affine
    folded_bias = weight.flatten(1) @ shift  # (O, C) @ (C,)
    return weight * scale.view(1, -1, *([1] * (weight.dim() - 2))), folded_bias if bias is None else bias + folded_bias


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether x (B, C, *S) keeps its channels innermost in memory (C > 1: a single channel is either layout)."""
    return x.dim() > 2 and x.shape[1] > 1 and x.stride(1) == 1


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x in channels-last memory (a copy only if it is not already). A single channel gets a channel stride of 1
    (the same memory), so that convolutions of it return channels-last outputs."""
    if x.shape[1] == 1:
        strides = list(x.stride())
        strides[1] = 1
        return x.as_strided(x.shape, strides) if x.is_contiguous() else channels_last(x.contiguous())
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv(upsample_nearest_x2(x), weight, bias, padding=1)`` for a 3^d kernel, without the up-sampled tensor.

    Every output phase (one of 2^d offsets on the fine grid) is a 2^d-tap convolution of the coarse input, so
    one convolution with 2^d * O outputs and 2^d-tap kernels (4/9 of the multiply-adds in 2D, 8/27 in 3D) gives
    all phases (:func:`upsample_conv_kernel`); they are interleaved into the fine grid (:func:`interleave_phases`).
    x: (B, C, *S) -> (B, O, *(2 S)).
    """
    dims = x.dim() - 2
    kernel, phase_bias = upsample_conv_kernel(weight, bias)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    return interleave_phases(conv(x, kernel, phase_bias, padding=1), weight.shape[0])


def upsample_conv_kernel(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The phase convolution of :func:`upsample_conv`: weight (O, C, 3, ..) -> (2^d O, C, 2, ..) and bias (2^d O,),
    to be applied to the coarse input with padding 1."""
    dims = weight.dim() - 2
    out_channels = weight.shape[0]
    # (O, C, 3, ..): each spatial axis becomes (phase, 2 taps); phase 0 sees input p-1 and p, phase 1 p and p+1
    kernel = weight
    for axis in range(dims):  # layout before: (phase_0 .. phase_{axis-1}, O, C, tap_0 .. tap_{axis-1}, 3, ..)
        w0, w1, w2 = kernel.unbind(2 * axis + 2)
        phase0, phase1 = torch.stack([w0, w1 + w2], 2 * axis + 2), torch.stack([w0 + w1, w2], 2 * axis + 2)
        kernel = torch.stack([phase0, phase1], axis)
    kernel = kernel.reshape(2**dims * out_channels, *kernel.shape[dims + 1 :])  # (2^d O, C, 2, ..)
    return kernel, None if bias is None else bias.repeat(2**dims)


def interleave_phases(phases: torch.Tensor, out_channels: int) -> torch.Tensor:
    """The phase convolution's output (B, 2^d O, *(S + 1)) interleaved into the fine grid (B, O, *(2 S)), in the
    memory layout it came in."""
    dims = phases.dim() - 2
    size, batch = [s - 1 for s in phases.shape[2:]], phases.shape[0]
    fine = list(itertools.chain.from_iterable((s, 2) for s in size))
    if is_channels_last(phases):  # channels-last in, channels-last out: interleave rows of O channels
        phases = phases.movedim(1, -1).view(batch, *phases.shape[2:], *([2] * dims), out_channels)
        out = phases.new_empty(batch, *fine, out_channels)
        for phase in itertools.product((0, 1), repeat=dims):
            target = (slice(None), *itertools.chain.from_iterable((slice(None), p) for p in phase), slice(None))
            source = (slice(None), *(slice(p, p + s) for p, s in zip(phase, size)), *phase, slice(None))
            out[target] = phases[source]
        return out.view(batch, *(2 * s for s in size), out_channels).movedim(-1, 1)
    phases = phases.view(batch, *([2] * dims), out_channels, *phases.shape[2:])
    out = phases.new_empty(batch, out_channels, *fine)
    for phase in itertools.product((0, 1), repeat=dims):
        target = (slice(None), slice(None), *itertools.chain.from_iterable((slice(None), p) for p in phase))
        source = (slice(None), *phase, slice(None), *(slice(p, p + s) for p, s in zip(phase, size)))
        out[target] = phases[source]
    return out.view(batch, out_channels, *(2 * s for s in size))


MATMUL_MAPS_LIMIT = 256 * 2**20  # bytes of per-tap maps conv3_by_matmul may hold at once


def conv3_by_matmul_fits(x: torch.Tensor, out_channels: int) -> bool:
    """Whether :func:`conv3_by_matmul`'s per-tap maps (3^d x outputs per voxel) stay under ``MATMUL_MAPS_LIMIT``;
    a whole large volume falls back to the convolution instead of holding them."""
    voxels = x.shape[0] * x[0, 0].numel()
    return 3 ** (x.dim() - 2) * out_channels * voxels * x.element_size() <= MATMUL_MAPS_LIMIT


def conv3_by_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv(x, weight, bias, padding=1)`` for a 3^d kernel with few outputs, as one matrix product and shifted sums.

    oneDNN runs a convolution with 1-3 outputs far below the machine's rate; here every tap's O outputs come from
    one (3^d O, C) x (C, N) product over the voxels, then each tap's map is added at its offset (zero padding
    outside). Same multiply-adds as the convolution. x: (B, C, *S) -> (B, O, *S).
    """
    dims = x.dim() - 2
    batch, channels = x.shape[:2]
    size = x.shape[2:]
    out_channels = weight.shape[0]
    per_tap = weight.permute(*range(2, 2 + dims), 0, 1).reshape(-1, channels)  # (3^d O, C)
    centre = (3**dims) // 2
    # (B, C, N) columns of voxels: in channels-last memory the transposed rows as they lie (no copy); the maps come out
    # planar (B, 3^d, O, *S), so that the shifted sums below run along contiguous rows (in channels-last maps, with O
    # values per voxel, they run about 2x slower)
    columns = (
        x.movedim(1, -1).reshape(batch, -1, channels).transpose(1, 2)
        if is_channels_last(x)
        else x.reshape(batch, channels, -1)
    )
    maps = torch.matmul(per_tap, columns).view(batch, 3**dims, out_channels, *size)
    out = maps[:, centre].clone() if bias is None else maps[:, centre] + bias.view(-1, *([1] * dims))
    for tap, offset in enumerate(itertools.product((-1, 0, 1), repeat=dims)):
        if tap == centre:
            continue
        target = (slice(None), slice(None), *(slice(max(0, -o), s - max(0, o)) for o, s in zip(offset, size)))
        source = (slice(None), tap, slice(None), *(slice(max(0, o), s - max(0, -o)) for o, s in zip(offset, size)))
        out[target] += maps[source]
    return out


def compose_conv3_and_down2(
    conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, down_weight: torch.Tensor, down_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``down(conv(x))`` as one convolution with a 4^d kernel, stride 2, padding 1, where ``conv`` is
    a 3^d convolution with padding 1 and ``down`` a 2^d convolution with stride 2 (no activation between).

    Exact at the borders too: every ``conv`` output that ``down`` reads lies inside the image, where ``conv`` sees
    the zero-padded input, which the composed convolution's padding of 1 reproduces. The encoder's first
    down-sampling then reads the one-channel image instead of the 32-channel stem output (a quarter of the
    multiply-adds' memory traffic; oneDNN runs the composed convolution several times faster).
    """
    dims = conv_weight.dim() - 2
    out_channels = down_weight.shape[0]
    kernel = conv_weight.new_zeros(out_channels, conv_weight.shape[1], *([4] * dims))
    for offset in itertools.product((0, 1), repeat=dims):
        tap = down_weight[(slice(None), slice(None), *offset)]  # (O, C_mid)
        window = (slice(None), slice(None), *(slice(o, o + 3) for o in offset))
        kernel[window] += torch.tensordot(tap, conv_weight, dims=([1], [0]))  # (O, C_in, 3, ..)
    bias = down_weight.new_zeros(out_channels) if down_bias is None else down_bias.clone()
    if conv_bias is not None:
        bias = bias + torch.einsum("oc...,c->o", down_weight, conv_bias)
    return kernel, bias


def conv3_then_down2(x: torch.Tensor, conv: nn.Module, down: nn.Module) -> torch.Tensor:
    """``down(conv(x))`` for the encoder's stem (3^d, padding 1) and first down-sampling (2^d, stride 2) modules, as
    the one convolution of :func:`compose_conv3_and_down2`. x: (B, C_in, *S) -> (B, O, *(S / 2))."""
    dims = x.dim() - 2
    if (
        conv.kernel_size != (3,) * dims
        or conv.padding != (1,) * dims
        or conv.stride != (1,) * dims
        or conv.dilation != (1,) * dims
    ):
        raise ValueError(f"expected a 3^d convolution with padding 1, got {conv}")
    if (
        down.kernel_size != (2,) * dims
        or down.stride != (2,) * dims
        or down.padding != (0,) * dims
        or down.dilation != (1,) * dims
    ):
        raise ValueError(f"expected a 2^d convolution with stride 2, got {down}")
    if conv.groups != 1 or down.groups != 1:
        raise ValueError("grouped convolutions are not composed")
    weight, bias = compose_conv3_and_down2(conv.weight, conv.bias, down.weight, down.bias)
    return (F.conv1d, F.conv2d, F.conv3d)[dims - 1](x, weight, bias, stride=2, padding=1)
