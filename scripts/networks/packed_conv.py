"""2D convolutions at inference with their weights kept in oneDNN's blocked layout, and the activation fused.

``F.conv2d`` on a channels-last float32 tensor reorders the (O, C, kh, kw) weight into oneDNN's blocked layout on
every call: 0.1-0.4 ms per convolution of the encoder, 10-15% of each at 256 x 256 (docs/performance.md, session 9).
:func:`inference_conv2d` reorders it once, keeps it on the module that owns the weight (with the folded or composed
weight the caller derives from the parameters), and runs oneDNN's convolution with the kept weight, a LeakyReLU/ReLU
fused in as its post-op where asked. The kept weight is keyed by each source tensor's identity, storage and version
counter (bumped by every in-place update) and the input shape, so a changed parameter is picked up on the next call.

Used only where the inference rewrites run (:func:`~scripts.networks.rewrites.rewrites_apply`: eval mode, no
autograd); anything else (float64, NCHW memory, 3D, no oneDNN, a PyTorch without these operators) takes ``F.conv2d``
with the same weights, so the results are the same either way (oneDNN computes both).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .rewrites import source_versions

__all__ = ["inference_conv2d", "packed_conv_available", "set_packed_conv"]

_logger = logging.getLogger(__name__)
_state: dict[str, bool | None] = {"enabled": True, "available": None}
WeightFn = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]


def packed_conv_available() -> bool:
    """Whether this PyTorch has oneDNN and the operators for kept weights (checked once)."""
    if _state["available"] is None:
        ops = getattr(torch.ops, "mkldnn", None)
        _state["available"] = bool(
            torch.backends.mkldnn.is_available()
            and ops is not None and hasattr(ops, "_convolution_pointwise")
            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
        )  # fmt: skip
    return bool(_state["available"]) and bool(_state["enabled"])


def set_packed_conv(enabled: bool) -> None:
    """Turn the kept-weight path on or off for the process (tests compare both)."""
    _state["enabled"] = bool(enabled)


def _pair(v: int | Sequence[int]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(s) for s in v]


def inference_conv2d(
    owner: nn.Module, tag: str, x: torch.Tensor, weights: WeightFn, sources: Sequence[torch.Tensor],
    stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
    negative_slope: float | None = None,
) -> torch.Tensor:
    """``conv2d(x, *weights(), stride, padding, dilation)``, then ``leaky_relu(., negative_slope)`` when a slope is
    given (0 for ReLU). x: (B, C, H, W) -> (B, O, H', W') in x's memory layout.

    ``weights`` derives (weight (O, C, kh, kw), bias (O,) or None) from ``sources`` (the parameters and buffers it
    reads); its result, and the weight in oneDNN's layout, are kept on ``owner`` under ``tag`` until a source
    changes. Call it only at inference (no autograd).
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    fast = (
        packed_conv_available() and x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu"
        and x.shape[1] > 1 and x.stride(1) == 1
    )  # fmt: skip
    cache = owner.__dict__.setdefault("_inference_conv_weights", {})
    key = (fast, source_versions(sources), tuple(x.shape))
    entry = cache.get(tag)
    if entry is None or entry[0] != key:
        weight, bias = weights()
        packed = None
        if fast:
            try:
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    weight.detach().float().contiguous().to_mkldnn(), padding, stride, dilation, 1, list(x.shape)
                )
            except RuntimeError as exc:  # an operator this build lacks: the plain path from now on
                _logger.warning("oneDNN weight reorder unavailable, using F.conv2d (%s)", exc)
                _state["available"] = False
        bias = None if bias is None else bias.detach()
        if packed is not None and bias is not None:
            bias = bias.float().contiguous()
        entry = cache[tag] = (key, weight.detach(), bias, packed)
    _, weight, bias, packed = entry
    if packed is not None:
        attr, scalars = ("none", []) if negative_slope is None else ("leaky_relu", [float(negative_slope)])
        try:
            return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, padding, stride, dilation, 1, attr, scalars, "")
        except RuntimeError as exc:  # an internal operator whose signature changed: the plain path from now on
            _logger.warning("oneDNN convolution with a kept weight failed, using F.conv2d (%s)", exc)
            _state["available"] = False
            cache.clear()
            bias = None if bias is None else bias.to(x.dtype)
    y = F.conv2d(x, weight, bias, stride, padding, dilation)
    return y if negative_slope is None else F.leaky_relu_(y, negative_slope)
