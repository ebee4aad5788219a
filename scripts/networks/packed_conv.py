"""2D convolutions at inference with their weights kept in oneDNN's blocked layout, and the activation fused.

``F.conv2d`` on a channels-last float32 tensor reorders the (O, C, kh, kw) weight into oneDNN's blocked layout on
every call, a sizeable share of each encoder convolution at 256 x 256. A :class:`KeptConvWeights` (one per module
that :func:`scripts.networks.optimize.optimize_for_inference` swaps in) reorders it once, keeps it with the folded
or composed weight the caller derives from the parameters, and runs oneDNN's convolution with the kept weight, a
LeakyReLU/ReLU fused in as its post-op where asked. A kept weight is keyed by each source tensor's identity, storage
and version counter (bumped by every in-place update) and the input shape, so a changed parameter is picked up on
the next call.

Anything else (float64, NCHW memory, no oneDNN, a PyTorch without these operators, ``packed=False``) takes
``F.conv2d`` with the same weights, so the results are the same either way (oneDNN computes both). Whether this
PyTorch build has the operators is a property of the process (:func:`packed_conv_available`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .rewrites import source_versions

__all__ = ["KeptConvWeights", "packed_conv_available"]

_logger = logging.getLogger(__name__)
_available: list[bool] = []  # [] until checked; this PyTorch build's operators, the same for the whole process
WeightFn = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]


def packed_conv_available() -> bool:
    """Whether this PyTorch has oneDNN and the operators for kept weights (checked once per process)."""
    if not _available:
        ops = getattr(torch.ops, "mkldnn", None)
        _available.append(
            bool(
                torch.backends.mkldnn.is_available()
                and ops is not None and hasattr(ops, "_convolution_pointwise")
                and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
            )
        )  # fmt: skip
    return _available[0]


def _operators_failed(exc: Exception, what: str) -> None:
    """An operator this build lacks or whose signature changed: the plain path for the rest of the process."""
    _logger.warning("%s, using F.conv2d (%s)", what, exc)
    _available[:] = [False]


def _pair(v: int | Sequence[int]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(s) for s in v]


class KeptConvWeights:
    """Derived 2D convolution weights of one module, kept between inference calls under a tag each.

    Args:
        packed: keep the weights in oneDNN's layout where the input allows (False: always ``F.conv2d``).
    """

    def __init__(self, packed: bool = True) -> None:
        self.packed = packed
        self._entries: dict[str, tuple] = {}

    def clear(self) -> None:
        """Forget every kept weight."""
        self._entries.clear()

    def conv2d(
        self,
        tag: str,
        x: torch.Tensor,
        weights: WeightFn,
        sources: Sequence[torch.Tensor],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        negative_slope: float | None = None,
    ) -> torch.Tensor:
        """``conv2d(x, *weights(), stride, padding, dilation)``, then ``leaky_relu(., negative_slope)`` when a slope is
        given (0 for ReLU). x: (B, C, H, W) -> (B, O, H', W') in x's memory layout.

        ``weights`` derives (weight (O, C, kh, kw), bias (O,) or None) from ``sources`` (the parameters and buffers it
        reads); its result, and the weight in oneDNN's layout, are kept under ``tag`` until a source changes. Call it
        only at inference (no autograd).
        """
        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
        fast = (
            self.packed and packed_conv_available() and x.dim() == 4 and x.dtype == torch.float32
            and x.device.type == "cpu" and x.shape[1] > 1 and x.stride(1) == 1
        )  # fmt: skip
        key = (fast, source_versions(sources), tuple(x.shape))
        entry = self._entries.get(tag)
        if entry is None or entry[0] != key:
            weight, bias = weights()
            packed = None
            if fast:
                try:
                    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                        weight.detach().float().contiguous().to_mkldnn(), padding, stride, dilation, 1, list(x.shape)
                    )
                except RuntimeError as exc:
                    _operators_failed(exc, "oneDNN weight reorder unavailable")
            bias = None if bias is None else bias.detach()
            if packed is not None and bias is not None:
                bias = bias.float().contiguous()
            entry = self._entries[tag] = (key, weight.detach(), bias, packed)
        _, weight, bias, packed = entry
        if packed is not None:
            attr, scalars = ("none", []) if negative_slope is None else ("leaky_relu", [float(negative_slope)])
            try:
                return torch.ops.mkldnn._convolution_pointwise(
                    x, packed, bias, padding, stride, dilation, 1, attr, scalars, ""
                )
            except RuntimeError as exc:
                _operators_failed(exc, "oneDNN convolution with a kept weight failed")
                self.clear()
                bias = None if bias is None else bias.to(x.dtype)
        y = F.conv2d(x, weight, bias, stride, padding, dilation)
        return y if negative_slope is None else F.leaky_relu_(y, negative_slope)
