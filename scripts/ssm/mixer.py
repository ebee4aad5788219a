"""The Mamba mixer's operations around the scan, as public entry points of the scan engine.

A multi-directional mixer gathers its tokens into every direction's sequence, runs a causal depthwise convolution
and SiLU along each, scans, and merges the directions back into token order (averaged, gated by ``silu(z)``). These
functions do it in plain PyTorch (any dtype, device, autograd) unless the selected backend registers fused
operations (:class:`scripts.ssm.registry.ScanBackend` ``mixer``) that take the inputs; the results are the same.
:func:`fused_mixer_ops` gives a backend's fused operations to code that runs the whole mixer in one kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import get_backend, resolve_backend

__all__ = [
    "causal_conv_silu",
    "causal_conv_silu_reference",
    "fused_mixer_ops",
    "gate_merge_reference",
    "gather_directions",
    "merge_directions",
]


def gather_directions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(M, B, L, C) tokens -> (L, B, G, C): every direction's sequence, time-major (one row gather); ``index`` holds
    the (L, B, G) row numbers of ``x.reshape(-1, C)``."""
    _, batch, length, channels = x.shape
    return x.reshape(-1, channels).index_select(0, index).view(length, batch, -1, channels)


def causal_conv_silu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``silu`` of Mamba's causal depthwise convolution along time, in plain PyTorch (any dtype, autograd).

    x (L, batch, G, P); weight (G, P, K) (tap ``K - 1`` multiplies the current step); bias (G, P).
    """
    width = weight.shape[-1]
    taps = weight.permute(2, 0, 1).contiguous()  # (K, G, P)
    out = torch.addcmul(bias, x, taps[width - 1])
    for shift in range(1, min(width, x.shape[0])):
        out[shift:].addcmul_(x[:-shift], taps[width - 1 - shift])
    return F.silu(out)


def gate_merge_reference(y: torch.Tensor, index: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Directions back to tokens, averaged, times ``silu(z)``, in plain PyTorch (any dtype, autograd).

    y (L, B, M*K, P) scan outputs; index (L*B*M*K,) rows of ``y.reshape(-1, P)`` in (L, B, M, K) order;
    z (M, B, L, P) -> (M, B, L, P).
    """
    members, batch, length, width = z.shape
    aligned = y.reshape(-1, width).index_select(0, index).view(length, batch, members, -1, width)
    return aligned.mean(3).permute(2, 1, 0, 3) * F.silu(z)


def fused_mixer_ops(backend: str | None, device: torch.device | str):
    """The fused mixer operations of the backend that ``backend`` resolves to on ``device``, or None."""
    return get_backend(resolve_backend(backend, device)).mixer


def causal_conv_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, index: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """``silu(causal conv)`` along time of every direction's sequence of the tokens ``x`` (M, B, L, P): the
    direction gather ``index`` (:func:`gather_directions`), then :func:`causal_conv_silu_reference` with weight
    (G, P, K) and bias (G, P) -> (L, B, G, P). A fused backend reads the gather in place."""
    ops = fused_mixer_ops(backend, x.device)
    out = None if ops is None else ops.causal_conv_silu(x, weight, bias, index)
    return causal_conv_silu_reference(gather_directions(x, index), weight, bias) if out is None else out


def merge_directions(
    y: torch.Tensor,
    index: torch.Tensor,
    z: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """Scan outputs y (L, B, M*K, P) back to tokens (M, B, L, P), averaged over directions, times ``silu(z)``
    (:func:`gate_merge_reference`); with ``norm_weight`` and ``norm_bias`` (M, P) then a LayerNorm over P with
    member m's affine. A fused backend does it in one pass."""
    ops = fused_mixer_ops(backend, y.device)
    out = None if ops is None else ops.merge(y, index, z, norm_weight, norm_bias, eps)
    if out is not None:
        return out
    merged = gate_merge_reference(y, index, z)
    if norm_weight is None:
        return merged
    normalised = F.layer_norm(merged, merged.shape[-1:], eps=eps)
    return torch.addcmul(norm_bias[:, None, None], normalised, norm_weight[:, None, None])
