"""The kernels' Python entry points: scan (forward, and forward + backward with autograd), causal convolution + SiLU,
the fused mixer scan and the gated merge, on a loaded :class:`~scripts.ssm.native.binding.KernelLibrary`.

Each function takes the library as its first argument (the process's library is
:func:`scripts.ssm.native.loader.kernel_library`), checks and lays out its tensors as ``scan_kernel.h`` states, fills
the kernel's parameter struct and runs the work items (:func:`scripts.ssm.native.threads.run_items`). The caller
checks that the kernel takes the inputs (CPU tensors, sizes within the library's limits; without autograd except
:class:`CompiledSelectiveScan`). float32 runs the vector kernels (Cephes-accurate exp/log, about 1e-7 relative),
float64 the scalar ones (C library exp and log1p); other dtypes are promoted to float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import threads
from .binding import ConvSiluParams, GateMergeParams, KernelLibrary, MixerScanParams, ScanBwdParams, ScanParams, pointer

__all__ = [
    "CompiledSelectiveScan",
    "MixerKernelWeights",
    "causal_conv_silu",
    "checkpoint_interval",
    "gate_merge",
    "mixer_scan",
    "mixer_scan_applicable",
    "prepare_mixer_weights",
    "row_view",
    "scan_channels_first",
    "scan_time_major",
    "scan_time_major_trainable",
]


def row_view(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A 4D tensor (time-major (L, batch, G, N), or tokens (M, B, L, P)) and the stride between its rows of the last
    dim; copies only if the rows are not evenly spaced with unit stride inside (split views of one projection
    output are not copied)."""
    length, batch, groups, _ = x.shape
    s = x.stride()
    if s[3] == 1 and s[1] == groups * s[2] and s[0] == batch * groups * s[2] and s[2] >= x.shape[3]:
        return x, s[2]
    x = x.contiguous()
    return x, x.shape[3]


def _run(library: KernelLibrary, family: str, dtype: torch.dtype, params, items: int) -> None:
    threads.run_items(library.function(family, dtype), params, items, library.openmp)


def scan_time_major(
    library: KernelLibrary, u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, h0=None,
    delta_proj_weight=None, ckpt=None, ckpt_every=1,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The scan kernel on time-major inputs (shapes as :func:`scripts.ssm.selective_scan_time_major`), no autograd.

    With ``delta_proj_weight`` (G, P, R), ``delta`` is the low-rank input (L, batch, G, R) and the kernel computes
    ``einsum("lbgr,gpr->lbgp", delta, delta_proj_weight)`` on the fly (Mamba's dt projection). Returns y
    (L, batch, G, P) and the last state (batch, G, N, P), in float32 or float64 (the promoted compute dtype). With
    ``ckpt``, a contiguous (ceil(L / ckpt_every), batch * G, N, P) tensor of the compute dtype, the state before every
    ``ckpt_every``-th step is written into it (for the backward, :class:`CompiledSelectiveScan`).
    """
    compute = torch.promote_types(u.dtype, torch.float32)
    length, batch, groups, per_group = u.shape
    n_state = A.shape[-1]
    u = u.to(compute).contiguous()
    if delta_proj_weight is None:
        delta, dtr, dt_stride, wdt, rank = delta.to(compute).contiguous(), None, 0, None, 0
    else:
        dtr, dt_stride = row_view(delta.to(compute))
        wdt = delta_proj_weight.to(compute).reshape(groups, per_group, -1).transpose(-1, -2).contiguous()  # (G, R, P)
        rank = wdt.shape[1]
        if dtr.shape[3] != rank:
            raise ValueError(f"low-rank delta has {dtr.shape[3]} values per row, the projection expects {rank}")
    a_t = A.to(compute).reshape(groups, per_group, n_state).transpose(-1, -2).contiguous()  # (G, N, P)
    B, C = B.to(compute), C.to(compute)
    (B, sb), (C, sc) = row_view(B), row_view(C)
    if sb != sc:
        (B, sb), (C, sc) = row_view(B.contiguous()), row_view(C.contiguous())
    D = None if D is None else D.to(compute).reshape(groups, per_group).contiguous()
    bias = None if delta_bias is None else delta_bias.to(compute).reshape(groups, per_group).contiguous()
    y = torch.empty_like(u)
    lanes = batch * groups
    if h0 is None:
        h = u.new_zeros(lanes, n_state, per_group)
    else:
        h = h0.to(compute).reshape(lanes, n_state, per_group).clone()
    if length:
        params = ScanParams(
            L=length, lanes=lanes, G=groups, P=per_group, N=n_state,
            delta=None if dtr is not None else delta.data_ptr(), u=u.data_ptr(), A=a_t.data_ptr(),
            B=B.data_ptr(), C=C.data_ptr(), bc_stride=sb, D=pointer(D), bias=pointer(bias),
            softplus=int(bool(delta_softplus)), y=y.data_ptr(), h=h.data_ptr(),
            dtr=pointer(dtr), dt_stride=dt_stride, wdt=pointer(wdt), R=rank, ckpt=pointer(ckpt), T=ckpt_every,
        )  # fmt: skip
        _run(library, "scan", compute, params, lanes * (-(-per_group // library.block)))
    return y, h.view(batch, groups, n_state, per_group)


def scan_channels_first(
    library: KernelLibrary, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False
):
    """:func:`scan_time_major` on mamba_ssm's (batch, dim, L) layout with the optional gate ``z``; y in u's dtype."""
    n_state = A.shape[-1]
    batch, dim, length = u.shape
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    groups = B.shape[1]
    per_group = dim // groups

    def time_major(x):  # (batch, dim, L) -> (L, batch, G, P)
        return x.permute(2, 0, 1).reshape(length, batch, groups, per_group)

    a_g, b_t, c_t = A.reshape(groups, per_group, n_state), B.permute(3, 0, 1, 2), C.permute(3, 0, 1, 2)
    y = scan_time_major(library, time_major(u), time_major(delta), a_g, b_t, c_t, D, delta_bias, delta_softplus)[0]
    y = y.reshape(length, batch, dim).permute(1, 2, 0)
    return (y if z is None else y * F.silu(z.to(y.dtype))).to(u.dtype)


def causal_conv_silu(
    library: KernelLibrary, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, index: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`scripts.ssm.mixer.causal_conv_silu_reference` in one pass of the kernel; float32 or float64 (the
    promoted compute dtype). Width at most ``library.kmax``.

    With ``index`` (the mixers' direction gather), ``x`` is the (M, B, L, P) tokens (rows of P evenly spaced, for
    example a column slice of the input projection) and the kernel reads row ``index[(t * B + b) * G + g]`` of them
    for step t of sequence (b, g), as ``causal_conv_silu_reference(x.reshape(-1, P)[index].view(L, B, G, P), ...)``
    without the gathered copy. Output (L, B, G, P) contiguous.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    groups, per_group, width = weight.shape
    if width > library.kmax:
        raise ValueError(f"causal convolution of width {width}: the kernel takes at most {library.kmax}")
    x = x.to(compute)
    if index is None:
        length, batch = x.shape[:2]
        x, stride = x.contiguous(), per_group
    else:
        members, batch, tokens, _ = x.shape
        length = index.numel() // (batch * groups)
        x, stride = row_view(x)
        if index.dtype != torch.int64 or index.numel() % (batch * groups):
            raise ValueError(
                f"index must hold (L, {batch}, {groups}) int64 row numbers, got {index.numel()} {index.dtype}"
            )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= members * batch * tokens):
            raise ValueError("index refers to rows outside x")
        index = index.contiguous()
    taps = weight.to(compute).permute(2, 0, 1).contiguous()  # (K, G, P)
    bias = bias.to(compute).reshape(groups, per_group).contiguous()
    out = torch.empty(length, batch, groups, per_group, dtype=compute)
    if length:
        params = ConvSiluParams(
            lanes=batch * groups, G=groups, P=per_group, K=width, x=x.data_ptr(), x_stride=stride,
            index=pointer(index), taps=taps.data_ptr(), bias=bias.data_ptr(), out=out.data_ptr(),
        )  # fmt: skip
        _run(library, "conv_silu", compute, params, length)
    return out


def mixer_scan_applicable(
    library: KernelLibrary, x: torch.Tensor, d_inner: int, d_state: int, dt_rank: int, d_conv: int, lanes: int
) -> bool:
    """Whether :func:`mixer_scan` takes this mixer's shapes: float32, sizes within the kernel's buffers, and at least
    one lane per thread (its work items are lanes; fewer lanes run faster as separate kernels)."""
    return (
        x.dtype == torch.float32 and d_inner <= library.fused_pmax and dt_rank + 2 * d_state <= library.xmax
        and d_state <= library.nmax and d_conv <= library.kmax and lanes >= torch.get_num_threads()
    )  # fmt: skip


class MixerKernelWeights(NamedTuple):
    """A mixer's parameters in the float32 layouts :func:`mixer_scan` reads (:func:`prepare_mixer_weights`)."""

    taps: torch.Tensor  # (K, G, P) conv taps
    conv_bias: torch.Tensor  # (G, P)
    wxt: torch.Tensor  # (G, P, CP) x projection transposed, zero-padded to CP columns
    wdt: torch.Tensor  # (G, R, P) dt projection transposed
    A: torch.Tensor  # (G, N, P)
    dt_bias: torch.Tensor  # (G, P)
    D: torch.Tensor | None  # (G, P)
    norm_weight: torch.Tensor | None  # (M, P)
    norm_bias: torch.Tensor | None  # (M, P)


def prepare_mixer_weights(
    library: KernelLibrary, conv_weight: torch.Tensor, conv_bias: torch.Tensor, x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor | None,
    norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None,
) -> MixerKernelWeights:  # fmt: skip
    """The layouts :func:`mixer_scan` needs, computed once: a module can keep them between inference calls while its
    parameters are unchanged (about ten small copies per call otherwise). Shapes as :func:`mixer_scan`."""
    groups, per_group, _ = conv_weight.shape
    n_state, rank = A.shape[-1], dt_proj_weight.shape[-1]
    f32 = dict(dtype=torch.float32)
    block = library.block
    padded = -(-(rank + 2 * n_state) // block) * block
    members = None if norm_weight is None else norm_weight.shape[0]
    return MixerKernelWeights(
        taps=conv_weight.to(**f32).permute(2, 0, 1).contiguous(),
        conv_bias=conv_bias.to(**f32).reshape(groups, per_group).contiguous(),
        wxt=F.pad(x_proj_weight.to(**f32).transpose(1, 2), (0, padded - rank - 2 * n_state)).contiguous(),
        wdt=dt_proj_weight.to(**f32).reshape(groups, per_group, rank).transpose(-1, -2).contiguous(),
        A=A.to(**f32).reshape(groups, per_group, n_state).transpose(-1, -2).contiguous(),
        dt_bias=dt_bias.to(**f32).reshape(groups, per_group).contiguous(),
        D=None if D is None else D.to(**f32).reshape(groups, per_group).contiguous(),
        norm_weight=None if norm_weight is None else norm_weight.to(**f32).reshape(members, per_group).contiguous(),
        norm_bias=None if norm_bias is None else norm_bias.to(**f32).reshape(members, per_group).contiguous(),
    )


def mixer_scan(
    library: KernelLibrary, x: torch.Tensor, index: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
    x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor,
    D: torch.Tensor | None, source: torch.Tensor | None = None, z: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None, eps: float = 1e-5,
    prepared: MixerKernelWeights | None = None, check_index: bool = True,
) -> torch.Tensor:  # fmt: skip
    """A mixer's work between its input projection and its merge, in one float32 kernel pass (inference).

    Equal to :func:`causal_conv_silu` (``x``, ``index``, ``conv_weight`` (G, P, K), ``conv_bias``), then the
    x projection ``einsum("lbgp,gcp->lbgc", s, x_proj_weight)`` of s = that output, or of ``source`` gathered by
    ``index`` (cross-modal mixers), split into (dt (R), B (N), C (N)), then the selective scan of the output with the
    low-rank delta ``dt`` through ``dt_proj_weight`` (G, P, R), ``dt_bias`` (G, P) and softplus, ``A`` (G, P, N) and
    ``D`` (G, P): y (L, B, G, P), one work item per lane. Neither the convolution's output nor the projection is
    written to memory.

    With ``z`` (M, B, L, P) the merge follows in the same pass (:func:`gate_merge`, with the output norm when
    ``norm_weight`` and ``norm_bias`` are given): each work item is one (batch, member) set whose G / M direction
    lanes add into the token rows they visit (``index`` holds their token row numbers), so no time-major y is
    written at all; returns (M, B, L, P). The caller checks :func:`mixer_scan_applicable`.

    ``prepared``: the result of :func:`prepare_mixer_weights` for these parameters, kept by the caller (the parameter
    arguments are then read for their shapes only). ``check_index=False`` skips the bounds check of ``index`` (two
    reductions), for callers whose index was built for this x's shape.
    """
    groups, per_group, width = conv_weight.shape
    n_state, rank = A.shape[-1], dt_proj_weight.shape[-1]
    members, batch, tokens, _ = x.shape
    if index.dtype != torch.int64 or index.numel() % (batch * groups):
        raise ValueError(f"index must hold (L, {batch}, {groups}) int64 row numbers, got {index.numel()} {index.dtype}")
    if check_index and index.numel() and (int(index.min()) < 0 or int(index.max()) >= members * batch * tokens):
        raise ValueError("index refers to rows outside x")
    if x_proj_weight.shape != (groups, rank + 2 * n_state, per_group):
        expected = (groups, rank + 2 * n_state, per_group)
        raise ValueError(f"x projection weight {tuple(x_proj_weight.shape)}, expected {expected}")
    length = index.numel() // (batch * groups)
    merge = z is not None
    if merge:
        if groups % members or z.shape != (members, batch, length, per_group) or length != tokens:
            raise ValueError(
                f"the merge needs z {(members, batch, tokens, per_group)} and G a multiple of M, "
                f"got z {tuple(z.shape)}, G {groups}"
            )
        if (norm_weight is None) != (norm_bias is None):
            raise ValueError("the output norm needs both its weight and its bias")
        if norm_weight is not None and per_group > library.pmax:
            raise ValueError(f"rows of {per_group} channels: the merge normalises at most {library.pmax}")
    x, x_stride = row_view(x)
    src, src_stride = (None, 0) if source is None else row_view(source.to(torch.float32))
    f32 = dict(dtype=torch.float32)
    if prepared is None:
        prepared = prepare_mixer_weights(
            library, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, norm_weight, norm_bias
        )
    elif (norm_weight is None) != (prepared.norm_weight is None):
        raise ValueError("the prepared weights and the arguments disagree on the output norm")
    taps, conv_bias, wxt, wdt, a_t, dt_bias, D = prepared[:7]
    padded = wxt.shape[-1]
    if padded % library.block:
        raise ValueError(
            f"prepared weights padded to {padded} columns, not a multiple of this kernel build's {library.block}"
        )
    index = index.contiguous()
    h = torch.zeros(batch * groups, n_state, per_group, **f32)
    params = MixerScanParams(
        L=length, B=batch, G=groups, P=per_group, N=n_state, R=rank, K=width, x=x.data_ptr(), x_stride=x_stride,
        index=index.data_ptr(), taps=taps.data_ptr(), conv_bias=conv_bias.data_ptr(), src=pointer(src),
        src_stride=src_stride, wxt=wxt.data_ptr(), CP=padded, wdt=wdt.data_ptr(), dt_bias=dt_bias.data_ptr(),
        A=a_t.data_ptr(), D=pointer(D), h=h.data_ptr(),
    )  # fmt: skip
    if merge:
        out = torch.empty(members, batch, length, per_group, **f32)
        zr, z_stride = row_view(z.to(**f32))
        params.KD, params.y, params.out = groups // members, out.data_ptr(), out.data_ptr()  # y: not read
        params.z, params.z_stride = zr.data_ptr(), z_stride
        params.ln_w, params.ln_b, params.eps = pointer(prepared.norm_weight), pointer(prepared.norm_bias), float(eps)
        y, items = out, batch * members
    else:
        y = torch.empty(length, batch, groups, per_group, **f32)
        params.KD, params.y = 1, y.data_ptr()
        items = batch * groups
    if length:
        _run(library, "mixer_scan", torch.float32, params, items)
    return y


def gate_merge(
    library: KernelLibrary, y: torch.Tensor, index: torch.Tensor, z: torch.Tensor,
    norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None, eps: float = 1e-5,
) -> torch.Tensor:  # fmt: skip
    """:func:`scripts.ssm.mixer.gate_merge_reference` in one pass of the kernel, output contiguous (M, B, L, P).
    ``z`` may be a column slice of a wider tensor (no copy). With ``norm_weight`` and ``norm_bias`` (M, P), each
    output row is then normalised as ``F.layer_norm`` over P with member m's affine, in the same pass (P up to
    ``library.pmax``)."""
    compute = torch.promote_types(y.dtype, torch.float32)
    members, batch, length, width = z.shape
    y = y.to(compute).contiguous()
    directions = y.shape[2] // members
    expected = length * batch * members * directions
    if index.dtype != torch.int64 or index.numel() != expected:
        raise ValueError(f"index must hold {expected} int64 row numbers, got {index.numel()} {index.dtype}")
    if int(index.min()) < 0 or int(index.max()) >= y.numel() // width:
        raise ValueError("index refers to rows outside y")
    if (norm_weight is None) != (norm_bias is None):
        raise ValueError("the output norm needs both its weight and its bias")
    if norm_weight is not None:
        if width > library.pmax:
            raise ValueError(f"rows of {width} channels: the merge normalises at most {library.pmax}")
        norm_weight = norm_weight.to(compute).reshape(members, width).contiguous()
        norm_bias = norm_bias.to(compute).reshape(members, width).contiguous()
    index = index.contiguous()
    z, z_stride = row_view(z.to(compute))
    out = torch.empty(members, batch, length, width, dtype=compute)
    if length:
        params = GateMergeParams(
            L=length, B=batch, M=members, K=directions, P=width, y=y.data_ptr(), index=index.data_ptr(),
            z=z.data_ptr(), z_stride=z_stride, ln_w=pointer(norm_weight), ln_b=pointer(norm_bias), eps=float(eps),
            out=out.data_ptr(),
        )  # fmt: skip
        _run(library, "gate_merge", compute, params, length)
    return out


def checkpoint_interval(library: KernelLibrary, length: int, n_state: int) -> int:
    """Steps between the states the forward stores for the backward: the largest chunk whose recomputed states fit
    the backward kernel's buffer (T * N <= ``library.tnmax``)."""
    return max(1, min(length, library.tnmax // max(1, n_state)))


class CompiledSelectiveScan(torch.autograd.Function):
    """y_t = <C_t, h_t> + D u_t, h_t = exp(d_t A) h_{t-1} + d_t u_t B_t, d_t = softplus(delta_t + bias) (or without).

    The forward is :func:`scan_time_major` storing the state before every ``T``-th step (``T * N`` <= 256, a few MB
    for a training batch); the backward (``scan_bwd_*``) walks the chunks of ``T`` steps from last to first,
    recomputes each chunk's states from its checkpoint and runs the adjoint recurrence back through them, producing
    the gradients of delta (through the softplus), u, A, B, C, D and the delta bias in one pass per lane.

    Inputs: the library; time-major delta, u (L, batch, G, P); A (G, P, N); B, C (L, batch, G, N) (row views of a
    wider tensor are not copied); D, delta_bias (G, P) or None; delta_softplus bool; every: steps between stored
    states (None: :func:`checkpoint_interval`, also the upper limit). Returns y (L, batch, G, P) and the last state
    (batch, G, N, P) in the promoted compute dtype (float32 or float64).
    """

    @staticmethod
    def forward(ctx, library, delta, u, A, B, C, D, delta_bias, delta_softplus: bool, every: int | None = None):
        compute = torch.promote_types(u.dtype, torch.float32)
        length, batch, groups, per_group = u.shape
        n_state = A.shape[-1]
        delta, u = delta.to(compute).contiguous(), u.to(compute).contiguous()
        (B, stride_b), (C, stride_c) = row_view(B.to(compute)), row_view(C.to(compute))
        if stride_b != stride_c:
            B, C = B.contiguous(), C.contiguous()
        limit = checkpoint_interval(library, length, n_state)
        every = limit if every is None else max(1, min(int(every), limit))
        ckpt = u.new_empty(-(-length // every), batch * groups, n_state, per_group)
        y, last = scan_time_major(
            library, u, delta, A, B, C, D, delta_bias, delta_softplus, ckpt=ckpt, ckpt_every=every
        )
        a_t = A.to(compute).reshape(groups, per_group, n_state).transpose(-1, -2).contiguous()  # (G, N, P)
        D = None if D is None else D.to(compute).reshape(groups, per_group).contiguous()
        bias = None if delta_bias is None else delta_bias.to(compute).reshape(groups, per_group).contiguous()
        ctx.save_for_backward(delta, u, a_t, B, C, D, bias, ckpt)
        ctx.library, ctx.softplus, ctx.every = library, bool(delta_softplus), every
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
        _, stride_bc = row_view(B)
        if length:
            params = ScanBwdParams(
                L=length, lanes=lanes, G=groups, P=per_group, N=n_state, T=ctx.every,
                delta=delta.data_ptr(), u=u.data_ptr(), A=a_t.data_ptr(), B=B.data_ptr(), C=C.data_ptr(),
                bc_stride=stride_bc, D=pointer(D), bias=pointer(bias), softplus=int(ctx.softplus),
                ckpt=ckpt.data_ptr(), gy=grad_y.data_ptr(), glast=pointer(glast),
                gdelta=grad_delta.data_ptr(), gu=grad_u.data_ptr(), gB=grad_B.data_ptr(), gC=grad_C.data_ptr(),
                gA=grad_A.data_ptr(), gD=grad_D.data_ptr(), gbias=grad_bias.data_ptr(),
            )  # fmt: skip
            _run(ctx.library, "scan_bwd", u.dtype, params, lanes)
        else:
            grad_A.zero_(), grad_D.zero_(), grad_bias.zero_()
        grad_A = grad_A.view(batch, groups, n_state, per_group).sum(0).transpose(-1, -2)  # (G, P, N)
        grad_D = grad_D.view(batch, groups, per_group).sum(0) if D is not None else None
        grad_bias = grad_bias.view(batch, groups, per_group).sum(0) if bias is not None else None
        return None, grad_delta, grad_u, grad_A, grad_B, grad_C, grad_D, grad_bias, None, None


def scan_time_major_trainable(library: KernelLibrary, u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """:class:`CompiledSelectiveScan` on the mixers' layout (see :func:`scripts.ssm.selective_scan_time_major`);
    returns y (L, batch, G, P). Parameters of any shape that reshapes to (G, P) / (G, P, N) are accepted."""
    groups, per_group = u.shape[2], u.shape[3]
    A = A.reshape(groups, per_group, -1)
    D = None if D is None else D.reshape(groups, per_group)
    delta_bias = None if delta_bias is None else delta_bias.reshape(groups, per_group)
    return CompiledSelectiveScan.apply(library, delta, u, A, B, C, D, delta_bias, bool(delta_softplus))[0]
