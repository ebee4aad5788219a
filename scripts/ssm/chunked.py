"""Chunked closed-form selective scan: a constant number of tensor ops per chunk of T steps, none per step.

For GPUs without mamba_ssm. The ``fast`` scan's recurrence is one small op per time step, which on a GPU is one
kernel launch per step; here each chunk of T steps is solved in closed form with the segment-sum formulation of
Mamba-2's SSD. With ``dA_t = delta_t * A`` (per channel and state) and ``x_t = delta_t u_t B_t``::

    S[t, s] = sum_{r = s+1}^{t} dA_r          (s <= t; a cumulative sum of a masked T x T matrix, no subtraction)
    h_t     = exp(S[t, -1]) h_0 + sum_{s <= t} exp(S[t, s]) x_s
    y_t     = <C_t, h_t>

``S[t, s] <= 0`` for ``delta >= 0`` and ``A <= 0``, so every exponential lies in (0, 1]: no overflow for any step
size (unlike closed forms that divide by ``exp(cumsum)``), and the segment sums are formed by cumulative sums of
the masked steps rather than differences of prefix sums, so long chunks lose no precision to cancellation. The
cost is T times the state per chunk (T * N * channels values); T is chosen so that a chunk's (T, T) decay block
stays under :data:`CHUNK_BUDGET` values.

With autograd, :class:`ClosedFormChunkScan` keeps only the state before each chunk and recomputes one chunk at a
time in the backward (from the last chunk to the first), so memory stays linear in L plus one chunk's graph, and
the backward, too, is a constant number of tensor ops per chunk.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .reference import prepare_time_major, scan_channels_first
from .registry import ScanBackend, register_backend

__all__ = [
    "CHUNK_BUDGET",
    "ClosedFormChunkScan",
    "chunk_length",
    "chunked_scan_time_major",
    "chunked_time_major",
    "scan_time_major_chunked",
    "selective_scan_chunked",
]

#: upper bound on the values of one chunk's (T, T) decay block: batch * G * N * P * T * T (32 MB in float32). The
#: closed form does T times the element-wise work of a sequential scan to save launches; this keeps T at 16 for a
#: 256 x 256 mixer call at batch 1 (2,048 channels x 8 states) and smaller for training batches.
CHUNK_BUDGET = 2**23


def chunk_length(length: int, state_values: int, budget: int = CHUNK_BUDGET) -> int:
    """Largest power of two T <= 64 (and <= length, at least 1) with ``state_values * T * T <= budget``."""
    t = 64
    while t > 1 and (t > length or state_values * t * t > budget):
        t //= 2
    return t


def _segment_sums(dA: torch.Tensor) -> torch.Tensor:
    """(T, ...) steps -> (T, T, ...) with [t, s] = sum_{r=s+1}^{t} dA_r for s <= t and -inf above the diagonal."""
    steps = dA.shape[0]
    lower = torch.ones(steps, steps, dtype=torch.bool, device=dA.device).tril(-1)  # r > s
    shape = (steps, steps) + (1,) * (dA.dim() - 1)
    terms = dA.unsqueeze(1).expand(steps, steps, *dA.shape[1:]).masked_fill(~lower.view(shape), 0.0)  # [r, s]
    sums = terms.cumsum(0)  # [t, s] = sum_{s < r <= t} dA_r
    return sums.masked_fill(
        ~lower.logical_or(torch.eye(steps, dtype=torch.bool, device=dA.device)).view(shape), float("-inf")
    )


def _chunk_closed_form(d, u, a_t, B, C, h):
    """One chunk: d, u (T, b, G, P); a_t (G, N, P); B, C (T, b, G, N); h (b, G, N, P) the state before the chunk.
    Returns y (T, b, G, P) and the state after the chunk."""
    d = d.unsqueeze(-2)  # (T, b, G, 1, P)
    dA = d * a_t  # (T, b, G, N, P)
    x = (d * u.unsqueeze(-2)) * B.unsqueeze(-1)  # (T, b, G, N, P)
    decay = _segment_sums(dA).exp()  # (T, T, b, G, N, P): [t, s] = exp(sum_{s<r<=t} dA_r), 0 for s > t
    states = (decay * x.unsqueeze(0)).sum(1) + dA.cumsum(0).exp() * h  # (T, b, G, N, P)
    return (C.unsqueeze(-1) * states).sum(-2), states[-1]


def chunked_scan_time_major(delta, u, A, B, C, h0=None, chunk: int | None = None, boundaries: list | None = None):
    """Closed-form chunked scan (no D skip, no gate), time-major, no autograd graph kept across chunks; shapes as
    :class:`scripts.ssm.fast.ChunkedSelectiveScan`: delta, u (L, batch, G, P); A (G, P, N); B, C (L, batch, G, N);
    h0 (batch, G, N, P) or None; ``boundaries``: a list that receives the state before each chunk. Returns
    y (L, batch, G, P) and the last state (batch, G, N, P)."""
    length, batch, groups, per_group = u.shape
    n_state = A.shape[-1]
    a_t = A.transpose(-1, -2)  # (G, N, P)
    steps = chunk or chunk_length(length, batch * groups * n_state * per_group)
    h = u.new_zeros(batch, groups, n_state, per_group) if h0 is None else h0
    y = torch.empty_like(u)
    for t0 in range(0, length, steps):
        t1 = min(t0 + steps, length)
        if boundaries is not None:
            boundaries.append(h)
        y[t0:t1], h = _chunk_closed_form(delta[t0:t1], u[t0:t1], a_t, B[t0:t1], C[t0:t1], h)
        h = h.clone()  # a view of the chunk's (T, ...) states would keep them all alive
    return y, h


class ClosedFormChunkScan(torch.autograd.Function):
    """:func:`chunked_scan_time_major` with a memory-lean backward: the forward keeps only the state before each
    chunk; the backward recomputes one chunk at a time (last to first) from its stored state and back-propagates
    through it, carrying the state's gradient to the previous chunk. Memory: the boundary states plus one chunk's
    graph; a constant number of tensor ops per chunk, none per step. Inputs as :func:`chunked_scan_time_major`
    (without h0) plus ``chunk``; returns y and the last state."""

    @staticmethod
    def forward(ctx, delta, u, A, B, C, chunk: int | None = None):
        length, batch, groups, per_group = u.shape
        steps = chunk or chunk_length(length, batch * groups * A.shape[-1] * per_group)
        boundaries: list[torch.Tensor] = []
        y, h = chunked_scan_time_major(delta, u, A, B, C, chunk=steps, boundaries=boundaries)
        ctx.save_for_backward(delta, u, A, B, C, *boundaries)
        ctx.steps = steps
        return y, h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_last):
        delta, u, A, B, C, *boundaries = ctx.saved_tensors
        steps, length = ctx.steps, u.shape[0]
        grad_delta, grad_u = torch.zeros_like(delta), torch.zeros_like(u)
        grad_B, grad_C, grad_A = torch.zeros_like(B), torch.zeros_like(C), torch.zeros_like(A)
        carry = torch.zeros_like(boundaries[0]) if grad_last is None else grad_last
        for index in reversed(range(len(boundaries))):
            t0 = index * steps
            t1 = min(t0 + steps, length)
            with torch.enable_grad():
                leaves = [
                    t.detach().requires_grad_()
                    for t in (delta[t0:t1], u[t0:t1], A, B[t0:t1], C[t0:t1], boundaries[index])
                ]
                d, uu, a, b, c, h = leaves
                y, h_end = _chunk_closed_form(d, uu, a.transpose(-1, -2), b, c, h)
                grads = torch.autograd.grad((y, h_end), leaves, (grad_y[t0:t1], carry))
            grad_delta[t0:t1], grad_u[t0:t1], grad_B[t0:t1], grad_C[t0:t1] = grads[0], grads[1], grads[3], grads[4]
            grad_A += grads[2]
            carry = grads[5]
        return grad_delta, grad_u, grad_A, grad_B, grad_C, None


def selective_scan_chunked(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, chunk=None
):
    """Selective scan with mamba_ssm semantics (arguments as :func:`scripts.ssm.reference.selective_scan_ref`) by
    the closed-form chunked scan, with autograd through :class:`ClosedFormChunkScan`."""

    def core(delta, u, A, B, C):
        return ClosedFormChunkScan.apply(delta, u, A, B, C, chunk)

    return scan_channels_first(core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def chunked_time_major(delta, u, A, B, C):
    """The mixers' time-major core for the ``chunked`` backend; returns y (L, batch, G, P)."""
    return ClosedFormChunkScan.apply(delta, u, A, B, C, None)[0]


def scan_time_major_chunked(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, delta_proj_weight=None):
    """The mixers' time-major scan (shapes as :func:`scripts.ssm.selective_scan_time_major`) by the closed-form
    chunks; returns y (L, batch, G, P) in at least float32."""
    compute, u, delta = prepare_time_major(u, delta, delta_bias, delta_softplus, delta_proj_weight)
    y = chunked_time_major(delta.contiguous(), u.contiguous(), A.to(compute), B.to(compute), C.to(compute))
    return y if D is None else y + u * D.to(compute)


register_backend(
    ScanBackend(
        "chunked", "closed-form chunks, no per-step ops", selective_scan_chunked, time_major=scan_time_major_chunked,
        auto=lambda device: device.type == "cuda", priority=10,
    )
)  # fmt: skip
