"""Sequential reference selective scan: the readable specification every backend is tested against.

Same semantics and argument shapes as ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      (zero-order hold for A, Euler for B)
    y_t = <C_t, h_t> + D * u_t,  then  y_t <- y_t * silu(z_t)

It loops over time steps with per-step indexing, exactly like the mamba_ssm reference. That is
simple to read and to trust, but slow, and its autograd backward is quadratic in the sequence
length (each indexed slice back-propagates through a full-size zero tensor). Use it for tests only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import ScanBackend, register_backend

__all__ = ["selective_scan_ref", "expand_groups", "prepare_inputs", "prepare_time_major", "warm_up_exp"]

_exp_warm = False


def warm_up_exp() -> None:
    """Run PyTorch's ``exp`` once on every thread, in float32 and float64, before anything is compared with it.

    In about one process in twelve on the 2-core Intel machine (torch 2.13.0, CPU wheel) the first multi-threaded
    ``torch.exp`` of the process returned values off by up to 1e-9 relative on one thread's half of the tensor
    (float64), and every later call was exact: a race in the first-use initialisation of the vector math library.
    The kernel's float64 self-check (1e-10) then failed and the process silently fell back to the slow scan
    (docs/troubleshooting.md). A first call on tensors large enough to be split over the threads absorbs it.
    """
    global _exp_warm
    if _exp_warm:
        return
    for dtype in (torch.float32, torch.float64):
        torch.exp(torch.zeros(1 << 17, dtype=dtype))
    _exp_warm = True


def expand_groups(bc: torch.Tensor, dim: int) -> torch.Tensor:
    """Bring ``B`` or ``C`` to (batch, dim, N, L).

    Accepts (dim, N) (time-invariant), (batch, N, L) (shared by all channels) or
    (batch, G, N, L) (G groups of ``dim // G`` channels each).
    """
    if bc.dim() == 2:
        raise ValueError("time-invariant B/C (dim, N) must be expanded by the caller")
    if bc.dim() == 3:
        return bc.unsqueeze(1).expand(-1, dim, -1, -1)
    groups = bc.shape[1]
    if dim % groups != 0:
        raise ValueError(f"channel count {dim} is not divisible by the {groups} groups of B/C")
    return bc.repeat_interleave(dim // groups, dim=1)


def prepare_inputs(u, delta, A, delta_bias=None, delta_softplus=False):
    """Shared prologue of the (batch, dim, L) backends: compute dtype (at least float32), then
    ``delta + delta_bias`` and the optional softplus. Returns (compute dtype, u, delta, A)."""
    compute = torch.promote_types(u.dtype, torch.float32)
    u, delta, A = u.to(compute), delta.to(compute), A.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    return compute, u, delta, A


def prepare_time_major(u, delta, delta_bias=None, delta_softplus=False, delta_proj_weight=None):
    """Shared prologue of the time-major backends: delta from its low-rank input when ``delta_proj_weight`` (G, P, R)
    is given (``einsum("lbgr,gpr->lbgp")``), the compute dtype (at least float32), ``delta + delta_bias`` (G, P) and
    the optional softplus. Returns (compute dtype, u, delta), both (L, batch, G, P)."""
    if delta_proj_weight is not None:
        delta = torch.einsum("lbgr,gpr->lbgp", delta, delta_proj_weight)
    compute = torch.promote_types(u.dtype, torch.float32)
    u, delta = u.to(compute), delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)
    if delta_softplus:
        delta = F.softplus(delta)
    return compute, u, delta


def scan_channels_first(
    core, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Shared body of the (batch, dim, L) backends that run a time-major core.

    Applies :func:`prepare_inputs`, splits the channels into the G groups of ``B``/``C`` ((batch, N, L) or
    (batch, G, N, L)), calls ``core(delta, u, A, B, C)`` on contiguous time-major tensors (delta, u (L, batch, G, P);
    A (G, P, N); B, C (L, batch, G, N)), which returns y (L, batch, G, P) and the last state (batch, G, N, P), then
    adds the ``D`` skip and the ``silu(z)`` gate. Returns y (batch, dim, L) in the dtype of ``u`` (and the last state
    (batch, dim, N) with ``return_last_state``).
    """
    dtype_in = u.dtype
    compute, u, delta, A = prepare_inputs(u, delta, A, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    groups, n_state = B.shape[1], A.shape[1]
    if dim % groups != 0:
        raise ValueError(f"channel count {dim} is not divisible by the {groups} groups of B/C")
    per_group = dim // groups

    def time_major(x):  # (batch, dim, L) -> (L, batch, G, P)
        return x.permute(2, 0, 1).contiguous().view(length, batch, groups, per_group)

    y, last = core(
        time_major(delta),
        time_major(u),
        A.reshape(groups, per_group, n_state),
        B.to(compute).permute(3, 0, 1, 2).contiguous(),
        C.to(compute).permute(3, 0, 1, 2).contiguous(),
    )
    y = y.reshape(length, batch, dim).permute(1, 2, 0)
    if D is not None:
        y = y + u * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(dtype_in)
    if return_last_state:
        return y, last.transpose(-1, -2).reshape(batch, dim, n_state)
    return y


def selective_scan_ref(
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
    """Selective scan by a plain loop over time.

    Args:
        u: input (batch, dim, L).
        delta: step sizes (batch, dim, L).
        A: state matrix (dim, N), real (negative for a stable system).
        B, C: input/output projections (batch, N, L) or (batch, G, N, L).
        D: skip weights (dim,).
        z: gate (batch, dim, L); the output is multiplied by silu(z).
        delta_bias: (dim,) added to delta before the optional softplus.
        delta_softplus: apply softplus to delta.
        return_last_state: also return h_L (batch, dim, N).

    Returns:
        y (batch, dim, L) in the dtype of ``u`` (computed in at least float32).
    """
    dtype_in = u.dtype
    compute, u, delta, A = prepare_inputs(u, delta, A, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    B = expand_groups(B.to(compute), dim)
    C = expand_groups(C.to(compute), dim)

    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_b_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    h = u.new_zeros((batch, dim, A.shape[1]))
    ys = []
    for t in range(length):
        h = delta_a[:, :, t] * h + delta_b_u[:, :, t]
        ys.append(torch.einsum("bdn,bdn->bd", h, C[:, :, :, t]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


register_backend(ScanBackend("reference", "sequential reference", selective_scan_ref, traceable=True))
