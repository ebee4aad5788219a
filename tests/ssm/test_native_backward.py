"""The compiled scan with autograd (C forward with checkpoints + C backward) against autograd on the float64
reference."""

import pytest
import torch
from native_testing import needs_kernel
from scan_testing import make_inputs, rel_err

from scripts.ssm import (
    compiled_scan_available,
    selective_scan_compiled,
    selective_scan_fast,
    selective_scan_ref,
    selective_scan_time_major,
    set_scan_backend,
)
from scripts.ssm.native import build, loader, threads
from scripts.ssm.native.loader import kernel_library
from scripts.ssm.native.ops import CompiledSelectiveScan, checkpoint_interval


def leaves(inputs, dtype=None):
    return {k: v.detach().to(dtype or v.dtype).requires_grad_() for k, v in inputs.items()}


def scan_with_grads(fn, inputs, softplus, seed=1):
    """Outputs (y, last state) and the gradients of a random linear function of both w.r.t. every input."""
    y, last = fn(**inputs, delta_softplus=softplus, return_last_state=True)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gh = torch.randn(last.shape, generator=g, dtype=torch.float64).to(y.dtype)
    names = [k for k, v in inputs.items() if v is not None]
    grads = torch.autograd.grad((y, last), [inputs[k] for k in names], (gy, gh))
    return y, last, dict(zip(names, grads))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Names of the compiled backward entry points that ran."""
    calls = []
    original = threads.run_items

    def spy(fn, params, items, openmp):
        if fn.__name__.startswith("scan_bwd"):
            calls.append(fn.__name__)
        return original(fn, params, items, openmp)

    monkeypatch.setattr(threads, "run_items", spy)
    return calls


@needs_kernel
@pytest.mark.parametrize(
    "batch,dim,length,n_state,groups,softplus,drop",
    [
        (2, 4, 64, 8, None, True, ()),  # 4 channels: one partial SIMD block; 2 chunks of 32 steps
        (1, 40, 150, 16, 2, True, ()),  # a full and a partial block per group; 150 = 9 chunks of 16 + 6
        (2, 64, 129, 8, 4, False, ("D", "z", "delta_bias")),  # no skip, no gate, no bias, no softplus
        (1, 160, 70, 64, 2, True, ()),  # N = 64: 80 channels = 5 blocks in 2 block groups of the backward; chunks of 4
    ],
)
def test_backward_matches_reference_float64(kernel_calls, batch, dim, length, n_state, groups, softplus, drop):
    inputs = leaves(make_inputs(batch, dim, length, n_state, groups))
    for name in drop:
        inputs[name] = None
    y_ref, h_ref, grads_ref = scan_with_grads(selective_scan_ref, inputs, softplus)
    y, h, grads = scan_with_grads(selective_scan_compiled, inputs, softplus)
    assert kernel_calls == ["scan_bwd_f64"]  # the compiled backward ran, not the fast one
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(h, h_ref) <= 1e-12
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        assert grads[name].shape == inputs[name].shape
        assert rel_err(grads[name], grads_ref[name]) <= 1e-10, name


@needs_kernel
def test_backward_float32_close_to_float64_reference(kernel_calls):
    inputs = make_inputs(2, 48, 300, 16, groups=4, delta_max=4.0, seed=2)
    _, _, grads_ref = scan_with_grads(selective_scan_ref, leaves(inputs), True)
    _, _, grads = scan_with_grads(selective_scan_compiled, leaves(inputs, torch.float32), True)
    _, _, grads_fast = scan_with_grads(selective_scan_fast, leaves(inputs, torch.float32), True)
    assert kernel_calls == ["scan_bwd_f32"]
    for name in grads_ref:
        assert grads[name].dtype == torch.float32
        err, err_fast = (
            rel_err(grads[name].double(), grads_ref[name]),
            rel_err(grads_fast[name].double(), grads_ref[name]),
        )
        assert err <= 1e-5, name
        assert err <= 2 * err_fast + 1e-6, name  # not less accurate than the fast backend in float32


@needs_kernel
@pytest.mark.parametrize(
    "dtype,every",
    [(torch.float64, 1), (torch.float64, 5), (torch.float64, 64), (torch.float32, 5), (torch.float32, 23)],
)
def test_checkpoint_interval_does_not_change_the_gradients(dtype, every):
    # float32 runs the vector kernel, which advances time in chunks: intervals that do not divide them
    inputs = make_inputs(1, 24, 64, 4, groups=2, seed=3)

    def run(every):
        args = leaves(inputs, dtype)
        tm = {k: v.permute(2, 0, 1).reshape(64, 1, 2, 12) for k, v in args.items() if k in ("u", "delta")}
        y, h = CompiledSelectiveScan.apply(
            kernel_library(), tm["delta"], tm["u"], args["A"].reshape(2, 12, 4), args["B"].permute(3, 0, 1, 2),
            args["C"].permute(3, 0, 1, 2), args["D"].reshape(2, 12), args["delta_bias"].reshape(2, 12), True, every,
        )  # fmt: skip
        return torch.autograd.grad(
            (y.square().sum() + h.sum()), list(args.values())[:6] + [args["delta_bias"]], allow_unused=True
        )

    reference = run(64)  # one chunk: no checkpoint but the initial state
    assert checkpoint_interval(kernel_library(), 64, 4) == 64
    for a, b in zip(run(every), reference):
        if b is not None:
            assert rel_err(a.double(), b.double()) <= (1e-12 if dtype == torch.float64 else 1e-6)


@needs_kernel
def test_time_major_entry_with_low_rank_delta_and_split_views(kernel_calls):
    # the mixers' call: B and C are column views of one projection, delta comes through the dt projection
    g = torch.Generator().manual_seed(4)
    length, batch, groups, per_group, n_state, rank = 50, 2, 3, 20, 8, 3
    params = dict(
        u=torch.randn(length, batch, groups, per_group, generator=g, dtype=torch.float64),
        x_dbl=torch.randn(length, batch, groups, rank + 2 * n_state, generator=g, dtype=torch.float64),
        A=-torch.rand(groups, per_group, n_state, generator=g, dtype=torch.float64) * 3,
        D=torch.randn(groups, per_group, generator=g, dtype=torch.float64),
        bias=torch.randn(groups, per_group, generator=g, dtype=torch.float64),
        w_dt=torch.randn(groups, per_group, rank, generator=g, dtype=torch.float64) / 2,
    )
    grad_y = torch.randn(length, batch, groups, per_group, generator=g, dtype=torch.float64)

    def run(backend):
        p = leaves(params)
        dt, b_sel, c_sel = p["x_dbl"].split([rank, n_state, n_state], dim=-1)
        y = selective_scan_time_major(
            p["u"], dt, p["A"], b_sel, c_sel, p["D"], p["bias"], True, backend=backend, delta_proj_weight=p["w_dt"]
        )
        return y, torch.autograd.grad(y, list(p.values()), grad_y)

    y_ref, grads_ref = run("reference")
    y, grads = run("compiled")
    assert kernel_calls == ["scan_bwd_f64"]
    assert rel_err(y, y_ref) <= 1e-12
    for name, a, b in zip(params, grads, grads_ref):
        assert rel_err(a, b) <= 1e-10, name


@needs_kernel
def test_threads_do_not_change_the_gradients():
    inputs = make_inputs(2, 96, 120, 8, groups=3, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, _, one = scan_with_grads(selective_scan_compiled, leaves(inputs), True)
        torch.set_num_threads(3)
        _, _, three = scan_with_grads(selective_scan_compiled, leaves(inputs), True)
    finally:
        torch.set_num_threads(threads)
    for name in one:
        assert torch.equal(one[name], three[name]), name  # each lane is summed by one thread in a fixed order


@needs_kernel
def test_mixer_training_gradients_match_fast_backend(kernel_calls):
    from scripts.networks.mamba import DirectionalMamba

    torch.manual_seed(0)
    mixer = DirectionalMamba(12, d_state=4, members=2, order_set="cross2d").double()
    x = torch.randn(2, 2, 30, 12, dtype=torch.float64)
    grads = {}
    try:
        for backend in ("fast", "compiled"):
            set_scan_backend(backend)
            mixer.zero_grad()
            mixer(x, (5, 6)).square().sum().backward()
            grads[backend] = {k: p.grad.clone() for k, p in mixer.named_parameters()}
    finally:
        set_scan_backend(None)
    assert kernel_calls == ["scan_bwd_f64"]
    for name, g in grads["fast"].items():
        assert rel_err(grads["compiled"][name], g) <= 1e-10, name


@needs_kernel
def test_double_backward_is_refused_clearly():
    inputs = leaves(make_inputs(1, 4, 16, 4))
    y = selective_scan_compiled(**inputs, delta_softplus=True)
    (gu,) = torch.autograd.grad(y.sum(), inputs["u"], create_graph=True)
    with pytest.raises(RuntimeError, match="twice|differentiable"):
        gu.sum().backward()


def test_without_the_kernel_training_uses_the_fast_backward(monkeypatch):
    monkeypatch.setattr(build, "compile_library", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no compiler")))
    inputs = leaves(make_inputs(1, 6, 40, 4, groups=2))
    _, _, grads_ref = scan_with_grads(selective_scan_ref, inputs, True)
    with loader.separate_build():
        _, _, grads = scan_with_grads(selective_scan_compiled, inputs, True)
        assert not compiled_scan_available()
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) <= 1e-10, name
