"""Selective-scan engine with selectable backends.

One entry point, :func:`selective_scan`, with ``mamba_ssm.selective_scan_fn`` semantics
(u, delta, A, B, C, D, z, delta_bias, delta_softplus). Backends:

- ``reference``: sequential loop, the readable specification (tests only; quadratic backward);
- ``fast``: pure PyTorch, linear-time forward and hand-written backward (the fallback everywhere);
- ``compiled``: fused C kernels built at run time by the system C compiler, forward for inference
  (:mod:`scripts.ssm.compiled`) and forward + backward for training (:mod:`scripts.ssm.compiled_grad`), on CPU;
  ``auto`` picks it on CPU when it builds, else ``fast``;
- ``mamba_ssm``: the fused CUDA kernel, used by ``auto`` when mamba_ssm imports and tensors are on CUDA;
- ``chunked``: pure PyTorch, each chunk of steps in closed form (Mamba-2's segment sums), a constant number of
  ops per chunk and none per step, forward and backward (:mod:`scripts.ssm.chunked`). ``auto`` uses it on CUDA
  when mamba_ssm is not installed, so a GPU never launches one small kernel per time step;
- ``export``: a TorchScript loop that tracing and ONNX export keep as a run-time loop (no backward;
  set by :func:`scripts.export.prepare_export`).

The backend is chosen by the ``backend`` argument, else :func:`set_scan_backend`, else the
environment variable ``CLINICALFMAMBA_SCAN_BACKEND``, else ``auto``. The choice is logged once.
"""

from __future__ import annotations

import logging
import os

import torch

from .compiled import (
    compiled_scan_available,
    compiled_scan_info,
    kernel_applicable,
    scan_time_major_kernel,
    selective_scan_compiled,
)
from .chunked import chunked_time_major, selective_scan_chunked
from .compiled_grad import kernel_trainable, scan_time_major_trainable
from .cuda import mamba_ssm_available, mamba_ssm_scan
from .export import selective_scan_export, selective_scan_export_time_major
from .fast import DEFAULT_CHUNK, ChunkedSelectiveScan, selective_scan_fast
from .reference import selective_scan_ref

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "compiled_scan_available",
    "compiled_scan_info",
    "resolve_backend",
    "selective_scan",
    "selective_scan_backend_name",
    "selective_scan_chunked",
    "selective_scan_compiled",
    "selective_scan_fast",
    "selective_scan_time_major",
    "selective_scan_ref",
    "set_scan_backend",
]

ENV_VAR = "CLINICALFMAMBA_SCAN_BACKEND"
BACKENDS = {
    "reference": selective_scan_ref,
    "fast": selective_scan_fast,
    "compiled": selective_scan_compiled,
    "mamba_ssm": mamba_ssm_scan,
    "chunked": selective_scan_chunked,
    "export": selective_scan_export,
}
_DETAILS = {
    "fast": "pure PyTorch",
    "compiled": "fused C kernels, forward and backward",
    "reference": "sequential reference",
    "mamba_ssm": "CUDA kernel",
    "chunked": "closed-form chunks, no per-step ops",
    "export": "TorchScript loop",
}

_logger = logging.getLogger(__name__)
_default_backend: str | None = None
_logged: set[tuple[str, str]] = set()


def set_scan_backend(name: str | None) -> None:
    """Set the process-wide backend (``auto``, ``fast``, ``compiled``, ``chunked``, ``reference``, ``mamba_ssm``, ``export``;
    None resets)."""
    global _default_backend
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    _default_backend = name


def resolve_backend(backend: str | None = None, device: torch.device | str = "cpu") -> str:
    """The concrete backend name that :func:`selective_scan` would use for tensors on ``device``."""
    name = backend or _default_backend or os.environ.get(ENV_VAR) or "auto"
    if name == "auto":
        if torch.device(device).type == "cuda":
            name = "mamba_ssm" if mamba_ssm_available() else "chunked"
        else:
            name = "compiled" if compiled_scan_available() else "fast"
    if name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r} (from argument, set_scan_backend or ${ENV_VAR})")
    if name in ("fast", "compiled", "mamba_ssm", "chunked") and (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
        raise RuntimeError(
            f"the {name!r} scan backend cannot be traced or exported; prepare the network with "
            "scripts.export.prepare_export(net) or use scripts.export.ExportableClinicalFMamba (docs/export.md)"
        )
    return name


def selective_scan_backend_name(device: torch.device | str = "cpu") -> str:
    """Human-readable backend description for logs, e.g. ``fast (pure PyTorch) on cpu``."""
    name = resolve_backend(None, device)
    return f"{name} ({_DETAILS[name]}) on {torch.device(device).type}"


def _log_once(name: str, device: torch.device) -> None:
    key = (name, device.type)
    if key not in _logged:
        _logged.add(key)
        _logger.info("selective scan backend: %s (%s) on %s", name, _DETAILS[name], device.type)


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, backend=None
):
    """Selective scan; see :func:`scripts.ssm.reference.selective_scan_ref` for shapes and maths."""
    name = resolve_backend(backend, u.device)
    _log_once(name, u.device)
    return BACKENDS[name](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def selective_scan_time_major(
    u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, backend=None, delta_proj_weight=None
):
    """Selective scan on time-major, grouped tensors (the mixers' native layout; no gate).

    Args:
        u, delta: (L, batch, G, P): G channel groups of P channels.
        A: (G, P, N).
        B, C: (L, batch, G, N), shared by the P channels of a group.
        D, delta_bias: (G, P).
        delta_proj_weight: optional (G, P, R); then ``delta`` is (L, batch, G, R) and the scan's delta is
            ``einsum("lbgr,gpr->lbgp", delta, delta_proj_weight)`` (Mamba's dt projection), which the
            ``compiled`` kernel computes on the fly instead of materialising it.

    Returns:
        y (L, batch, G, P). The ``fast``, ``compiled`` and ``chunked`` backends work in this layout directly; the others get
        mamba_ssm's (batch, G*P, L) layout and their result is transposed back.
    """
    name = resolve_backend(backend, u.device)
    _log_once(name, u.device)
    if name == "compiled" and kernel_applicable(u, delta, A, B, C, D, delta_bias, delta_proj_weight, n_state=A.shape[-1]):
        return scan_time_major_kernel(u, delta, A, B, C, D, delta_bias, delta_softplus, delta_proj_weight=delta_proj_weight)[0]
    if delta_proj_weight is not None:
        delta = torch.einsum("lbgr,gpr->lbgp", delta, delta_proj_weight)
    if name == "compiled" and kernel_trainable(u, delta, A, B, C, D, delta_bias, n_state=A.shape[-1]):
        return scan_time_major_trainable(u, delta, A, B, C, D, delta_bias, delta_softplus)  # with autograd
    if name == "export":
        return selective_scan_export_time_major(u, delta, A, B, C, D, delta_bias, delta_softplus)
    length, batch, groups, per_group = u.shape
    if name in ("fast", "compiled", "chunked"):
        compute = torch.promote_types(u.dtype, torch.float32)
        u, delta = u.to(compute), delta.to(compute)
        if delta_bias is not None:
            delta = delta + delta_bias.to(compute)
        if delta_softplus:
            delta = torch.nn.functional.softplus(delta)
        if name == "chunked":
            y = chunked_time_major(delta.contiguous(), u.contiguous(), A.to(compute), B.to(compute), C.to(compute))
        else:
            y, _ = ChunkedSelectiveScan.apply(
                delta.contiguous(), u.contiguous(), A.to(compute), B.to(compute).contiguous(), C.to(compute).contiguous(), DEFAULT_CHUNK
            )
        return y if D is None else y + u * D.to(compute)

    def channels_first(x):  # (L, batch, G, P) -> (batch, G*P, L)
        return x.permute(1, 2, 3, 0).reshape(batch, groups * per_group, length)

    y = BACKENDS[name](
        channels_first(u),
        channels_first(delta),
        A.reshape(groups * per_group, -1),
        B.permute(1, 2, 3, 0),
        C.permute(1, 2, 3, 0),
        None if D is None else D.reshape(-1),
        None,
        None if delta_bias is None else delta_bias.reshape(-1),
        delta_softplus,
        False,
    )
    return y.reshape(batch, groups, per_group, length).permute(3, 0, 1, 2)
