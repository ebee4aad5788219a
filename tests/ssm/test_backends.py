"""Selective-scan backends against the float64 sequential reference."""

import pytest
import torch
from scan_testing import make_inputs, rel_err

from scripts.ssm import (
    ENV_VAR,
    compiled_scan_available,
    resolve_backend,
    selective_scan,
    selective_scan_fast,
    selective_scan_ref,
    set_scan_backend,
)


@pytest.mark.parametrize(
    "batch,dim,length,n_state,groups,softplus",
    [
        (2, 4, 64, 8, None, True),
        (1, 6, 1024, 16, 2, True),  # long sequence, grouped B/C (the mixers' direction groups)
        (1, 3, 2048, 8, None, False),  # raw delta up to 8: large steps
    ],
)
def test_fast_matches_reference_forward_and_gradients_float64(batch, dim, length, n_state, groups, softplus):
    inputs = make_inputs(batch, dim, length, n_state, groups)
    names = list(inputs)
    y_ref = selective_scan_ref(**inputs, delta_softplus=softplus)
    y_fast = selective_scan_fast(**inputs, delta_softplus=softplus)
    assert rel_err(y_fast, y_ref) <= 1e-10
    grad_out = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, list(inputs.values()), grad_out)
    g_fast = torch.autograd.grad(y_fast, list(inputs.values()), grad_out)
    for name, a, b in zip(names, g_fast, g_ref):
        assert rel_err(a, b) <= 1e-10, name


def test_last_state_matches_reference():
    inputs = make_inputs(2, 4, 50, 8)
    _, h_ref = selective_scan_ref(**inputs, return_last_state=True)
    _, h_fast = selective_scan_fast(**inputs, return_last_state=True)
    assert rel_err(h_fast, h_ref) <= 1e-12


def test_float32_stays_finite_where_reference_is_finite():
    # large steps and strongly negative A: exp(delta*A) underflows to 0, which must stay exact
    inputs = make_inputs(1, 8, 4096, 16, delta_max=30.0, dtype=torch.float32, seed=3)
    with torch.no_grad():
        inputs["A"].mul_(20)
    y_ref = selective_scan_ref(**inputs, delta_softplus=True)
    y_fast = selective_scan_fast(**inputs, delta_softplus=True)
    assert torch.isfinite(y_ref).all() and torch.isfinite(y_fast).all()
    assert rel_err(y_fast, y_ref) < 1e-4
    y_fast.sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in inputs.values())


def test_gradcheck_small():
    inputs = make_inputs(1, 3, 7, 2, groups=None, delta_max=2.0)
    names = list(inputs)

    def fn(*args):
        return selective_scan_fast(**dict(zip(names, args)), delta_softplus=True)

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()))


@pytest.mark.parametrize("chunk", [1, 5, 32, 4096])
def test_chunk_size_does_not_change_the_result(chunk):
    inputs = make_inputs(2, 4, 37, 4, groups=2)
    y_ref = selective_scan_ref(**inputs, delta_softplus=True)
    y = selective_scan_fast(**inputs, delta_softplus=True, chunk=chunk)
    assert rel_err(y, y_ref) <= 1e-12
    g = torch.randn_like(y)
    leaves = list(inputs.values())
    for a, b in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(y_ref, leaves, g)):
        assert rel_err(a, b) <= 1e-10


def test_last_state_gradient_matches_reference():
    inputs = make_inputs(1, 3, 40, 4)
    _, h_ref = selective_scan_ref(**inputs, return_last_state=True)
    _, h_fast = selective_scan_fast(**inputs, return_last_state=True, chunk=7)
    g = torch.randn_like(h_ref)
    leaves = list(inputs.values())
    grads_fast = torch.autograd.grad(h_fast, leaves, g, allow_unused=True)
    for a, b in zip(grads_fast, torch.autograd.grad(h_ref, leaves, g, allow_unused=True)):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            assert rel_err(a, b) <= 1e-10


def test_backend_selection_argument_env_and_default(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(None, "cpu") == ("compiled" if compiled_scan_available() else "fast")
    assert resolve_backend("reference", "cpu") == "reference"
    monkeypatch.setenv(ENV_VAR, "reference")
    assert resolve_backend(None, "cpu") == "reference"
    set_scan_backend("fast")
    try:
        assert resolve_backend(None, "cpu") == "fast"  # explicit setting beats the environment
    finally:
        set_scan_backend(None)
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="unknown scan backend 'nonsense'"):
        resolve_backend(None, "cpu")


def test_dispatch_runs_selected_backend_and_mamba_ssm_is_refused_on_cpu():
    inputs = {k: v.detach() for k, v in make_inputs(1, 4, 16, 4).items()}
    y_ref = selective_scan(**inputs, backend="reference")
    assert rel_err(selective_scan(**inputs, backend="fast"), y_ref) <= 1e-12
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        selective_scan(**inputs, backend="mamba_ssm")


def test_auto_backend_never_picks_mamba_ssm_for_cpu_tensors():
    # on CPU: the run-time compiled kernel when it builds (tests/ssm/test_native_kernels.py), else the fast scan
    assert resolve_backend("auto", "cpu") == ("compiled" if compiled_scan_available() else "fast")


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_time_major_entry_matches_channels_first_reference(backend):
    from scripts.ssm import selective_scan_time_major

    length, batch, groups, per_group, n_state = 33, 2, 3, 4, 5
    inputs = make_inputs(batch, groups * per_group, length, n_state, groups=groups)
    y_ref = selective_scan_ref(**{k: v for k, v in inputs.items() if k != "z"}, delta_softplus=True)

    def tm(x):  # (batch, G*P, L) -> (L, batch, G, P)
        return x.permute(2, 0, 1).reshape(length, batch, groups, per_group)

    y = selective_scan_time_major(
        tm(inputs["u"]),
        tm(inputs["delta"]),
        inputs["A"].reshape(groups, per_group, n_state),
        inputs["B"].permute(3, 0, 1, 2),
        inputs["C"].permute(3, 0, 1, 2),
        inputs["D"].reshape(groups, per_group),
        delta_bias=inputs["delta_bias"].reshape(groups, per_group),
        delta_softplus=True,
        backend=backend,
    )
    assert rel_err(y, tm(y_ref)) <= 1e-12
    g = torch.randn_like(y)
    names = [k for k in inputs if k != "z"]
    g_ref = torch.autograd.grad(tm(y_ref), [inputs[k] for k in names], g)
    g_tm = torch.autograd.grad(y, [inputs[k] for k in names], g)
    for name, a, b in zip(names, g_tm, g_ref):
        assert rel_err(a, b) <= 1e-10, name
