"""Inputs and the error measure shared by the scan tests (tests/ssm/)."""

import torch


def make_inputs(batch, dim, length, n_state, groups=None, delta_max=8.0, dtype=torch.float64, seed=0):
    """Scan inputs (u, delta, A, B, C, D, z, delta_bias) on the (batch, dim, L) layout, leaves requiring grad;
    B and C (batch, N, L), or (batch, groups, N, L) with ``groups``."""
    g = torch.Generator().manual_seed(seed)
    shape_bc = (batch, n_state, length) if groups is None else (batch, groups, n_state, length)
    inputs = dict(
        u=torch.randn(batch, dim, length, generator=g, dtype=dtype),
        delta=torch.rand(batch, dim, length, generator=g, dtype=dtype) * delta_max,
        A=-torch.rand(dim, n_state, generator=g, dtype=dtype) * 4 - 0.05,
        B=torch.randn(*shape_bc, generator=g, dtype=dtype),
        C=torch.randn(*shape_bc, generator=g, dtype=dtype),
        D=torch.randn(dim, generator=g, dtype=dtype),
        z=torch.randn(batch, dim, length, generator=g, dtype=dtype),
        delta_bias=torch.randn(dim, generator=g, dtype=dtype) * 0.5,
    )
    return {k: v.requires_grad_() for k, v in inputs.items()}


def rel_err(a, b):
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
