"""The compiled kernels (scripts/ssm/native) against the float64 reference: scan, causal conv + SiLU, gated merge,
fused mixer kernel, in float64 and float32, through the ``compiled`` backend and the ops entry points."""

import pytest
import torch
from native_testing import detached, needs_kernel
from scan_testing import make_inputs, rel_err

from scripts.ssm import (
    compiled_backend,
    selective_scan,
    selective_scan_compiled,
    selective_scan_fast,
    selective_scan_ref,
    selective_scan_time_major,
    set_scan_backend,
)
from scripts.ssm.mixer import causal_conv_silu_reference, gate_merge_reference
from scripts.ssm.native import ops
from scripts.ssm.native.loader import kernel_library


@needs_kernel
@pytest.mark.parametrize(
    "batch,dim,length,n_state,groups,softplus,drop",
    [
        (2, 4, 64, 8, None, True, ()),  # 4 channels: one partial SIMD block
        (1, 40, 300, 16, 2, True, ()),  # 20 channels per group: a full and a partial block
        (2, 64, 129, 8, 4, False, ("D", "z", "delta_bias")),  # no skip, no gate, no bias
        (1, 3, 2048, 8, None, False, ()),  # raw delta up to 8: large steps
    ],
)
def test_kernel_matches_reference_float64(batch, dim, length, n_state, groups, softplus, drop):
    inputs = detached(make_inputs(batch, dim, length, n_state, groups))
    for name in drop:
        inputs[name] = None
    y_ref, h_ref = selective_scan_ref(**inputs, delta_softplus=softplus, return_last_state=True)
    assert compiled_backend.kernel_applicable(*inputs.values(), n_state=n_state)
    y, h = selective_scan_compiled(**inputs, delta_softplus=softplus, return_last_state=True)
    assert y.dtype == torch.float64
    assert rel_err(y, y_ref) <= 1e-12
    assert rel_err(h, h_ref) <= 1e-12


@needs_kernel
@pytest.mark.parametrize("groups", [None, 4])
def test_kernel_float32_close_to_float64_reference(groups):
    inputs = detached(make_inputs(2, 48, 500, 16, groups, delta_max=4.0, seed=1))
    y_ref = selective_scan_ref(**inputs, delta_softplus=True)
    y = selective_scan_compiled(**detached(inputs, torch.float32), delta_softplus=True)
    assert y.dtype == torch.float32
    assert rel_err(y.double(), y_ref) <= 2e-6
    # the fast backend in float32, for scale: the kernel is not less accurate
    y_fast = selective_scan_fast(**detached(inputs, torch.float32), delta_softplus=True)
    assert rel_err(y.double(), y_ref) <= 2 * rel_err(y_fast.double(), y_ref) + 1e-7


@needs_kernel
def test_float32_kernels_flush_denormals_only_inside():
    # exp(d A) in the denormal range (d |A| from 87 to 103) is flushed inside the kernel, within the tolerance of the
    # float64 reference; PyTorch's own threads get their floating-point state back (denormals survive a multiply)
    inputs = detached(make_inputs(1, 32, 256, 8, dtype=torch.float32, seed=5))
    inputs["A"] = -torch.linspace(87.0, 103.0, 32 * 8).view(32, 8) / 2
    inputs["delta"] = torch.full_like(inputs["delta"], 2.0)  # d A in [-103, -87]: exp(d A) is denormal in float32
    y_ref = selective_scan_ref(**detached(inputs, torch.float64))
    y = selective_scan_compiled(**inputs)
    assert rel_err(y.double(), y_ref) <= 2e-6
    tiny = torch.full((1 << 18,), 1e-39)  # a denormal float32, over both threads
    assert bool(((tiny * 1.0) > 0).all()) and float(torch.tensor([1e-39]) * 1.0) > 0


@needs_kernel
def test_kernel_float32_underflow_and_softplus_range_stay_exact():
    # exp(delta * A) underflows to 0 for large steps; raw delta spans the softplus' linear and exp regimes
    inputs = detached(make_inputs(1, 32, 2048, 16, delta_max=30.0, dtype=torch.float32, seed=3))
    inputs["A"] = inputs["A"] * 20
    inputs["delta"] = inputs["delta"] * 2 - 30  # -30 .. 30
    y_ref = selective_scan_ref(**detached(inputs, torch.float64), delta_softplus=True)
    y = selective_scan_compiled(**inputs, delta_softplus=True)
    assert torch.isfinite(y).all()
    assert rel_err(y.double(), y_ref) <= 2e-6


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_time_major_entry_with_split_views_matches_reference(dtype):
    # the mixers pass B and C as split views of one projection output: strided rows, no copy needed
    length, batch, groups, per_group, n_state, rank = 70, 2, 3, 20, 8, 4
    inputs = detached(make_inputs(batch, groups * per_group, length, n_state, groups=groups))
    y_ref = selective_scan_ref(**{k: v for k, v in inputs.items() if k != "z"}, delta_softplus=True)

    def tm(x):  # (batch, G*P, L) -> (L, batch, G, P)
        return x.permute(2, 0, 1).reshape(length, batch, groups, per_group).contiguous()

    projection = torch.randn(length, batch, groups, rank + 2 * n_state, dtype=torch.float64)
    projection[..., rank : rank + n_state] = inputs["B"].permute(3, 0, 1, 2)
    projection[..., rank + n_state :] = inputs["C"].permute(3, 0, 1, 2)
    _, b_sel, c_sel = projection.to(dtype).split([rank, n_state, n_state], dim=-1)
    assert ops.row_view(b_sel)[0] is b_sel  # used in place
    args = [tm(inputs["u"]), tm(inputs["delta"]), inputs["A"].reshape(groups, per_group, n_state)]
    skip, bias = inputs["D"].reshape(groups, per_group), inputs["delta_bias"].reshape(groups, per_group)
    args = [a.to(dtype) for a in args] + [b_sel, c_sel, skip.to(dtype)]
    y = selective_scan_time_major(*args, delta_bias=bias.to(dtype), delta_softplus=True, backend="compiled")
    assert y.dtype == dtype
    assert rel_err(y.double(), tm(y_ref)) <= (1e-12 if dtype == torch.float64 else 2e-6)


def _low_rank_inputs(length, batch, groups, per_group, n_state, rank, seed=0):
    """Time-major inputs whose delta is a low-rank projection; dt, B and C are split views of one tensor."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(length, batch, groups, per_group, generator=g, dtype=torch.float64)
    projection = torch.randn(length, batch, groups, rank + 2 * n_state, generator=g, dtype=torch.float64)
    dt, b_sel, c_sel = projection.split([rank, n_state, n_state], dim=-1)
    w_dt = torch.randn(groups, per_group, rank, generator=g, dtype=torch.float64) / rank**0.5
    A = -torch.rand(groups, per_group, n_state, generator=g, dtype=torch.float64) * 2 - 0.1
    D, bias = (torch.randn(groups, per_group, generator=g, dtype=torch.float64) for _ in range(2))
    return u, dt, w_dt, A, b_sel, c_sel, D, bias


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_group,rank", [(20, 4), (16, 1), (37, 9)])  # full and partial SIMD blocks
def test_low_rank_delta_matches_explicit_projection(dtype, per_group, rank):
    # the kernel folds Mamba's dt projection into the scan; the reference materialises delta first
    length, batch, groups, n_state = 90, 2, 3, 8
    u, dt, w_dt, A, b_sel, c_sel, D, bias = _low_rank_inputs(length, batch, groups, per_group, n_state, rank)
    delta = torch.einsum("lbgr,gpr->lbgp", dt, w_dt)

    def channels_first(x):  # (L, batch, G, P) -> (batch, G*P, L)
        return x.permute(1, 2, 3, 0).reshape(batch, groups * per_group, length)

    y_ref = selective_scan_ref(
        channels_first(u), channels_first(delta), A.reshape(-1, n_state), b_sel.permute(1, 2, 3, 0),
        c_sel.permute(1, 2, 3, 0), D.reshape(-1), None, bias.reshape(-1), True,
    )  # fmt: skip
    y_ref = y_ref.reshape(batch, groups, per_group, length).permute(3, 0, 1, 2)
    cast = [t.to(dtype) for t in (u, dt, A, b_sel, c_sel, D, bias, w_dt)]
    assert ops.row_view(cast[1])[0].data_ptr() == cast[1].data_ptr() or dtype != torch.float64  # no copy of dt
    y = selective_scan_time_major(
        *cast[:6], delta_bias=cast[6], delta_softplus=True, backend="compiled", delta_proj_weight=cast[7]
    )
    assert y.dtype == dtype
    assert rel_err(y.double(), y_ref) <= (1e-12 if dtype == torch.float64 else 2e-6)
    # the other backends take the same arguments and materialise delta
    y_fast = selective_scan_time_major(
        *cast[:6], delta_bias=cast[6], delta_softplus=True, backend="fast", delta_proj_weight=cast[7]
    )
    assert rel_err(y_fast.double(), y_ref) <= (1e-12 if dtype == torch.float64 else 2e-6)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length,per_group,width", [(50, 20, 4), (2, 16, 4), (33, 7, 3), (10, 40, 1)])
def test_causal_conv_silu_matches_reference(dtype, length, per_group, width):
    # lengths shorter than the kernel, partial SIMD blocks, and a width-1 convolution
    g = torch.Generator().manual_seed(length)
    batch, groups = 2, 3
    x = torch.randn(length, batch, groups, per_group, generator=g, dtype=torch.float64) * 3
    weight = torch.randn(groups, per_group, width, generator=g, dtype=torch.float64)
    bias = torch.randn(groups, per_group, generator=g, dtype=torch.float64)
    # independent float64 reference: F.conv1d with left padding, per group
    seq = x.permute(1, 2, 3, 0).reshape(batch, groups * per_group, length)
    conv = torch.nn.functional.conv1d(
        seq, weight.reshape(-1, 1, width), bias.reshape(-1), padding=width - 1, groups=groups * per_group
    )
    ref = torch.nn.functional.silu(conv[..., :length]).reshape(batch, groups, per_group, length).permute(3, 0, 1, 2)
    assert rel_err(causal_conv_silu_reference(x, weight, bias), ref) <= 1e-14
    out = ops.causal_conv_silu(kernel_library(), x.to(dtype), weight.to(dtype), bias.to(dtype))
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out.double(), ref) <= (1e-13 if dtype == torch.float64 else 1e-6)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length,per_group,width", [(50, 20, 4), (3, 16, 4), (9, 37, 16)])
def test_causal_conv_silu_reads_the_direction_gather_in_place(dtype, length, per_group, width):
    # the mixers' input: tokens (M, B, L, P) as a column slice of a wider projection, read through an index
    g = torch.Generator().manual_seed(width)
    members, batch, directions = 2, 2, 3
    groups = members * directions
    projection = torch.randn(members, batch, length, 2 * per_group, generator=g, dtype=torch.float64)
    tokens = projection[..., :per_group]
    index = torch.randint(0, members * batch * length, (length * batch * groups,), generator=g)
    weight = torch.randn(groups, per_group, width, generator=g, dtype=torch.float64)
    bias = torch.randn(groups, per_group, generator=g, dtype=torch.float64)
    gathered = tokens.reshape(-1, per_group).index_select(0, index).view(length, batch, groups, per_group)
    ref = causal_conv_silu_reference(gathered, weight, bias)
    out = ops.causal_conv_silu(kernel_library(), tokens.to(dtype), weight.to(dtype), bias.to(dtype), index=index)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out.double(), ref) <= (1e-13 if dtype == torch.float64 else 1e-6)
    with pytest.raises(ValueError, match="rows outside"):
        ops.causal_conv_silu(kernel_library(), tokens, weight, bias, index=index + members * batch * length)
    with pytest.raises(ValueError, match="int64 row numbers"):
        ops.causal_conv_silu(kernel_library(), tokens, weight, bias, index=index[:-1])
    with pytest.raises(ValueError, match="at most"):
        ops.causal_conv_silu(
            kernel_library(), tokens, torch.ones(groups, per_group, kernel_library().kmax + 1), bias, index=index
        )


@needs_kernel
def test_causal_conv_silu_saturates_without_overflow():
    x = torch.tensor([-200.0, -90.0, -30.0, 0.0, 30.0, 90.0, 200.0]).view(-1, 1, 1, 1)
    out = ops.causal_conv_silu(kernel_library(), x, torch.ones(1, 1, 1), torch.zeros(1, 1))
    assert torch.isfinite(out).all()
    assert torch.allclose(out.view(-1), torch.nn.functional.silu(x.view(-1)), rtol=1e-6, atol=1e-30)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "length,batch,members,directions,width", [(30, 2, 2, 4, 20), (7, 1, 1, 1, 16), (12, 3, 2, 2, 5)]
)
def test_gate_merge_matches_reference(dtype, length, batch, members, directions, width):
    # scan outputs back to token order, averaged over directions, gated by silu(z) (z a column slice, no copy)
    g = torch.Generator().manual_seed(width)
    y = torch.randn(length, batch, members * directions, width, generator=g, dtype=torch.float64)
    z = torch.randn(members, batch, length, 2 * width, generator=g, dtype=torch.float64)[..., width:]
    index = torch.randperm(y.numel() // width, generator=g)
    # independent float64 reference: explicit loops over tokens and directions
    rows = y.reshape(-1, width)
    idx = index.view(length, batch, members, directions)
    ref = torch.empty(members, batch, length, width, dtype=torch.float64)
    for t in range(length):
        for b in range(batch):
            for m in range(members):
                ref[m, b, t] = rows[idx[t, b, m]].mean(0) * torch.nn.functional.silu(z[m, b, t])
    assert rel_err(gate_merge_reference(y, index, z), ref) <= 1e-14
    out = ops.gate_merge(kernel_library(), y.to(dtype), index, z.to(dtype))
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    assert rel_err(out.double(), ref) <= (1e-14 if dtype == torch.float64 else 1e-6)
    with pytest.raises(ValueError, match="rows outside"):
        ops.gate_merge(kernel_library(), y, index + 1, z)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("members,width", [(2, 20), (1, 37), (2, 256)])
def test_gate_merge_with_the_output_norm_matches_layer_norm(dtype, members, width):
    g = torch.Generator().manual_seed(width)
    length, batch, directions = 11, 2, 4
    y = torch.randn(length, batch, members * directions, width, generator=g, dtype=torch.float64) * 3 + 1
    z = torch.randn(members, batch, length, 2 * width, generator=g, dtype=torch.float64)[..., width:]
    index = torch.randperm(y.numel() // width, generator=g)
    weight, bias = (torch.randn(members, width, generator=g, dtype=torch.float64) for _ in range(2))
    merged = gate_merge_reference(y, index, z)
    ref = torch.nn.functional.layer_norm(merged, (width,), eps=1e-5) * weight[:, None, None] + bias[:, None, None]
    out = ops.gate_merge(kernel_library(), y.to(dtype), index, z.to(dtype), weight.to(dtype), bias.to(dtype), 1e-5)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out.double(), ref) <= (1e-13 if dtype == torch.float64 else 2e-6)
    with pytest.raises(ValueError, match="both"):
        ops.gate_merge(kernel_library(), y, index, z, weight, None)


@needs_kernel
def test_gate_merge_refuses_rows_too_wide_to_normalise():
    width = kernel_library().pmax + 1
    y, z = torch.zeros(1, 1, 1, width), torch.zeros(1, 1, 1, width)
    with pytest.raises(ValueError, match="at most"):
        ops.gate_merge(
            kernel_library(), y, torch.zeros(1, dtype=torch.int64), z, torch.ones(1, width), torch.zeros(1, width)
        )


@needs_kernel
def test_mixer_uses_the_fused_kernels_only_without_autograd(monkeypatch):
    from scripts.networks.mamba import DirectionalMamba

    torch.manual_seed(0)
    mixer = DirectionalMamba(12, d_state=4, members=2, order_set="cross2d").double()
    x = torch.randn(2, 1, 30, 12, dtype=torch.float64)
    calls = []
    for name in ("causal_conv_silu", "gate_merge"):  # the compiled backend's mixer operations
        original = getattr(ops, name)
        counted = lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k)  # noqa: E731
        monkeypatch.setattr(ops, name, counted)
    set_scan_backend("compiled")
    try:
        with torch.no_grad():
            y_kernel = mixer(x, (5, 6))
        assert sorted(set(calls)) == ["causal_conv_silu", "gate_merge"]  # inference: fused kernels ran
        calls.clear()
        y_grad = mixer(x.requires_grad_(), (5, 6))  # training: convolution and merge as PyTorch ops with autograd
        assert not calls
        y_grad.sum().backward()
        assert mixer.dt_proj_weight.grad is not None and mixer.conv_weight.grad.abs().max() > 0
        set_scan_backend("reference")
        with torch.no_grad():
            y_ref = mixer(x.detach(), (5, 6))
    finally:
        set_scan_backend(None)
    assert rel_err(y_kernel, y_ref) <= 1e-12
    assert rel_err(y_grad.detach(), y_ref) <= 1e-12


@needs_kernel
def test_threads_split_the_work_without_changing_the_result():
    # 2 x 3 lanes of 40 channels: 3 blocks each (the last partial), 18 work items; 5 and 7 threads split lanes
    # between threads, and 203 steps end inside a delta-ahead group and a time chunk
    inputs = detached(make_inputs(2, 120, 203, 8, groups=3, dtype=torch.float32))
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 3, 5, 7):
            torch.set_num_threads(count)
            outputs.append(selective_scan_compiled(**inputs, delta_softplus=True, return_last_state=True))
    finally:
        torch.set_num_threads(threads)
    for y, h in outputs[1:]:
        assert torch.equal(y, outputs[0][0]) and torch.equal(h, outputs[0][1])
    y_ref, h_ref = selective_scan_ref(**detached(inputs, torch.float64), delta_softplus=True, return_last_state=True)
    assert rel_err(outputs[0][0].double(), y_ref) <= 2e-6
    assert rel_err(outputs[0][1].double(), h_ref) <= 2e-6


def test_autograd_gradients_match_reference():
    # with grad, the compiled backend runs its compiled backward (the fast one without a kernel): same values and
    # gradients as the reference
    inputs = make_inputs(1, 6, 100, 8, groups=2)
    y_ref = selective_scan_ref(**inputs, delta_softplus=True)
    y = selective_scan(**inputs, delta_softplus=True, backend="compiled")
    assert rel_err(y, y_ref) <= 1e-10
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, list(inputs.values()), g)
    grads_ref = torch.autograd.grad(y_ref, list(inputs.values()), g)
    for name, a, b in zip(inputs, grads, grads_ref):
        assert rel_err(a, b) <= 1e-10, name


def _mixer_inputs(members, batch, length, groups, per_group, n_state, rank, width, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    tokens = rand(members, batch, length, 2 * per_group)[..., :per_group]  # a column slice, as the in-projection's
    index = torch.randint(0, members * batch * length, (length * batch * groups,), generator=g)
    params = dict(
        conv_weight=rand(groups, per_group, width, scale=0.5), conv_bias=rand(groups, per_group, scale=0.2),
        x_proj_weight=rand(groups, rank + 2 * n_state, per_group, scale=per_group**-0.5),
        dt_proj_weight=rand(groups, per_group, rank, scale=rank**-0.5), dt_bias=rand(groups, per_group, scale=0.5) - 3,
        A=-torch.rand(groups, per_group, n_state, generator=g, dtype=torch.float64) * 4, D=rand(groups, per_group),
    )  # fmt: skip
    return tokens, index, params


@needs_kernel
@pytest.mark.parametrize(
    "length,per_group,n_state,rank,width",
    [
        (45, 37, 4, 3, 4),
        (16, 32, 16, 2, 2),
        (70, 16, 8, 8, 4),
        (40, 256, 8, 8, 4),
        (21, 256, 16, 8, 4),
        (35, 128, 8, 4, 4),
    ],
)  # the last three: the shapes the kernel is specialised for (the 2D and 3D networks' mixers)
@pytest.mark.parametrize("cross", [False, True])
def test_fused_mixer_kernel_matches_the_separate_steps(length, per_group, n_state, rank, width, cross):
    # conv + SiLU of the gathered tokens, x projection (of the conv output or of a gathered source), scan
    members, batch, groups = 2, 2, 6
    tokens, index, p = _mixer_inputs(members, batch, length, groups, per_group, n_state, rank, width)
    source = (
        _mixer_inputs(members, batch, length, groups, per_group, n_state, rank, width, seed=1)[0] if cross else None
    )
    u = causal_conv_silu_reference(
        tokens.reshape(-1, per_group)[index].view(length, batch, groups, per_group), p["conv_weight"], p["conv_bias"]
    )
    s = u if source is None else source.reshape(-1, per_group)[index].view_as(u)
    dt, b_sel, c_sel = torch.einsum("lbgp,gcp->lbgc", s, p["x_proj_weight"]).split([rank, n_state, n_state], dim=-1)
    delta = torch.einsum("lbgr,gpr->lbgp", dt, p["dt_proj_weight"])

    def channels_first(t):  # (L, B, G, X) -> (B, G * X, L)
        return t.permute(1, 2, 3, 0).reshape(batch, -1, length)

    ref = selective_scan_ref(
        channels_first(u), channels_first(delta), p["A"].reshape(-1, n_state), b_sel.permute(1, 2, 3, 0),
        c_sel.permute(1, 2, 3, 0), p["D"].reshape(-1), None, p["dt_bias"].reshape(-1), True,
    ).reshape(batch, groups, per_group, length).permute(3, 0, 1, 2)  # fmt: skip
    f32 = {k: v.float() for k, v in p.items()}
    out = ops.mixer_scan(
        kernel_library(), tokens.float(), index, **f32, source=None if source is None else source.float()
    )
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out.double(), ref) <= 2e-6
    with pytest.raises(ValueError, match="rows outside"):
        ops.mixer_scan(kernel_library(), tokens.float(), index + members * batch * length, **f32)
    with pytest.raises(ValueError, match="x projection weight"):
        ops.mixer_scan(kernel_library(), tokens.float(), index, **{**f32, "x_proj_weight": f32["x_proj_weight"][:, 1:]})


@needs_kernel
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("per_group,n_state,rank", [(37, 8, 3), (256, 8, 8), (256, 16, 8), (128, 8, 4)])
def test_fused_mixer_kernel_with_the_merge_matches_scan_then_merge(norm, per_group, n_state, rank):
    # each (batch, member) set's directions add into the token rows they visit, then gate and norm: no time-major y
    members, batch, length, directions = 2, 3, 40, 4
    groups = members * directions
    tokens, _, p = _mixer_inputs(members, batch, length, groups, per_group, n_state, rank, 4)
    orders = torch.stack(
        [torch.randperm(length, generator=torch.Generator().manual_seed(k)) for k in range(directions)]
    )
    index = (
        (torch.arange(members).view(1, 1, -1, 1) * batch + torch.arange(batch).view(1, -1, 1, 1)) * length
        + orders.t().reshape(length, 1, 1, directions)
    ).reshape(-1)
    aligned = torch.empty_like(index)  # row of the (L, B, M, K) outputs that holds each (token, direction)
    aligned[(index.view(length, batch, members, directions) * directions + torch.arange(directions)).reshape(-1)] = (
        torch.arange(index.numel())
    )
    backward = aligned.view(members, batch, length, directions).permute(2, 1, 0, 3).reshape(-1)
    z = torch.randn(members, batch, length, 2 * per_group, dtype=torch.float64)[..., per_group:]
    weight, bias = (
        torch.randn(members, per_group, dtype=torch.float64),
        torch.randn(members, per_group, dtype=torch.float64),
    )
    f32 = {k: v.float() for k, v in p.items()}
    y = ops.mixer_scan(kernel_library(), tokens.float(), index, **f32)
    ref = gate_merge_reference(y.double(), backward, z)
    if norm:
        ref = torch.nn.functional.layer_norm(ref, (per_group,)) * weight[:, None, None] + bias[:, None, None]
    extra = dict(norm_weight=weight.float(), norm_bias=bias.float()) if norm else {}
    out = ops.mixer_scan(kernel_library(), tokens.float(), index, **f32, z=z.float(), **extra)
    assert out.shape == (members, batch, length, per_group)
    assert rel_err(out.double(), ref) <= 2e-6
    with pytest.raises(ValueError, match="the merge needs z"):
        ops.mixer_scan(kernel_library(), tokens.float(), index, **f32, z=z.float()[:, :, 1:])


@needs_kernel
def test_mixer_runs_the_fused_kernel_at_inference_when_every_thread_gets_a_lane(monkeypatch):
    from scripts.networks.mamba import DirectionalMamba
    from scripts.networks.optimize import optimize_for_inference

    torch.manual_seed(0)
    mixer = DirectionalMamba(16, d_state=4, members=2, order_set="cross2d", cross_modal=True)
    mixer = optimize_for_inference(mixer.eval())
    x, extra = torch.randn(2, 1, 30, 16), torch.randn(2, 1, 30, 16)
    calls = []
    original = compiled_backend.mixer_scan_kernel
    counted = lambda *a, **k: calls.append(1) or original(*a, **k)  # noqa: E731
    monkeypatch.setattr("scripts.ssm.compiled_backend.mixer_scan_kernel", counted)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.inference_mode():
            fused = mixer(x, (5, 6), extra=extra)
            assert calls  # 8 lanes for 2 threads
            calls.clear()
            torch.set_num_threads(16)
            separate = mixer(x, (5, 6), extra=extra)
            assert not calls  # fewer lanes than threads: the separate kernels keep every thread busy
            assert not ops.mixer_scan_applicable(kernel_library(), x.double(), 32, 4, 1, 4, 8)  # float32 only
    finally:
        torch.set_num_threads(threads)
    assert (fused - separate).abs().max() <= 1e-5


@needs_kernel
def test_mixer_keeps_its_kernel_weights_until_a_parameter_changes():
    from scripts.networks.mamba import DirectionalMamba
    from scripts.networks.optimize import optimize_for_inference

    torch.manual_seed(0)
    mixer = optimize_for_inference(DirectionalMamba(16, d_state=4, members=2, order_set="cross2d").eval())
    other = DirectionalMamba(16, d_state=4, members=2, order_set="cross2d").eval()
    x = torch.randn(2, 1, 30, 16)

    def run(module, backend=None):
        module.scan_backend = backend
        with torch.inference_mode():
            return module(x, (5, 6))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # 2 member sets for 2 threads: the fused kernel with the merge
        first = run(mixer)
        kept = mixer.kernel_weights[1]
        assert torch.equal(run(mixer), first) and mixer.kernel_weights[1] is kept  # reused, same result
        with torch.no_grad():
            mixer.D.add_(0.5)  # an in-place update (an optimiser step) bumps the version counter
        changed = run(mixer)
        assert mixer.kernel_weights[1] is not kept
        assert (changed - first).abs().max() > 1e-3
        assert (changed - run(mixer, "fast")).abs().max() <= 1e-5
        mixer.load_state_dict(other.state_dict())  # copied in place
        assert (run(mixer, "compiled") - run(other, "fast")).abs().max() <= 1e-5
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_network_inference_matches_fast_backend():
    from scripts.networks import ClinicalFMamba
    from scripts.networks.optimize import optimize_for_inference

    torch.manual_seed(0)
    net = optimize_for_inference(ClinicalFMamba().eval())  # the fused mixer kernels too
    x = torch.rand(1, 2, 48, 48)
    with torch.inference_mode():
        set_scan_backend("fast")
        try:
            y_fast = net(x)
            set_scan_backend("compiled")
            y_comp = net(x)
        finally:
            set_scan_backend(None)
    assert (y_comp - y_fast).abs().max() <= 1e-5
