"""The ``compiled`` selective-scan backend (run-time built C kernel) against the float64 reference, and its fallback."""

import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scripts.ssm.compiled as compiled
from scripts.ssm import (
    ENV_VAR,
    compiled_scan_available,
    compiled_scan_info,
    resolve_backend,
    selective_scan,
    selective_scan_compiled,
    selective_scan_fast,
    selective_scan_ref,
    selective_scan_time_major,
    set_scan_backend,
)
from test_ssm import make_inputs, rel_err  # float64 inputs and error measure shared with the fast-scan tests


needs_kernel = pytest.mark.skipif(not compiled_scan_available(), reason=f"kernel not built: {compiled_scan_info()['error']}")


def detached(inputs, dtype=None):
    return {k: v.detach().to(dtype or v.dtype) for k, v in inputs.items()}


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
    assert compiled.kernel_applicable(*inputs.values(), n_state=n_state)
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
    assert compiled._rows(b_sel)[0] is b_sel  # used in place
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
    assert compiled._rows(cast[1])[0].data_ptr() == cast[1].data_ptr() or dtype != torch.float64  # no copy of dt
    y = selective_scan_time_major(*cast[:6], delta_bias=cast[6], delta_softplus=True, backend="compiled", delta_proj_weight=cast[7])
    assert y.dtype == dtype
    assert rel_err(y.double(), y_ref) <= (1e-12 if dtype == torch.float64 else 2e-6)
    # the other backends take the same arguments and materialise delta
    y_fast = selective_scan_time_major(*cast[:6], delta_bias=cast[6], delta_softplus=True, backend="fast", delta_proj_weight=cast[7])
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
    conv = torch.nn.functional.conv1d(seq, weight.reshape(-1, 1, width), bias.reshape(-1), padding=width - 1, groups=groups * per_group)
    ref = torch.nn.functional.silu(conv[..., :length]).reshape(batch, groups, per_group, length).permute(3, 0, 1, 2)
    assert rel_err(compiled.causal_conv_silu_reference(x, weight, bias), ref) <= 1e-14
    out = compiled.causal_conv_silu_kernel(x.to(dtype), weight.to(dtype), bias.to(dtype))
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
    ref = compiled.causal_conv_silu_reference(gathered, weight, bias)
    out = compiled.causal_conv_silu_kernel(tokens.to(dtype), weight.to(dtype), bias.to(dtype), index=index)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out.double(), ref) <= (1e-13 if dtype == torch.float64 else 1e-6)
    with pytest.raises(ValueError, match="rows outside"):
        compiled.causal_conv_silu_kernel(tokens, weight, bias, index=index + members * batch * length)
    with pytest.raises(ValueError, match="int64 row numbers"):
        compiled.causal_conv_silu_kernel(tokens, weight, bias, index=index[:-1])
    with pytest.raises(ValueError, match="at most"):
        compiled.causal_conv_silu_kernel(tokens, torch.ones(groups, per_group, compiled.max_conv_width() + 1), bias, index=index)


@needs_kernel
def test_causal_conv_silu_saturates_without_overflow():
    x = torch.tensor([-200.0, -90.0, -30.0, 0.0, 30.0, 90.0, 200.0]).view(-1, 1, 1, 1)
    out = compiled.causal_conv_silu_kernel(x, torch.ones(1, 1, 1), torch.zeros(1, 1))
    assert torch.isfinite(out).all()
    assert torch.allclose(out.view(-1), torch.nn.functional.silu(x.view(-1)), rtol=1e-6, atol=1e-30)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length,batch,members,directions,width", [(30, 2, 2, 4, 20), (7, 1, 1, 1, 16), (12, 3, 2, 2, 5)])
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
    for l in range(length):
        for b in range(batch):
            for m in range(members):
                ref[m, b, l] = rows[idx[l, b, m]].mean(0) * torch.nn.functional.silu(z[m, b, l])
    assert rel_err(compiled.gate_merge_reference(y, index, z), ref) <= 1e-14
    out = compiled.gate_merge_kernel(y.to(dtype), index, z.to(dtype))
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    assert rel_err(out.double(), ref) <= (1e-14 if dtype == torch.float64 else 1e-6)
    with pytest.raises(ValueError, match="rows outside"):
        compiled.gate_merge_kernel(y, index + 1, z)


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
    merged = compiled.gate_merge_reference(y, index, z)
    ref = torch.nn.functional.layer_norm(merged, (width,), eps=1e-5) * weight[:, None, None] + bias[:, None, None]
    out = compiled.gate_merge_kernel(y.to(dtype), index, z.to(dtype), weight.to(dtype), bias.to(dtype), 1e-5)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out.double(), ref) <= (1e-13 if dtype == torch.float64 else 2e-6)
    with pytest.raises(ValueError, match="both"):
        compiled.gate_merge_kernel(y, index, z, weight, None)


@needs_kernel
def test_gate_merge_refuses_rows_too_wide_to_normalise():
    width = compiled.max_norm_width() + 1
    y, z = torch.zeros(1, 1, 1, width), torch.zeros(1, 1, 1, width)
    with pytest.raises(ValueError, match="at most"):
        compiled.gate_merge_kernel(y, torch.zeros(1, dtype=torch.int64), z, torch.ones(1, width), torch.zeros(1, width))


def test_kernel_builds_where_a_c_compiler_exists():
    # keeps a broken build or self-check from turning every kernel test above into a silent skip
    # (without a compiler the fast backend serves: tested by the fallback tests below)
    assert compiled._find_compiler() is None or compiled_scan_available(), compiled_scan_info()["error"]
    info = compiled_scan_info()
    if info["available"]:  # the vector width follows the instruction set (16 floats only with 512-bit registers)
        widths = {"AVX-512": 16, "AVX2+FMA": 8, "AVX": 8, "SSE2": 4, "NEON": 4, "generic": 4}
        assert widths.get(info["isa"]) == info["simd_width"], info


@needs_kernel
def test_mixer_uses_the_fused_kernels_only_without_autograd(monkeypatch):
    from scripts.networks.mamba import DirectionalMamba

    torch.manual_seed(0)
    mixer = DirectionalMamba(12, d_state=4, members=2, order_set="cross2d").double()
    x = torch.randn(2, 1, 30, 12, dtype=torch.float64)
    calls = []
    for name in ("causal_conv_silu_kernel", "gate_merge_kernel"):  # the compiled backend's mixer operations
        original = getattr(compiled, name)
        counted = lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k)  # noqa: E731
        monkeypatch.setattr(f"scripts.ssm.compiled_backend.{name}", counted)
    set_scan_backend("compiled")
    try:
        with torch.no_grad():
            y_kernel = mixer(x, (5, 6))
        assert sorted(set(calls)) == ["causal_conv_silu_kernel", "gate_merge_kernel"]  # inference: fused kernels ran
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


@needs_kernel
def test_openmp_build_runs_on_torch_runtime():
    # on Linux with PyTorch's OpenMP backend (the PyPI CPU wheels) the kernel is built with -fopenmp and binds
    # to the libgomp.so.1 that PyTorch loaded: no second runtime appears
    info = compiled_scan_info()
    assert info["openmp"] == ("-fopenmp" in info["flags"])
    if sys.platform.startswith("linux") and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert info["openmp"], "the kernel was built without OpenMP next to PyTorch's OpenMP runtime"
    if info["openmp"]:
        assert compiled._build["lib"].scan_openmp() == 1
        assert len(compiled._libgomp_so1_runtimes()) == 1


def fresh_build(monkeypatch, **env):
    monkeypatch.setattr(compiled, "_build", {})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return compiled_scan_info()


@needs_kernel
def test_build_without_openmp_gives_the_same_numbers(monkeypatch):
    inputs = detached(make_inputs(2, 96, 200, 8, groups=3, dtype=torch.float32))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        y_default = selective_scan_compiled(**inputs, delta_softplus=True)
        info = fresh_build(monkeypatch, CLINICALFMAMBA_SCAN_OPENMP="0")  # Python thread pool instead
        assert info["available"] and not info["openmp"] and "-fopenmp" not in info["flags"]
        y_pool = selective_scan_compiled(**inputs, delta_softplus=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y_default, y_pool)


@needs_kernel
def test_openmp_build_that_loads_a_second_runtime_is_not_used(monkeypatch, caplog):
    if not compiled._share_torch_openmp():
        pytest.skip("no OpenMP runtime of PyTorch's to share on this platform")
    calls = []

    def runtimes():  # a different runtime appears after the OpenMP build is loaded
        calls.append(1)
        return {"/torch/lib/libgomp.so.1"} if len(calls) <= 2 else {"/torch/lib/libgomp.so.1", "/usr/lib/libgomp.so.1"}

    monkeypatch.setattr(compiled, "_loaded_openmp_runtimes", runtimes)
    with caplog.at_level(logging.INFO, logger="scripts.ssm.compiled"):
        info = fresh_build(monkeypatch)
    assert info["available"] and not info["openmp"]
    assert any("second OpenMP runtime" in r.getMessage() for r in caplog.records)


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
    [(45, 37, 4, 3, 4), (16, 32, 16, 2, 2), (70, 16, 8, 8, 4), (40, 256, 8, 8, 4), (21, 256, 16, 8, 4), (35, 128, 8, 4, 4)],
)  # the last three: the shapes the kernel is specialised for (the 2D and 3D networks' mixers)
@pytest.mark.parametrize("cross", [False, True])
def test_fused_mixer_kernel_matches_the_separate_steps(length, per_group, n_state, rank, width, cross):
    # conv + SiLU of the gathered tokens, x projection (of the conv output or of a gathered source), scan
    members, batch, groups = 2, 2, 6
    tokens, index, p = _mixer_inputs(members, batch, length, groups, per_group, n_state, rank, width)
    source = _mixer_inputs(members, batch, length, groups, per_group, n_state, rank, width, seed=1)[0] if cross else None
    u = compiled.causal_conv_silu_reference(tokens.reshape(-1, per_group)[index].view(length, batch, groups, per_group), p["conv_weight"], p["conv_bias"])
    s = u if source is None else source.reshape(-1, per_group)[index].view_as(u)
    dt, b_sel, c_sel = torch.einsum("lbgp,gcp->lbgc", s, p["x_proj_weight"]).split([rank, n_state, n_state], dim=-1)
    delta = torch.einsum("lbgr,gpr->lbgp", dt, p["dt_proj_weight"])

    def channels_first(t):  # (L, B, G, X) -> (B, G * X, L)
        return t.permute(1, 2, 3, 0).reshape(batch, -1, length)

    ref = selective_scan_ref(
        channels_first(u), channels_first(delta), p["A"].reshape(-1, n_state), b_sel.permute(1, 2, 3, 0), c_sel.permute(1, 2, 3, 0),
        p["D"].reshape(-1), None, p["dt_bias"].reshape(-1), True,
    ).reshape(batch, groups, per_group, length).permute(3, 0, 1, 2)  # fmt: skip
    f32 = {k: v.float() for k, v in p.items()}
    out = compiled.mixer_scan_kernel(tokens.float(), index, **f32, source=None if source is None else source.float())
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out.double(), ref) <= 2e-6
    with pytest.raises(ValueError, match="rows outside"):
        compiled.mixer_scan_kernel(tokens.float(), index + members * batch * length, **f32)
    with pytest.raises(ValueError, match="x projection weight"):
        compiled.mixer_scan_kernel(tokens.float(), index, **{**f32, "x_proj_weight": f32["x_proj_weight"][:, 1:]})


@needs_kernel
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("per_group,n_state,rank", [(37, 8, 3), (256, 8, 8), (256, 16, 8), (128, 8, 4)])
def test_fused_mixer_kernel_with_the_merge_matches_scan_then_merge(norm, per_group, n_state, rank):
    # each (batch, member) set's directions add into the token rows they visit, then gate and norm: no time-major y
    members, batch, length, directions = 2, 3, 40, 4
    groups = members * directions
    tokens, _, p = _mixer_inputs(members, batch, length, groups, per_group, n_state, rank, 4)
    orders = torch.stack([torch.randperm(length, generator=torch.Generator().manual_seed(k)) for k in range(directions)])
    index = ((torch.arange(members).view(1, 1, -1, 1) * batch + torch.arange(batch).view(1, -1, 1, 1)) * length + orders.t().reshape(length, 1, 1, directions)).reshape(-1)
    aligned = torch.empty_like(index)  # row of the (L, B, M, K) outputs that holds each (token, direction)
    aligned[(index.view(length, batch, members, directions) * directions + torch.arange(directions)).reshape(-1)] = torch.arange(index.numel())
    backward = aligned.view(members, batch, length, directions).permute(2, 1, 0, 3).reshape(-1)
    z = torch.randn(members, batch, length, 2 * per_group, dtype=torch.float64)[..., per_group:]
    weight, bias = torch.randn(members, per_group, dtype=torch.float64), torch.randn(members, per_group, dtype=torch.float64)
    f32 = {k: v.float() for k, v in p.items()}
    y = compiled.mixer_scan_kernel(tokens.float(), index, **f32)
    ref = compiled.gate_merge_reference(y.double(), backward, z)
    if norm:
        ref = torch.nn.functional.layer_norm(ref, (per_group,)) * weight[:, None, None] + bias[:, None, None]
    extra = dict(norm_weight=weight.float(), norm_bias=bias.float()) if norm else {}
    out = compiled.mixer_scan_kernel(tokens.float(), index, **f32, z=z.float(), **extra)
    assert out.shape == (members, batch, length, per_group)
    assert rel_err(out.double(), ref) <= 2e-6
    with pytest.raises(ValueError, match="the merge needs z"):
        compiled.mixer_scan_kernel(tokens.float(), index, **f32, z=z.float()[:, :, 1:])


@needs_kernel
def test_mixer_runs_the_fused_kernel_at_inference_when_every_thread_gets_a_lane(monkeypatch):
    from scripts.networks.mamba import DirectionalMamba
    from scripts.networks.optimize import optimize_for_inference

    torch.manual_seed(0)
    mixer = DirectionalMamba(16, d_state=4, members=2, order_set="cross2d", cross_modal=True)
    mixer = optimize_for_inference(mixer.eval())
    x, extra = torch.randn(2, 1, 30, 16), torch.randn(2, 1, 30, 16)
    calls = []
    original = compiled.mixer_scan_kernel
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
            assert not compiled.mixer_scan_applicable(x.double(), 32, 4, 1, 4, 8)  # float32 only
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


@pytest.fixture
def broken_build(monkeypatch):
    """A fresh build state whose compiler call raises: the kernel is unavailable."""

    def fail(source, output, openmp=False):
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(compiled, "_build", {})
    monkeypatch.setattr(compiled, "_compile", fail)
    return monkeypatch


def test_failed_build_warns_once_and_falls_back_to_fast(broken_build, caplog):
    inputs = detached(make_inputs(2, 8, 40, 4, groups=2))
    y_fast = selective_scan_fast(**inputs, delta_softplus=True)
    with caplog.at_level(logging.WARNING, logger="scripts.ssm.compiled"):
        y1 = selective_scan(**inputs, delta_softplus=True, backend="compiled")
        y2 = selective_scan(**inputs, delta_softplus=True, backend="compiled")
    assert torch.equal(y1, y_fast) and torch.equal(y2, y_fast)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "simulated compiler failure" in warnings[0].getMessage()
    info = compiled_scan_info()
    assert not info["available"] and "simulated compiler failure" in info["error"]
    assert not compiled.kernel_applicable(inputs["u"], n_state=4)


def test_failed_build_auto_resolves_to_fast(broken_build):
    broken_build.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto", "cpu") == "fast"
    # the time-major entry (the mixers') also falls back
    length, batch, groups, per_group, n_state = 20, 1, 2, 3, 4
    inputs = detached(make_inputs(batch, groups * per_group, length, n_state, groups=groups))

    def tm(x):
        return x.permute(2, 0, 1).reshape(length, batch, groups, per_group)

    args = (tm(inputs["u"]), tm(inputs["delta"]), inputs["A"].reshape(groups, per_group, n_state))
    args += (inputs["B"].permute(3, 0, 1, 2), inputs["C"].permute(3, 0, 1, 2))
    y_c = selective_scan_time_major(*args, delta_softplus=True, backend="compiled")
    y_f = selective_scan_time_major(*args, delta_softplus=True, backend="fast")
    assert torch.equal(y_c, y_f)


def test_missing_compiler_and_failed_self_check_fall_back(monkeypatch):
    monkeypatch.setattr(compiled, "_build", {})
    monkeypatch.setattr(compiled, "_find_compiler", lambda: None)
    info = compiled_scan_info()
    assert not info["available"] and "no C compiler" in info["error"]
    # a kernel that builds but computes wrong numbers is rejected by the self-check
    monkeypatch.undo()
    if not compiled_scan_available():
        pytest.skip("no working C compiler here")
    monkeypatch.setattr(compiled, "_build", {})
    real = compiled.scan_time_major_kernel

    def wrong(*args, **kwargs):
        y, h = real(*args, **kwargs)
        return y * 1.01, h

    monkeypatch.setattr(compiled, "scan_time_major_kernel", wrong)
    info = compiled_scan_info()
    assert not info["available"] and "self-check failed" in info["error"]


@needs_kernel
def test_backend_selection_env_and_setter(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "compiled")
    assert resolve_backend(None, "cpu") == "compiled"
    monkeypatch.setenv(ENV_VAR, "fast")
    assert resolve_backend(None, "cpu") == "fast"
    set_scan_backend("compiled")
    try:
        assert resolve_backend(None, "cpu") == "compiled"
    finally:
        set_scan_backend(None)
    monkeypatch.delenv(ENV_VAR)
    assert resolve_backend("auto", "cpu") == "compiled"
    info = compiled_scan_info()
    assert info["available"] and info["seconds"] < compiled.COMPILE_TIMEOUT


def test_built_kernel_is_cached_for_later_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINICALFMAMBA_KERNEL_CACHE", str(tmp_path / "cache"))
    if compiled._find_compiler() is None:
        assert not compiled_scan_available()  # nothing to cache without a compiler
        return
    monkeypatch.setattr(compiled, "_build", {})
    assert compiled_scan_available()  # built with the compiler, then stored
    entries = sorted(p.suffix for p in (tmp_path / "cache").iterdir())
    assert entries == [".json", ".so"] or entries == [".json", ".json", ".so", ".so"]  # OpenMP build (+ fallback)

    def no_compiler(*args, **kwargs):
        raise AssertionError("the compiler ran although the cache holds this build")

    monkeypatch.setattr(compiled, "_build", {})
    monkeypatch.setattr(compiled.subprocess, "run", no_compiler)
    assert compiled_scan_available()  # a later process: loaded from the cache, self-checked again
    y = selective_scan_compiled(**detached(make_inputs(1, 8, 20, 4)), delta_softplus=True)
    assert torch.isfinite(y).all()


def test_kernel_cache_key_and_switch(tmp_path, monkeypatch):
    if compiled._find_compiler() is None:
        return
    a, b = tmp_path / "a.c", tmp_path / "b.c"
    a.write_text("int f(void) { return 1; }")
    b.write_text("int f(void) { return 2; }")
    cc = compiled._find_compiler()
    assert compiled._cache_key(a, cc, False) != compiled._cache_key(b, cc, False)  # the source
    assert compiled._cache_key(a, cc, False) != compiled._cache_key(a, cc, True)  # the OpenMP choice
    assert compiled._cache_key(a, cc, False) != compiled._cache_key(a, cc, False, "x86-64-v3")  # the -march target
    assert compiled._cache_key(a, cc, False) == compiled._cache_key(a, cc, False)
    monkeypatch.setenv("CLINICALFMAMBA_KERNEL_CACHE", "0")
    assert compiled.kernel_cache_dir() is None
    monkeypatch.delenv("CLINICALFMAMBA_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compiled.kernel_cache_dir() == tmp_path / "clinicalfmamba"
    # an unreadable entry is rebuilt, not trusted
    monkeypatch.setenv("CLINICALFMAMBA_KERNEL_CACHE", str(tmp_path / "c"))
    key = compiled._cache_key(a, cc, False)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / f"scan_kernel_{key}.so").write_bytes(b"not a library")
    (tmp_path / "c" / f"scan_kernel_{key}.json").write_text("{broken")
    out = tmp_path / "out.so"
    compiled._compile(a, str(out))
    assert out.read_bytes() != b"not a library"


def test_kernel_self_check_passes_in_fresh_processes():
    # the first multi-threaded exp of a process could be off by 1e-9 on one thread (about 1 process in 12 before
    # warm_up_exp), failing the float64 self-check and silently disabling the kernel; several fresh processes catch it
    code = "import scripts.ssm.compiled as c; print(c.compiled_scan_info()['error'])"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    for _ in range(6):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300)
        assert out.returncode == 0 and out.stdout.strip() == "None", out.stdout + out.stderr


def test_kernel_arch_comes_from_the_environment_and_is_checked(monkeypatch, caplog):
    monkeypatch.delenv(compiled.ARCH_ENV_VAR, raising=False)
    assert compiled.kernel_arch() == "native"
    monkeypatch.setenv(compiled.ARCH_ENV_VAR, " x86-64-v3 ")
    assert compiled.kernel_arch() == "x86-64-v3"
    monkeypatch.setenv(compiled.ARCH_ENV_VAR, "native -O0")  # one -march value, never extra flags
    with pytest.raises(ValueError, match=compiled.ARCH_ENV_VAR):
        compiled.kernel_arch()
    if compiled._find_compiler() is None:
        return
    with caplog.at_level(logging.WARNING, logger="scripts.ssm.compiled"):
        info = fresh_build(monkeypatch)  # the build reports it and the fast scan runs
    assert not info["available"] and compiled.ARCH_ENV_VAR in info["error"]
    assert any(compiled.ARCH_ENV_VAR in r.getMessage() for r in caplog.records)


#: -march targets without AVX-512, the SIMD width (floats) and instruction set the kernels use there: the AVX2 and SSE2 code paths,
#: which this machine's default (native) build does not run when it has AVX-512
PORTABLE_TARGETS = {"x86-64-v3": (8, "AVX2+FMA"), "x86-64": (4, "SSE2")}


@needs_kernel
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 -march targets need an x86-64 CPU")
@pytest.mark.parametrize("arch", sorted(PORTABLE_TARGETS))
def test_portable_builds_pass_every_kernel_test(arch):
    # every kernel test of this file and of the backward's, against the reference, with the kernels built for a CPU
    # without AVX-512 (in a fresh process: the build is once per process)
    root = Path(__file__).resolve().parents[1]
    code = (
        "import scripts.ssm.compiled as c; i = c.compiled_scan_info(); "
        "print(i['available'], i['simd_width'], i['isa'], ' '.join(i['flags'] or []), i['error'])"
    )
    env = {**os.environ, "PYTHONPATH": str(root), compiled.ARCH_ENV_VAR: arch}
    info = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    available, width, isa, *flags = info.stdout.split()
    expected_width, expected_isa = PORTABLE_TARGETS[arch]
    assert available == "True" and f"-march={arch}" in flags, info.stdout + info.stderr
    assert (int(width), isa) == (expected_width, expected_isa), info.stdout
    files = ["tests/test_ssm_compiled.py", "tests/test_ssm_compiled_grad.py"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files, "-k", "not portable_builds and not self_check_passes"],
        capture_output=True, text=True, env=env, cwd=root, timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
