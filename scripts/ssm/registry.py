"""The one registry of selective-scan backends, and the process-wide backend choice.

Every backend module (``reference``, ``fast``, ``chunked``, ``compiled``, ``mamba_ssm``, ``export``) describes
itself as a :class:`ScanBackend` and calls :func:`register_backend` when it is imported; :mod:`scripts.ssm` imports
them all. Dispatch reads the record: its channels-first ``scan``, its optional time-major ``time_major`` path, and
its optional fused mixer operations. Adding a backend means adding a module that registers one record.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ENV_VAR",
    "ScanBackend",
    "backend_names",
    "get_backend",
    "register_backend",
    "resolve_backend",
    "set_scan_backend",
]

ENV_VAR = "CLINICALFMAMBA_SCAN_BACKEND"


@dataclass(frozen=True)
class ScanBackend:
    """One selective-scan implementation.

    Args:
        name: what ``backend=``, :func:`set_scan_backend` and ``$CLINICALFMAMBA_SCAN_BACKEND`` call it.
        description: a few words for logs.
        scan: ``mamba_ssm.selective_scan_fn`` semantics, channels first: (u, delta, A, B, C, D, z, delta_bias,
            delta_softplus, return_last_state).
        time_major: optional path on the mixers' layout, (u, delta, A, B, C, D, delta_bias, delta_softplus,
            delta_proj_weight) -> y (L, batch, G, P); without one the inputs are transposed for ``scan``.
        auto: whether ``auto`` may pick this backend for a device (None: never); among those that may, the highest
            ``priority`` wins.
        traceable: whether ``torch.jit.trace`` / ONNX export can record it.
        mixer: optional fused mixer operations (an object with ``causal_conv_silu``, ``merge``, ``fused_supported``,
            ``prepare_fused`` and ``fused``; see :mod:`scripts.ssm.mixer`); None: the PyTorch operations.
    """

    name: str
    description: str
    scan: Callable[..., Any]
    time_major: Callable[..., torch.Tensor] | None = None
    auto: Callable[[torch.device], bool] | None = None
    priority: int = 0
    traceable: bool = False
    mixer: Any = None


_REGISTRY: dict[str, ScanBackend] = {}
_default_backend: str | None = None


def register_backend(backend: ScanBackend) -> ScanBackend:
    """Add ``backend`` to the registry (a second record under one name replaces the first)."""
    _REGISTRY[backend.name] = backend
    return backend


def backend_names() -> list[str]:
    """Names of the registered backends, in registration order."""
    return list(_REGISTRY)


def get_backend(name: str) -> ScanBackend:
    """The registered backend ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown scan backend {name!r}; choose one of auto, {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def set_scan_backend(name: str | None) -> None:
    """Set the process-wide backend (``auto`` or a registered name; None resets)."""
    global _default_backend
    if name is not None and name != "auto":
        get_backend(name)
    _default_backend = name


def _auto(device: torch.device) -> str:
    candidates = [b for b in _REGISTRY.values() if b.auto is not None and b.auto(device)]
    if not candidates:
        raise RuntimeError(f"no selective-scan backend is available for {device.type} tensors")
    return max(candidates, key=lambda b: b.priority).name


def resolve_backend(backend: str | None = None, device: torch.device | str = "cpu") -> str:
    """The concrete backend name that :func:`scripts.ssm.selective_scan` would use for tensors on ``device``: the
    ``backend`` argument, else :func:`set_scan_backend`, else ``$CLINICALFMAMBA_SCAN_BACKEND``, else ``auto``."""
    name = backend or _default_backend or os.environ.get(ENV_VAR) or "auto"
    if name == "auto":
        name = _auto(torch.device(device))
    if name not in _REGISTRY:
        raise ValueError(f"unknown scan backend {name!r} (from argument, set_scan_backend or ${ENV_VAR})")
    if not _REGISTRY[name].traceable and (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
        raise RuntimeError(
            f"the {name!r} scan backend cannot be traced or exported; prepare the network with "
            "scripts.export.prepare_export(net) or use scripts.export.ExportableClinicalFMamba (docs/export.md)"
        )
    return name
