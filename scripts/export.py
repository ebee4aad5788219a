"""TorchScript and ONNX export of ClinicalFMamba (see docs/export.md).

Export works by **tracing** (``torch.jit.trace`` / ``torch.onnx.export(dynamo=False)``) a network
prepared by :func:`prepare_export`, which swaps in sub-classes and changes no weights and no
state-dict keys:

- every Mamba mixer uses the ``export`` selective-scan backend (:mod:`scripts.ssm.export`), a
  ``torch.jit.script`` function whose time loop stays a loop in the traced graph, with the sequence
  length read from the input at run time;
- every mixer builds its scan-order gather indices from the token grid with tensor ops instead of a
  Python-side cache, so the tracer records them as functions of the input size; they (and the
  channel-exchange mask) are made from the input tensor, so the graph holds no device constant;
- LayerNorms get a constant normalised shape (ONNX needs one).

The traced graph therefore has no size baked in: an exported model accepts any batch size and any
spatial size. :class:`ExportableClinicalFMamba` also pads the input (zeros, symmetric, like the
bundle's ``DivisiblePadd``) to a multiple of ``2 ** len(features)`` and crops the output back, so
sizes that are not multiples of 8 work too and give what the inference workflow gives.

Why not ``torch.jit.script`` the whole network: the mixers take a Python ``grid`` sequence, keep a
dict cache and use keyword-argument plumbing that TorchScript does not compile; tracing plus one
scripted loop keeps the eager code as it is.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scripts.networks.clinicalfmamba import ClinicalFMamba, TokenSwapStage
from scripts.networks.mamba import DirectionalMamba, MemberLayerNorm
from scripts.networks.scan_orders import scan_orders

__all__ = [
    "EXPORT_BACKEND",
    "ExportableClinicalFMamba",
    "TraceableDirectionalMamba",
    "TraceableMemberLayerNorm",
    "TraceableTokenSwapStage",
    "ONNX_INPUT",
    "ONNX_OPSET",
    "ONNX_OUTPUT",
    "export_onnx",
    "export_torchscript",
    "onnx_dynamic_axes",
    "prepare_export",
    "traced_scan_orders",
]

EXPORT_BACKEND = "export"

#: scan-order sets as raster axis orders (slowest to fastest), each visited forward and reverse or not
_ORDER_AXES: dict[str, tuple[tuple[tuple[int, ...], ...], bool]] = {
    "identity": (((0,), (0, 1), (0, 1, 2)), False),  # one order: row-major for the grid's rank
    "cross2d": (((0, 1), (1, 0)), True),
    "triplane": (((0, 1, 2), (1, 2, 0), (2, 1, 0)), True),
}


def _arange(like: torch.Tensor, n: Any) -> torch.Tensor:
    """``arange(n)`` (int64) on ``like``'s device; traced without a device constant, so a traced model can move."""
    return like.new_ones(n, dtype=torch.long).cumsum(0) - 1


def traced_scan_orders(name: str, grid: Sequence[Any], like: torch.Tensor | None = None) -> torch.Tensor:
    """The (K, L) scan orders of :func:`scripts.networks.scan_orders.scan_orders` built with tensor ops.

    ``grid`` may hold traced sizes (0-dim tensors during ``torch.jit.trace``), so the orders become
    functions of the input size in the exported graph instead of constants. The orders are created on
    ``like``'s device (default CPU).
    """
    if name not in _ORDER_AXES:
        raise ValueError(f"scan order set {name!r} has no export form; known: {sorted(_ORDER_AXES)}")
    axes_list, forward_reverse = _ORDER_AXES[name]
    if name == "identity":
        axes_list = tuple(a for a in axes_list if len(a) == len(grid))
    elif any(len(a) != len(grid) for a in axes_list):
        raise ValueError(f"scan order {name!r} does not fit a {len(grid)}-D token grid {tuple(grid)}")
    length = grid[0]
    for size in grid[1:]:
        length = length * size
    index = _arange(torch.empty(0) if like is None else like, length).reshape(list(grid))
    orders = []
    for axes in axes_list:
        order = index.permute(list(axes)).reshape(-1)
        orders.extend([order, order.flip(0)] if forward_reverse else [order])
    return torch.stack(orders)


class TraceableDirectionalMamba(DirectionalMamba):
    """A :class:`DirectionalMamba` whose gather indices are tensor functions of the grid (no cache).

    Same parameters, same outputs; the indices are built on the input's device from its traced size.
    Made by :func:`prepare_export`.
    """

    def forward(self, x: torch.Tensor, grid: Sequence[Any], extra: torch.Tensor | None = None) -> torch.Tensor:
        self._like = x  # _gather_index gets only a device; it builds the indices from this tensor instead
        try:
            return super().forward(x, grid, extra)
        finally:
            self._like = None

    def _gather_index(self, grid: Sequence[Any], batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        like = getattr(self, "_like", None)
        if like is None:  # called outside forward
            like = torch.empty(0, device=device)
        orders = traced_scan_orders(self.order_set, grid, like)  # (K, L)
        inverse = torch.argsort(orders, dim=-1)
        k = orders.shape[0]
        b = _arange(like, batch).view(1, -1, 1, 1)
        m = _arange(like, self.members).view(1, 1, -1, 1)
        kk = _arange(like, k).view(1, 1, 1, k)
        length = orders.shape[1]
        forward = (m * batch + b) * length + orders.t().reshape(-1, 1, 1, k)
        backward = ((inverse.t().reshape(-1, 1, 1, k) * batch + b) * self.members + m) * k + kk
        return forward.reshape(-1), backward.reshape(-1)


class TraceableTokenSwapStage(TokenSwapStage):
    """A :class:`TokenSwapStage` whose channel-exchange mask is built on the input's device without a device
    constant."""

    @staticmethod
    def exchange(x: torch.Tensor) -> torch.Tensor:
        even = _arange(x, x.shape[-1]) % 2 == 0
        return torch.where(even, x.flip(0), x)


class TraceableMemberLayerNorm(MemberLayerNorm):
    """A :class:`MemberLayerNorm` whose normalised shape is a constant (ONNX needs a static one); x (M, B, L, d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [int(self.weight.shape[-1])]  # a Python int: constant in the traced graph
        if self.weight.shape[0] == 1:
            return F.layer_norm(x, shape, self.weight[0], self.bias[0], self.eps)
        x = F.layer_norm(x, shape, eps=self.eps)
        return x * self.weight[:, None, None, :] + self.bias[:, None, None, :]


def _check_order_sets(net: nn.Module) -> None:
    """The tensor-op scan orders must equal the network's own (guards against the two drifting apart)."""
    probes = {"identity": [(5,), (2, 3), (2, 3, 4)], "cross2d": [(2, 3)], "triplane": [(2, 3, 4)]}
    for name in {m.order_set for m in net.modules() if isinstance(m, DirectionalMamba)}:
        for grid in probes.get(name, []):
            if not torch.equal(traced_scan_orders(name, grid), scan_orders(name, grid)):
                raise RuntimeError(
                    f"scripts/export.py: export scan orders for {name!r} differ from scripts/networks/scan_orders.py"
                )


def prepare_export(net: nn.Module, backend: str = EXPORT_BACKEND) -> nn.Module:
    """Make ``net`` traceable in place (and return it): export scan backend, gather indices and masks
    built from the input's size on its device, constant LayerNorm shapes (sub-classes swapped in;
    nothing else changes).

    Weights and state-dict keys are unchanged; eager outputs match the default backends to float
    rounding. Works for any module containing :class:`DirectionalMamba` mixers.
    """
    _check_order_sets(net)
    for module in net.modules():
        if isinstance(module, DirectionalMamba):
            module.scan_backend = backend
            if not isinstance(module, TraceableDirectionalMamba):
                module.__class__ = TraceableDirectionalMamba
        elif isinstance(module, MemberLayerNorm) and not isinstance(module, TraceableMemberLayerNorm):
            module.__class__ = TraceableMemberLayerNorm
        elif isinstance(module, TokenSwapStage) and not isinstance(module, TraceableTokenSwapStage):
            module.__class__ = TraceableTokenSwapStage
    return net


def _check_input(net: nn.Module, image: torch.Tensor, tracing: bool | None = None) -> None:
    """Input layout (B, 2, *spatial); when tracing also the example size: the causal conv unrolls
    ``min(d_conv, L)`` taps at trace time, so the example needs a latent grid of at least ``d_conv`` tokens."""
    shape = tuple(int(s) for s in image.shape)
    dims = getattr(net, "spatial_dims", len(shape) - 2)
    if len(shape) != dims + 2 or shape[1] != 2:
        raise ValueError(f"ClinicalFMamba ({dims}D) expects (B, 2, {'H, W' if dims == 2 else 'D, H, W'}), got {shape}")
    if not (torch.jit.is_tracing() if tracing is None else tracing):
        return
    divisor = getattr(net, "size_divisor", 1)
    tokens = 1
    for size in shape[2:]:
        tokens *= -(-size // divisor)
    width = max((m.d_conv for m in net.modules() if isinstance(m, DirectionalMamba)), default=1)
    if tokens < width:
        raise ValueError(
            f"export example {shape} is too small: its latent grid has {tokens} tokens, the causal conv "
            f"needs at least {width}; trace with e.g. (1, 2, {', '.join(['64'] * dims)})"
        )


class ExportableClinicalFMamba(ClinicalFMamba):
    """:class:`ClinicalFMamba` prepared for ``torch.jit.trace`` / ONNX export, accepting any spatial size.

    Same constructor arguments and state dict as ClinicalFMamba (``scan_backend`` is forced to
    ``export``). ``forward``: image (B, 2, *spatial), any sizes -> fused (B, 1, *spatial) in [0, 1]; the
    input is zero-padded symmetrically to a multiple of ``size_divisor`` (as ``DivisiblePadd`` in the
    inference workflow) and the output cropped back.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["scan_backend"] = EXPORT_BACKEND
        super().__init__(*args, **kwargs)
        prepare_export(self)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():
            _check_input(self, image)
            return self._padded_forward(image)
        # Tracer warnings here are about Python-side checks and constants that hold for every input
        # (channel, member and direction counts; the conv taps are guarded by _check_input): silence them.
        # The traced graph gets the plain layers: modules swapped in by optimize_for_inference run their plain
        # forward while tracing (their rewrites index with sizes that a trace would fix).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            _check_input(self, image)
            return self._padded_forward(image)

    def _padded_forward(self, image: torch.Tensor) -> torch.Tensor:
        """Zero-pad (symmetric) to a multiple of ``size_divisor``, fuse, crop back; sizes may be traced."""
        pads, crops = [], []
        for size in image.shape[2:]:
            total = (self.size_divisor - size % self.size_divisor) % self.size_divisor
            before = total // 2
            pads.append((before, total - before))
            crops.append((before, size))
        padding = [p for pair in reversed(pads) for p in pair]  # F.pad order: last dim first
        fused = super().forward(F.pad(image, padding))
        for dim, (start, size) in enumerate(crops, start=2):
            fused = fused.narrow(dim, start, size)
        return fused


def _example(net: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    """``example``, or a random (1, 2, 64, ...) input of the network's spatial dims."""
    if example is not None:
        return example
    return torch.rand(1, 2, *([64] * getattr(net, "spatial_dims", 2)))


def export_torchscript(
    net: nn.Module, filename: str | os.PathLike | None = None, example: torch.Tensor | None = None
) -> torch.jit.ScriptModule:
    """Trace ``net`` (prepared in place by :func:`prepare_export`) and optionally save it.

    Args:
        net: a ClinicalFMamba (or any module of DirectionalMamba mixers), in eval mode after this call.
        filename: where to ``torch.jit.save`` the traced module; None: do not save.
        example: example input (B, 2, *spatial); default random (1, 2, 64, 64). Its size is not baked in.
    """
    prepare_export(net).eval()
    example = _example(net, example)
    _check_input(net, example, tracing=True)
    with torch.no_grad(), warnings.catch_warnings():  # the plain layers (fast modules too, when tracing)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(net, example, check_trace=False)
    if filename is not None:
        torch.jit.save(traced, str(filename))
    return traced


#: export settings of the ONNX model: input ``image``, output ``pred``, dynamic batch and spatial axes
ONNX_INPUT, ONNX_OUTPUT, ONNX_OPSET = "image", "pred", 17


def onnx_dynamic_axes(spatial_dims: int = 2) -> dict[str, dict[int, str]]:
    """Dynamic axes of the exported ONNX model: batch and every spatial axis."""
    names = {0: "batch", **{2 + i: f"spatial_{i}" for i in range(spatial_dims)}}
    return {ONNX_INPUT: dict(names), ONNX_OUTPUT: dict(names)}


def export_onnx(
    net: nn.Module | torch.jit.ScriptModule,
    filename: str | os.PathLike,
    example: torch.Tensor | None = None,
    opset_version: int = ONNX_OPSET,
) -> None:
    """Export ``net`` to ONNX with dynamic batch and spatial axes.

    Uses the TorchScript-based exporter (``dynamo=False``), which keeps the scripted scan loop as an
    ONNX ``Loop``; input ``image`` (B, 2, *spatial), output ``pred`` (B, 1, *spatial).

    Args:
        net: a network (prepared in place by :func:`prepare_export`) or a module traced by
            :func:`export_torchscript` (exported without tracing again).
        filename: the ``.onnx`` file to write.
        example: example input (B, 2, *spatial); default random (1, 2, 64, 64). Its size is not baked in.
        opset_version: ONNX opset.
    """
    example = _example(net, example)
    if not isinstance(net, torch.jit.ScriptModule):
        prepare_export(net)
        _check_input(net, example, tracing=True)
    net.eval()
    with torch.no_grad(), warnings.catch_warnings():  # the plain layers (fast modules too, when tracing)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            net,
            (example,),
            str(filename),
            dynamo=False,
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_axes=onnx_dynamic_axes(example.dim() - 2),
            opset_version=opset_version,
        )
