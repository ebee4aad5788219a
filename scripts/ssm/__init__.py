"""Selective-scan engine with selectable backends.

One entry point, :func:`selective_scan`, with ``mamba_ssm.selective_scan_fn`` semantics
(u, delta, A, B, C, D, z, delta_bias, delta_softplus). Backends:

- ``reference``: sequential loop, the readable specification (tests only; quadratic backward);
- ``fast``: pure PyTorch, linear-time forward and hand-written backward (the fallback everywhere);
- ``compiled``: fused C kernels built at run time by the system C compiler (:mod:`scripts.ssm.native`), forward
  for inference and forward + backward for training, on CPU (:mod:`scripts.ssm.compiled_backend`);
  ``auto`` picks it on CPU when it builds, else ``fast``;
- ``mamba_ssm``: the fused CUDA kernel, used by ``auto`` when mamba_ssm imports and tensors are on CUDA;
- ``chunked``: pure PyTorch, each chunk of steps in closed form (Mamba-2's segment sums), a constant number of
  ops per chunk and none per step, forward and backward (:mod:`scripts.ssm.chunked`). ``auto`` uses it on CUDA
  when mamba_ssm is not installed, so a GPU never launches one small kernel per time step;
- ``export``: a TorchScript loop that tracing and ONNX export keep as a run-time loop (no backward;
  set by :func:`scripts.export.prepare_export`).

Every backend registers itself in one registry (:mod:`scripts.ssm.registry`); adding one is a module that
registers a :class:`~scripts.ssm.registry.ScanBackend`. The backend is chosen by the ``backend`` argument, else
:func:`set_scan_backend`, else the environment variable ``CLINICALFMAMBA_SCAN_BACKEND``, else ``auto``. The choice
is logged once.

Public entry points (what the networks use): :func:`selective_scan`, :func:`selective_scan_time_major`, the mixer
operations of :mod:`scripts.ssm.mixer` (:func:`causal_conv_silu`, :func:`merge_directions`,
:func:`gather_directions`, :func:`fused_mixer_ops`) and backend selection (:func:`resolve_backend`,
:func:`set_scan_backend`). The kernel package (``native``) is this package's internals.
"""

from __future__ import annotations

import logging

import torch

# each backend module registers itself when imported; this order is the registry's (and the error messages')
from . import reference, fast, compiled_backend, cuda, chunked, export  # noqa: F401  # isort: skip
from .chunked import selective_scan_chunked
from .compiled_backend import selective_scan_compiled
from .cuda import mamba_ssm_available
from .fast import selective_scan_fast
from .mixer import causal_conv_silu, fused_mixer_ops, gather_directions, merge_directions
from .native.loader import compiled_scan_available, compiled_scan_info
from .reference import selective_scan_ref
from .registry import (
    ENV_VAR,
    ScanBackend,
    backend_names,
    get_backend,
    register_backend,
    resolve_backend,
    set_scan_backend,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "ScanBackend",
    "backend_names",
    "causal_conv_silu",
    "compiled_scan_available",
    "compiled_scan_info",
    "fused_mixer_ops",
    "gather_directions",
    "get_backend",
    "mamba_ssm_available",
    "merge_directions",
    "register_backend",
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

#: name -> channels-first scan function of every registered backend (read from the registry at import)
BACKENDS = {name: get_backend(name).scan for name in backend_names()}

_logger = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()


def selective_scan_backend_name(device: torch.device | str = "cpu") -> str:
    """Human-readable backend description for logs, e.g. ``fast (pure PyTorch) on cpu``."""
    name = resolve_backend(None, device)
    return f"{name} ({get_backend(name).description}) on {torch.device(device).type}"


def _log_once(name: str, device: torch.device) -> None:
    key = (name, device.type)
    if key not in _logged:
        _logged.add(key)
        _logger.info("selective scan backend: %s (%s) on %s", name, get_backend(name).description, device.type)


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, backend=None
):
    """Selective scan; see :func:`scripts.ssm.reference.selective_scan_ref` for shapes and maths."""
    name = resolve_backend(backend, u.device)
    _log_once(name, u.device)
    return get_backend(name).scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


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
        y (L, batch, G, P). Backends with a time-major path (``fast``, ``compiled``, ``chunked``, ``export``) work in
        this layout directly; the others get mamba_ssm's (batch, G*P, L) layout and their result is transposed back.
    """
    name = resolve_backend(backend, u.device)
    _log_once(name, u.device)
    record = get_backend(name)
    if record.time_major is not None:
        return record.time_major(u, delta, A, B, C, D, delta_bias, delta_softplus, delta_proj_weight)
    if delta_proj_weight is not None:
        delta = torch.einsum("lbgr,gpr->lbgp", delta, delta_proj_weight)
    length, batch, groups, per_group = u.shape

    def channels_first(x):  # (L, batch, G, P) -> (batch, G*P, L)
        return x.permute(1, 2, 3, 0).reshape(batch, groups * per_group, length)

    y = record.scan(
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
