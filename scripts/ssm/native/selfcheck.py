"""The self-check of a freshly built kernel library: every kernel, forward and backward, float32 and float64, against
the float64 references on small problems. A library that fails it is not used (the ``fast`` path runs instead).

Tolerances: float64 1e-10 relative (the kernels compute what the reference does, in another order), float32 1e-4
(a wrong index or stride gives errors of order 1). Shapes are chosen to cover a full and a partial channel block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..mixer import causal_conv_silu_reference, gate_merge_reference
from ..reference import selective_scan_ref, warm_up_exp
from . import ops
from .binding import KernelLibrary

__all__ = ["self_check", "self_check_backward", "self_check_forward"]

_CHECKS = ((torch.float64, 1e-10), (torch.float32, 1e-4))


def _check(name: str, dtype: torch.dtype | None, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    if not err <= tol:  # also catches NaN
        where = "" if dtype is None else f" for {dtype}"
        raise RuntimeError(f"self-check of the {name} failed{where}: relative error {err:.2e} > {tol:.0e}")


def self_check_forward(library: KernelLibrary) -> None:
    """The forward kernels (scan, low-rank delta scan, causal conv + SiLU, gated merge with and without the norm, the
    fused mixer kernel) against the float64 references; raises RuntimeError naming the first that fails."""
    warm_up_exp()  # the float64 references below must not take the first, racy exp of the process
    g = torch.Generator().manual_seed(0)
    batch, dim, length, n_state, groups = 2, 38, 21, 5, 2  # 19 channels per group: one full and one partial block

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    u, delta, z = (rand(batch, dim, length) for _ in range(3))
    A = -torch.rand(dim, n_state, generator=g, dtype=torch.float64) * 3
    B, C = (rand(batch, groups, n_state, length) for _ in range(2))
    D, bias = (rand(dim) for _ in range(2))
    with torch.no_grad():
        ref = selective_scan_ref(u, delta, A, B, C, D, z, bias, True)
        for dtype, tol in _CHECKS:
            args = [t.to(dtype) for t in (u, delta, A, B, C, D, z, bias)]
            _check("scan", dtype, ops.scan_channels_first(library, *args, delta_softplus=True), ref, tol)
        # the folded dt projection and the fused causal convolution + SiLU, time-major
        per_group, rank, width = dim // groups, 3, 4
        x = rand(length, batch, groups, per_group)
        dt = rand(length, batch, groups, rank)
        w_dt = rand(groups, per_group, rank) / 2
        taps, conv_bias = rand(groups, per_group, width), D.view(groups, -1)
        a_g, b_t, c_t = A.view(groups, per_group, n_state), B.permute(3, 0, 1, 2), C.permute(3, 0, 1, 2)
        ref_conv = causal_conv_silu_reference(x, taps, conv_bias)
        y_merge = rand(length, batch, 2 * groups, per_group)  # M = 2, K = groups
        merge_index = torch.randperm(y_merge.numel() // per_group, generator=g)
        z_merge = rand(2, batch, length, 2 * per_group)[..., :per_group]
        ref_merge = gate_merge_reference(y_merge, merge_index, z_merge)
        norm_w, norm_b = (rand(2, per_group) for _ in range(2))
        ref_merge_norm = F.layer_norm(ref_merge, (per_group,)) * norm_w[:, None, None] + norm_b[:, None, None]
        conv_index = torch.randperm(x.numel() // per_group, generator=g)  # x's rows, shuffled, read from "tokens"
        tokens = torch.empty(1, batch, x.numel() // per_group // batch, per_group, dtype=torch.float64)
        tokens.view(-1, per_group)[conv_index] = x.reshape(-1, per_group)
        delta_lr = torch.einsum("lbgr,gpr->lbgp", dt, w_dt).permute(1, 2, 3, 0).reshape(batch, dim, length)
        x_cf = x.permute(1, 2, 3, 0).reshape(batch, dim, length)
        ref_y = selective_scan_ref(x_cf, delta_lr, A, B, C, D, None, bias, True)
        ref_y = ref_y.reshape(batch, groups, per_group, length).permute(3, 0, 1, 2)
        for dtype, tol in _CHECKS:
            x_, dt_, w_dt_, taps_, cb_, a_, b_, c_, bias_ = (
                t.to(dtype) for t in (x, dt, w_dt, taps, conv_bias, a_g, b_t, c_t, bias.view(groups, -1))
            )
            y_m, i_m, z_m = y_merge.to(dtype), merge_index, z_merge.to(dtype)
            checks = (
                ("causal conv + SiLU", ops.causal_conv_silu(library, x_, taps_, cb_), ref_conv),
                (
                    "gathered causal conv + SiLU",
                    ops.causal_conv_silu(library, tokens.to(dtype), taps_, cb_, index=conv_index),
                    ref_conv,
                ),
                (
                    "low-rank delta scan",
                    ops.scan_time_major(library, x_, dt_, a_, b_, c_, cb_, bias_, True, delta_proj_weight=w_dt_)[0],
                    ref_y,
                ),
                ("direction merge", ops.gate_merge(library, y_m, i_m, z_m), ref_merge),
                (
                    "merge + norm",
                    ops.gate_merge(library, y_m, i_m, z_m, norm_w.to(dtype), norm_b.to(dtype)),
                    ref_merge_norm,
                ),
            )
            for name, out, expected in checks:
                _check(name, dtype, out, expected, tol)
        # the fused mixer kernel (float32 only) against the separate float64 kernels checked above
        w_x = rand(groups, rank + 2 * n_state, per_group) / 4
        bias_g = bias.view(groups, -1)
        for source in (None, tokens.flip(2)):
            u_ = ops.causal_conv_silu(library, tokens, taps, conv_bias, index=conv_index)
            s = u_ if source is None else source.reshape(-1, per_group)[conv_index].view_as(u_)
            dt_, b_, c_ = torch.einsum("lbgp,gcp->lbgc", s, w_x).split([rank, n_state, n_state], dim=-1)
            expected = ops.scan_time_major(
                library, u_, dt_, a_g, b_, c_, conv_bias, bias_g, True, delta_proj_weight=w_dt
            )[0]
            cast = [None if t is None else t.float() for t in (tokens, taps, conv_bias, w_x, w_dt, bias_g, a_g, source)]
            fused = ops.mixer_scan(
                library, cast[0], conv_index, cast[1], cast[2], cast[3], cast[4], cast[5], cast[6], cast[2],
                source=cast[7],
            )  # fmt: skip
            _check("fused mixer kernel", None, fused, expected, 1e-4)


def self_check_backward(library: KernelLibrary) -> None:
    """Gradients of every input through 3 chunks of 8 steps against autograd on the float64 reference (both dtypes);
    raises RuntimeError naming the first gradient that fails."""
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
        for dtype, tol in _CHECKS:
            cast = [t.detach().to(dtype).requires_grad_() for t in leaves]
            y, h = ops.CompiledSelectiveScan.apply(library, cast[1], cast[0], *cast[2:5], cast[5], cast[6], True, 8)
            grads = torch.autograd.grad((y, h), cast, (grad_y.to(dtype), grad_h.to(dtype)))
            for name, out, ref in zip(("u", "delta", "A", "B", "C", "D", "delta bias"), grads, grads_ref):
                _check(f"backward (d{name})", dtype, out, ref, tol)


def self_check(library: KernelLibrary) -> None:
    """:func:`self_check_forward`, then :func:`self_check_backward`; raises RuntimeError on the first failure."""
    self_check_forward(library)
    self_check_backward(library)
