"""Fast pure-PyTorch selective scan: chunked, cache-resident, with its own backward.

Time is cut into chunks of ``chunk`` steps. For one chunk at a time the scan

1. discretises (``exp(delta * A)``, ``delta * B * u``) into (T, batch, G, P, N) tensors small
   enough to stay in cache,
2. runs the recurrence ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t`` with one fused
   multiply-add per step, in place,
3. contracts the states with ``C`` into the chunk's outputs,

and keeps only the state at each chunk boundary. The (L, batch, dim, N) state tensor is never
materialised. The backward pass recomputes each chunk's states from its boundary state (as the
mamba_ssm CUDA kernel does) and runs the adjoint recurrence backwards in time, so forward and
backward are both linear in L and use O(L * dim + chunk * dim * N) memory.

``exp(delta * A)`` lies in (0, 1] for ``delta >= 0`` and ``A <= 0``, so nothing overflows in
float32, however large the step (unlike closed-form cumsum/exp chunked scans).

Layout: P = dim / G channels per group; B and C are shared by the channels of a group. A mixer
runs all its scan directions (and both modality streams) as groups of one call.
"""

from __future__ import annotations

import torch

from .reference import prepare_time_major, scan_channels_first
from .registry import ScanBackend, register_backend

__all__ = ["DEFAULT_CHUNK", "ChunkedSelectiveScan", "scan_time_major_fast", "selective_scan_fast"]

DEFAULT_CHUNK = 8


def _chunk_states(decay: torch.Tensor, drive: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """In place: ``drive[t] <- decay[t] * state[t-1] + drive[t]`` with state[-1] = h0; returns drive."""
    drive[0].addcmul_(decay[0], h0)
    steps_a, steps_h = decay.unbind(0), drive.unbind(0)
    for t in range(1, len(steps_h)):
        steps_h[t].addcmul_(steps_a[t], steps_h[t - 1])
    return drive


class ChunkedSelectiveScan(torch.autograd.Function):
    """y_t = <C_t, h_t>, h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t (no D skip, no gate).

    Inputs (time-major): delta, u (L, batch, G, P); A (G, P, N); B, C (L, batch, G, N).
    Returns y (L, batch, G, P) and the last state (batch, G, N, P).
    States are kept as (batch, G, N, P): the channel axis P is innermost, so every broadcast
    along the state axis N vectorises over contiguous channels.
    """

    @staticmethod
    def forward(ctx, delta, u, A, B, C, chunk: int):
        length = delta.shape[0]
        chunk = min(chunk, length)
        n_chunks = -(-length // chunk)
        a_t = A.transpose(-1, -2).contiguous()  # (G, N, P)
        y = torch.empty_like(u)
        # chunk-local work buffers, reused (no per-chunk allocation), and the boundary states
        decay = u.new_empty(chunk, *u.shape[1:3], A.shape[-1], u.shape[3])
        states = torch.empty_like(decay)
        boundaries = u.new_empty(n_chunks, *decay.shape[1:])
        boundaries[0].zero_()
        for index in range(n_chunks):
            t0 = index * chunk
            t1 = min(t0 + chunk, length)
            n = t1 - t0
            d = delta[t0:t1].unsqueeze(-2)
            torch.mul(d, a_t, out=decay[:n]).exp_()
            torch.mul(d * u[t0:t1].unsqueeze(-2), B[t0:t1].unsqueeze(-1), out=states[:n])
            _chunk_states(decay[:n], states[:n], boundaries[index])
            torch.matmul(C[t0:t1].unsqueeze(-2), states[:n], out=y[t0:t1].unsqueeze(-2))
            if index + 1 < n_chunks:
                boundaries[index + 1].copy_(states[n - 1])
        ctx.save_for_backward(delta, u, a_t, B, C, boundaries)
        ctx.chunk = chunk
        return y, states[n - 1].clone()

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        delta, u, a_t, B, C, boundaries = ctx.saved_tensors
        chunk, length = ctx.chunk, delta.shape[0]
        grad_delta, grad_u = torch.empty_like(delta), torch.empty_like(u)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_a_t = torch.zeros_like(a_t)
        decay = u.new_empty(chunk, *boundaries.shape[1:])
        states, g = torch.empty_like(decay), torch.empty_like(decay)
        # adjoint flowing into the last state of the current chunk from later steps
        carry = grad_last if grad_last is not None else torch.zeros_like(boundaries[0])
        for index in reversed(range(boundaries.shape[0])):
            t0 = index * chunk
            t1 = min(t0 + chunk, length)
            n = t1 - t0
            d, uu, b_sel, c_sel, gy = delta[t0:t1], u[t0:t1], B[t0:t1], C[t0:t1], grad_y[t0:t1]
            du = d * uu
            torch.mul(d.unsqueeze(-2), a_t, out=decay[:n]).exp_()
            torch.mul(du.unsqueeze(-2), b_sel.unsqueeze(-1), out=states[:n])
            _chunk_states(decay[:n], states[:n], boundaries[index])
            # adjoint recurrence: g_t = C_t gy_t + decay_{t+1} g_{t+1}
            torch.mul(gy.unsqueeze(-2), c_sel.unsqueeze(-1), out=g[:n])
            g[n - 1].add_(carry)
            steps_a, steps_g = decay.unbind(0), g.unbind(0)
            for t in range(n - 2, -1, -1):
                steps_g[t].addcmul_(steps_a[t + 1], steps_g[t + 1])
            carry = decay[0] * g[0]
            grad_C[t0:t1] = torch.matmul(states[:n], gy.unsqueeze(-1)).squeeze(-1)
            grad_B[t0:t1] = torch.matmul(g[:n], du.unsqueeze(-1)).squeeze(-1)
            grad_du = torch.matmul(b_sel.unsqueeze(-2), g[:n]).squeeze(-2)
            # d loss / d (delta * A) at each step = g_t * h_{t-1} * decay_t, in place in g
            g[1:n].mul_(states[: n - 1])
            g[0].mul_(boundaries[index])
            grad_dA = g[:n].mul_(decay[:n])
            grad_delta[t0:t1] = grad_du * uu + (grad_dA * a_t).sum(-2)
            grad_u[t0:t1] = grad_du * d
            grad_a_t += (grad_dA * d.unsqueeze(-2)).sum((0, 1))
        return grad_delta, grad_u, grad_a_t.transpose(-1, -2), grad_B, grad_C, None


def selective_scan_fast(
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
    chunk: int | None = None,
):
    """Selective scan; arguments and shapes as :func:`scripts.ssm.reference.selective_scan_ref`.

    ``B``/``C`` of shape (batch, G, N, L) split the channels into G groups, which is how a mixer
    runs several scan directions (each with its own A, D, delta bias) in one call.
    """
    steps = max(1, int(chunk or DEFAULT_CHUNK))

    def core(delta, u, A, B, C):
        return ChunkedSelectiveScan.apply(delta, u, A, B, C, steps)

    return scan_channels_first(core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def scan_time_major_fast(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, delta_proj_weight=None):
    """The mixers' time-major scan (shapes as :func:`scripts.ssm.selective_scan_time_major`) by
    :class:`ChunkedSelectiveScan`; returns y (L, batch, G, P) in at least float32."""
    compute, u, delta = prepare_time_major(u, delta, delta_bias, delta_softplus, delta_proj_weight)
    B, C = B.to(compute).contiguous(), C.to(compute).contiguous()
    y, _ = ChunkedSelectiveScan.apply(delta.contiguous(), u.contiguous(), A.to(compute), B, C, DEFAULT_CHUNK)
    return y if D is None else y + u * D.to(compute)


register_backend(
    ScanBackend(
        "fast", "pure PyTorch", selective_scan_fast, time_major=scan_time_major_fast,
        auto=lambda device: device.type == "cpu", priority=10,
    )
)  # fmt: skip
