"""Compiled selective scan with autograd (CPU training): the fused C forward plus a fused C backward.

The ``fast`` backward runs a few small PyTorch ops per time step and chunk (thousands per training step). Here the
forward is the inference kernel of :mod:`scripts.ssm.compiled` with the softplus, delta bias and D skip folded in,
which also stores the state before every ``T``-th step (``T * N`` <= 256, a few MB for a training batch). The
backward (``scan_bwd_*`` in ``scan_kernel.c``) walks the chunks of ``T`` steps from last to first: it recomputes
the chunk's states from its checkpoint into a buffer that stays in cache and runs the adjoint recurrence back
through it, producing the gradients of delta (through the softplus), u, A, B, C, D and the delta bias in one pass,
per (batch, group) lane. It is the scheme of the ``fast`` backward and of mamba_ssm's CUDA kernel, in one loop nest.

Used by :func:`scripts.ssm.selective_scan_time_major` (the mixers' call) and
:func:`scripts.ssm.compiled_backend.selective_scan_compiled` when the ``compiled`` backend is selected, autograd is
needed and :func:`kernel_trainable` holds; otherwise the ``fast`` scan and its backward run unchanged.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .compiled import _load, _rows, _run, register_self_check, scan_time_major_kernel

__all__ = ["CompiledSelectiveScan", "checkpoint_interval", "kernel_trainable", "scan_time_major_trainable"]


def kernel_trainable(*tensors: torch.Tensor | None, n_state: int) -> bool:
    """True when the compiled forward and backward can run these inputs: CPU, N supported, kernel built."""
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        return False
    info = _load()
    return info["lib"] is not None and n_state <= info["nmax"]


def checkpoint_interval(length: int, n_state: int) -> int:
    """Steps between stored states: the largest chunk whose recomputed states fit the kernel's buffer."""
    return max(1, min(length, _load()["tnmax"] // max(1, n_state)))


class CompiledSelectiveScan(torch.autograd.Function):
    """y_t = <C_t, h_t> + D u_t, h_t = exp(d_t A) h_{t-1} + d_t u_t B_t, d_t = softplus(delta_t + bias) (or without).

    Inputs (time-major): delta, u (L, batch, G, P); A (G, P, N); B, C (L, batch, G, N) (row views of a wider
    tensor are not copied); D, delta_bias (G, P) or None; delta_softplus bool; every: steps between stored states
    (None: :func:`checkpoint_interval`, also the upper limit). Returns y (L, batch, G, P) and the last state
    (batch, G, N, P) in the promoted compute dtype (float32 or float64).
    """

    @staticmethod
    def forward(ctx, delta, u, A, B, C, D, delta_bias, delta_softplus: bool, every: int | None = None):
        compute = torch.promote_types(u.dtype, torch.float32)
        length, batch, groups, per_group = u.shape
        n_state = A.shape[-1]
        delta, u = delta.to(compute).contiguous(), u.to(compute).contiguous()
        (B, stride_b), (C, stride_c) = _rows(B.to(compute)), _rows(C.to(compute))
        if stride_b != stride_c:
            B, C = B.contiguous(), C.contiguous()
        limit = checkpoint_interval(length, n_state)
        every = limit if every is None else max(1, min(int(every), limit))
        ckpt = u.new_empty(-(-length // every), batch * groups, n_state, per_group)
        y, last = scan_time_major_kernel(u, delta, A, B, C, D, delta_bias, delta_softplus, ckpt=ckpt, ckpt_every=every)
        a_t = A.to(compute).reshape(groups, per_group, n_state).transpose(-1, -2).contiguous()  # (G, N, P)
        D = None if D is None else D.to(compute).reshape(groups, per_group).contiguous()
        bias = None if delta_bias is None else delta_bias.to(compute).reshape(groups, per_group).contiguous()
        ctx.save_for_backward(delta, u, a_t, B, C, D, bias, ckpt)
        ctx.softplus, ctx.every = bool(delta_softplus), every
        return y, last

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_last):
        delta, u, a_t, B, C, D, bias, ckpt = ctx.saved_tensors
        length, batch, groups, per_group = u.shape
        n_state, lanes = a_t.shape[1], batch * groups
        grad_y = grad_y.to(u.dtype).contiguous()
        glast = None if grad_last is None else grad_last.to(u.dtype).reshape(lanes, n_state, per_group).contiguous()
        grad_delta, grad_u = torch.empty_like(u), torch.empty_like(u)
        grad_B = u.new_zeros(length, batch, groups, n_state)
        grad_C = torch.zeros_like(grad_B)
        grad_A = u.new_empty(lanes, n_state, per_group)
        grad_D, grad_bias = u.new_empty(lanes, per_group), u.new_empty(lanes, per_group)
        _, stride_bc = _rows(B)
        lib = _load()["lib"]
        fn = lib.scan_bwd_f32 if u.dtype == torch.float32 else lib.scan_bwd_f64
        args = [
            length, lanes, groups, per_group, n_state, ctx.every,
            delta.data_ptr(), u.data_ptr(), a_t.data_ptr(), B.data_ptr(), C.data_ptr(), stride_bc,
            None if D is None else D.data_ptr(), None if bias is None else bias.data_ptr(), int(ctx.softplus),
            ckpt.data_ptr(), grad_y.data_ptr(), None if glast is None else glast.data_ptr(),
            grad_delta.data_ptr(), grad_u.data_ptr(), grad_B.data_ptr(), grad_C.data_ptr(),
            grad_A.data_ptr(), grad_D.data_ptr(), grad_bias.data_ptr(),
        ]  # fmt: skip
        if length:
            _run(fn, args, lanes)
        else:
            grad_A.zero_(), grad_D.zero_(), grad_bias.zero_()
        grad_A = grad_A.view(batch, groups, n_state, per_group).sum(0).transpose(-1, -2)  # (G, P, N)
        grad_D = grad_D.view(batch, groups, per_group).sum(0) if D is not None else None
        grad_bias = grad_bias.view(batch, groups, per_group).sum(0) if bias is not None else None
        return grad_delta, grad_u, grad_A, grad_B, grad_C, grad_D, grad_bias, None, None


def scan_time_major_trainable(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """:class:`CompiledSelectiveScan` on the mixers' layout (see :func:`scripts.ssm.selective_scan_time_major`);
    returns y (L, batch, G, P). Parameters of any shape that reshapes to (G, P) / (G, P, N) are accepted."""
    groups, per_group = u.shape[2], u.shape[3]
    A = A.reshape(groups, per_group, -1)
    D = None if D is None else D.reshape(groups, per_group)
    delta_bias = None if delta_bias is None else delta_bias.reshape(groups, per_group)
    return CompiledSelectiveScan.apply(delta, u, A, B, C, D, delta_bias, bool(delta_softplus))[0]


def _self_check_backward() -> None:
    """Gradients of every input through 3 chunks of 8 steps against autograd on the float64 reference (both dtypes);
    part of the library's self-check (:func:`scripts.ssm.compiled.register_self_check`)."""
    from .reference import selective_scan_ref

    g = torch.Generator().manual_seed(1)
    batch, groups, per_group, length, n_state = 2, 2, 19, 21, 5  # 19 channels per group: one full and one partial block
    dim = groups * per_group

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    inputs = (
        rand(length, batch, groups, per_group), rand(length, batch, groups, per_group),
        -torch.rand(groups, per_group, n_state, generator=g, dtype=torch.float64) * 3,
        rand(length, batch, groups, n_state), rand(length, batch, groups, n_state),
        rand(groups, per_group), rand(groups, per_group),
    )  # fmt: skip
    with torch.inference_mode(False), torch.enable_grad():  # the first call may come from inference code
        leaves = [t.clone().requires_grad_() for t in inputs]
        grad_y = rand(length, batch, groups, per_group)
        grad_h = rand(batch, groups, n_state, per_group)

        def channels_first(t):  # (L, batch, G, P) -> (batch, G * P, L)
            return t.permute(1, 2, 3, 0).reshape(batch, dim, length)

        u_, d_, a_, b_, c_, dk_, bias_ = leaves
        y_ref, h_ref = selective_scan_ref(
            channels_first(u_), channels_first(d_), a_.reshape(dim, n_state), b_.permute(1, 2, 3, 0),
            c_.permute(1, 2, 3, 0), dk_.reshape(-1), None, bias_.reshape(-1), True, return_last_state=True,
        )  # fmt: skip
        y_ref = y_ref.reshape(batch, groups, per_group, length).permute(3, 0, 1, 2)
        h_ref = h_ref.reshape(batch, groups, per_group, n_state).transpose(-1, -2)
        grads_ref = torch.autograd.grad((y_ref, h_ref), leaves, (grad_y, grad_h))
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
            cast = [t.detach().to(dtype).requires_grad_() for t in leaves]
            y, h = CompiledSelectiveScan.apply(cast[1], cast[0], *cast[2:5], cast[5], cast[6], True, 8)
            grads = torch.autograd.grad((y, h), cast, (grad_y.to(dtype), grad_h.to(dtype)))
            for name, out, ref in zip(("u", "delta", "A", "B", "C", "D", "delta bias"), grads, grads_ref):
                err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
                if not err <= tol:
                    message = f"relative error {err:.2e} > {tol:.0e}"
                    raise RuntimeError(f"self-check of the backward failed for d{name} in {dtype}: {message}")


register_self_check(_self_check_backward)
