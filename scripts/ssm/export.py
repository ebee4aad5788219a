"""Export-friendly selective scan: TorchScript code that ``torch.jit.trace`` and ONNX keep as a loop.

The ``fast`` backend is a ``torch.autograd.Function`` with Python loops: tracing records it as an
opaque Python call (TorchScript cannot save it, ONNX cannot export it), and a traced Python loop
would be unrolled for the sequence length seen at trace time. Here the recurrence

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,      y_t = <C_t, h_t>

is a ``torch.jit.script`` function: when a traced module calls it, its loops stay loops whose trip
count is read from the input at run time (``prim::Loop`` in TorchScript, ``Loop`` in ONNX), so an
exported network accepts any sequence length. Time is cut into chunks of ``chunk`` steps; each
chunk discretises its (T, batch, G, N, P) decay and drive tensors at once, loops over its steps and
contracts its states with ``C`` in one matmul. No backward: inference and export only.

Layout as the ``fast`` backend: P channels per group, B and C shared by the channels of a group.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .registry import ScanBackend, register_backend

__all__ = ["EXPORT_CHUNK", "selective_scan_export", "selective_scan_export_time_major"]

#: time steps per chunk of the exported scan (a run-time loop inside the exported graph)
EXPORT_CHUNK = 32


def _scan_time_major(
    delta: torch.Tensor, u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk: int
) -> torch.Tensor:
    """delta, u (L, batch, G, P); A (G, P, N); B, C (L, batch, G, N) -> y (L, batch, G, P)."""
    length = delta.size(0)
    a_t = A.transpose(-1, -2)  # (G, N, P): channels innermost
    h = torch.zeros_like(u[0]).unsqueeze(-2) * a_t  # (batch, G, N, P)
    outputs: list[torch.Tensor] = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        d = delta[start:stop].unsqueeze(-2)  # (T, batch, G, 1, P)
        decay = torch.exp(d * a_t)
        drive = d * u[start:stop].unsqueeze(-2) * B[start:stop].unsqueeze(-1)
        states: list[torch.Tensor] = []
        for t in range(stop - start):
            h = decay[t] * h + drive[t]
            states.append(h)
        outputs.append(torch.matmul(C[start:stop].unsqueeze(-2), torch.stack(states)).squeeze(-2))
    return torch.cat(outputs)


@functools.lru_cache(maxsize=1)
def _scripted_scan():
    """Compile the scan once, on first use (not at import)."""
    return torch.jit.script(_scan_time_major)


def selective_scan_export_time_major(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int = EXPORT_CHUNK,
) -> torch.Tensor:
    """Time-major grouped scan, as :func:`scripts.ssm.selective_scan_time_major`.

    Args:
        u, delta: (L, batch, G, P).
        A: (G, P, N).
        B, C: (L, batch, G, N).
        D, delta_bias: (G, P).

    Returns:
        y (L, batch, G, P) in at least float32.
    """
    compute = torch.promote_types(u.dtype, torch.float32)
    u, delta = u.to(compute), delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)
    if delta_softplus:
        delta = F.softplus(delta)
    y = _scripted_scan()(delta, u, A.to(compute), B.to(compute), C.to(compute), max(1, int(chunk)))
    return y if D is None else y + u * D.to(compute)


def selective_scan_export(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Selective scan in mamba_ssm's layout; arguments and shapes as :func:`scripts.ssm.reference.selective_scan_ref`.

    ``B``/``C``: (batch, N, L) or (batch, G, N, L). ``return_last_state`` is not supported (export only).
    """
    if return_last_state:
        raise NotImplementedError("the export scan backend does not return the last state")
    batch, dim = u.shape[0], u.shape[1]
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    groups = B.shape[1]
    if dim % groups != 0:
        raise ValueError(f"channel count {dim} is not divisible by the {groups} groups of B/C")

    def time_major(x: torch.Tensor) -> torch.Tensor:  # (batch, dim, L) -> (L, batch, G, P)
        return x.permute(2, 0, 1).reshape(x.shape[2], batch, groups, -1)

    y = selective_scan_export_time_major(
        time_major(u),
        time_major(delta),
        A.reshape(groups, dim // groups, -1),
        B.permute(3, 0, 1, 2),
        C.permute(3, 0, 1, 2),
        None if D is None else D.reshape(groups, -1),
        None if delta_bias is None else delta_bias.reshape(groups, -1),
        delta_softplus,
    )
    y = y.reshape(y.shape[0], batch, dim).permute(1, 2, 0)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(u.dtype)


def _export_time_major(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, delta_proj_weight=None):
    if delta_proj_weight is not None:
        delta = torch.einsum("lbgr,gpr->lbgp", delta, delta_proj_weight)
    return selective_scan_export_time_major(u, delta, A, B, C, D, delta_bias, delta_softplus)


register_backend(
    ScanBackend("export", "TorchScript loop", selective_scan_export, time_major=_export_time_major, traceable=True)
)
