import math

import pytest
import torch
import torch.nn.functional as F

import scripts.networks.mamba as mamba_module
from scripts.networks.mamba import CrossMambaBlock, DirectionalMamba, MemberLayerNorm, ResidualMambaBlock
from scripts.networks.scan_orders import inverse_orders, scan_orders
from scripts.ssm import selective_scan_ref

torch.manual_seed(0)


def naive_mixer(mixer: DirectionalMamba, x, grid, extra=None):
    """One member, one direction at a time, with the sequential reference scan."""
    m_count, b, length, _ = x.shape
    k, di, n, r = mixer.num_directions, mixer.d_inner, mixer.d_state, mixer.dt_rank
    orders = scan_orders(mixer.order_set, grid)
    outs = []
    for m in range(m_count):
        xz = x[m] @ mixer.in_proj_weight[m].T
        xs, z = xz[..., :di], xz[..., di:]
        acc = 0
        for d in range(k):
            g = m * k + d
            seq = xs[:, orders[d]].transpose(1, 2)  # (B, di, L)
            w = mixer.conv_weight[g * di : (g + 1) * di]
            bias = mixer.conv_bias[g * di : (g + 1) * di]
            xc = F.silu(F.conv1d(seq, w, bias, padding=mixer.d_conv - 1, groups=di)[..., :length])
            src = xc if extra is None else (extra[m] @ mixer.in_proj_b_weight[m].T)[:, orders[d]].transpose(1, 2)
            x_dbl = torch.einsum("bdl,cd->bcl", src, mixer.x_proj_weight[g])
            dt, bs, cs = x_dbl.split([r, n, n], dim=1)
            delta = torch.einsum("brl,dr->bdl", dt, mixer.dt_proj_weight[g])
            y = selective_scan_ref(
                xc,
                delta,
                -torch.exp(mixer.A_log[g]),
                bs,
                cs,
                mixer.D[g],
                z=z[:, orders[d]].transpose(1, 2),
                delta_bias=mixer.dt_proj_bias[g],
                delta_softplus=True,
            )
            acc = acc + y[..., inverse_orders(orders)[d]]
        y = (acc / k).transpose(1, 2)
        if mixer.norm is not None:
            y = F.layer_norm(y, (di,), mixer.norm.weight[m], mixer.norm.bias[m])
        outs.append(y @ mixer.out_proj_weight[m].T)
    return torch.stack(outs)


@pytest.mark.parametrize(
    "order_set,grid,cross",
    [("cross2d", (3, 5), False), ("cross2d", (4, 4), True), ("identity", (7,), False), ("triplane", (2, 3, 2), True)],
)
def test_batched_mixer_matches_naive_per_direction_reference(order_set, grid, cross):
    mixer = DirectionalMamba(8, d_state=4, order_set=order_set, cross_modal=cross, members=2).double()
    length = math.prod(grid)
    x = torch.randn(2, 2, length, 8, dtype=torch.float64)
    extra = torch.randn_like(x) if cross else None
    out = mixer(x, grid, extra=extra)
    ref = naive_mixer(mixer, x, grid, extra=extra)
    assert torch.allclose(out, ref, rtol=1e-9, atol=1e-11)


def tie_directions(mixer: DirectionalMamba):
    """Give every direction the parameters of direction 0."""
    di, k = mixer.d_inner, mixer.num_directions
    with torch.no_grad():
        for name in ("x_proj_weight", "dt_proj_weight", "dt_proj_bias", "A_log", "D"):
            p = getattr(mixer, name)
            p.copy_(p[:1].expand_as(p))
        mixer.conv_weight.copy_(mixer.conv_weight[:di].repeat(k, 1, 1))
        mixer.conv_bias.copy_(mixer.conv_bias[:di].repeat(k))


@pytest.mark.parametrize("cross", [False, True])
def test_tied_directions_transposing_the_grid_transposes_the_output(cross):
    h, w, c = 3, 5, 8
    mixer = DirectionalMamba(c, d_state=4, order_set="cross2d", cross_modal=cross).double()
    tie_directions(mixer)
    x = torch.randn(1, 2, h, w, c, dtype=torch.float64)
    extra = torch.randn_like(x) if cross else None

    def run(t, e, grid):
        return mixer(t.reshape(1, 2, -1, c), grid, None if e is None else e.reshape(1, 2, -1, c)).reshape(
            1, 2, *grid, c
        )

    out = run(x, extra, (h, w))
    out_t = run(x.transpose(2, 3), None if extra is None else extra.transpose(2, 3), (w, h))
    assert torch.allclose(out_t, out.transpose(2, 3), atol=1e-12)
    # and untied directions are not transpose-equivariant (the check can fail)
    untied = DirectionalMamba(c, d_state=4, order_set="cross2d", cross_modal=cross).double()
    mixer.load_state_dict(untied.state_dict())
    assert not torch.allclose(
        run(x.transpose(2, 3), None if extra is None else extra.transpose(2, 3), (w, h)),
        run(x, extra, (h, w)).transpose(2, 3),
        atol=1e-6,
    )


@pytest.mark.parametrize("cross", [False, True])
def test_tied_plane_scans_permuting_the_volume_between_planes_permutes_the_output(cross):
    # the coronal scan of a volume is the axial scan of the volume with its D and W axes swapped
    d, h, w, c = 3, 2, 4, 6
    coronal = DirectionalMamba(c, d_state=4, order_set="coronal", cross_modal=cross).double()
    axial = DirectionalMamba(c, d_state=4, order_set="axial", cross_modal=cross).double()
    tie_directions(coronal)
    axial.load_state_dict(coronal.state_dict())
    x = torch.randn(1, 1, d, h, w, c, dtype=torch.float64)
    extra = torch.randn_like(x) if cross else None
    swap = (0, 1, 4, 3, 2, 5)

    def flat(t):
        return None if t is None else t.reshape(1, 1, -1, c)

    out = coronal(flat(x), (d, h, w), flat(extra)).reshape(1, 1, d, h, w, c)
    xp = x.permute(*swap)
    out_p = axial(flat(xp), (w, h, d), flat(None if extra is None else extra.permute(*swap))).reshape(1, 1, w, h, d, c)
    assert torch.allclose(out_p, out.permute(*swap), atol=1e-12)


def test_cross_modal_selection_depends_only_on_the_second_input(monkeypatch):
    captured = {}

    original = mamba_module.selective_scan_time_major

    def spy(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, backend=None, delta_proj_weight=None):
        captured.update(delta=delta, B=B, C=C)  # delta: the low-rank dt input, before the dt projection
        return original(u, delta, A, B, C, D, delta_bias, delta_softplus, backend, delta_proj_weight)

    monkeypatch.setattr(mamba_module, "selective_scan_time_major", spy)
    mixer = DirectionalMamba(8, d_state=4, order_set="cross2d", cross_modal=True).double()
    x = torch.randn(1, 2, 12, 8, dtype=torch.float64, requires_grad=True)
    extra = torch.randn(1, 2, 12, 8, dtype=torch.float64, requires_grad=True)
    mixer(x, (3, 4), extra=extra)
    selection = sum(captured[k].sum() for k in ("delta", "B", "C"))
    g_x, g_extra = torch.autograd.grad(selection, [x, extra], allow_unused=True)
    assert g_x is None or g_x.abs().max() == 0  # no path at all from x to the selection parameters
    assert g_extra.abs().max() > 0
    # in the single-modality mixer the same quantities do depend on x
    plain = DirectionalMamba(8, d_state=4, order_set="cross2d").double()
    plain(x, (3, 4))
    (g_x,) = torch.autograd.grad(sum(captured[k].sum() for k in ("delta", "B", "C")), [x])
    assert g_x.abs().max() > 0


def test_members_are_independent_parameter_sets():
    block = ResidualMambaBlock(8, members=2, d_state=4, order_set="cross2d").double()
    x = torch.randn(2, 1, 6, 8, dtype=torch.float64)
    out = block(x, (2, 3))
    x2 = x.clone()
    x2[1] += 1.0
    out2 = block(x2, (2, 3))
    assert torch.allclose(out[0], out2[0]) and not torch.allclose(out[1], out2[1])


def test_mixer_rejects_wrong_token_count_and_missing_extra():
    mixer = DirectionalMamba(8, d_state=4, order_set="cross2d", cross_modal=True)
    with pytest.raises(ValueError, match="grid"):
        mixer(torch.randn(1, 1, 10, 8), (3, 4), extra=torch.randn(1, 1, 10, 8))
    with pytest.raises(ValueError, match="extra"):
        mixer(torch.randn(1, 1, 12, 8), (3, 4))


@pytest.mark.parametrize(
    "module,expected",
    [
        (lambda: ResidualMambaBlock(128, d_state=8, order_set="cross2d", dead_a_matrices=3), 153_344),
        (lambda: CrossMambaBlock(128, d_state=8, order_set="cross2d", dead_a_matrices=3), 186_368),
        (lambda: ResidualMambaBlock(128, d_state=8, order_set="identity", use_norm=False, dead_norm=True), 111_104),
        (lambda: DirectionalMamba(128, d_state=16, order_set="identity", use_norm=False), 116_480),
    ],
)
def test_parameter_counts_match_the_released_code(module, expected):
    assert sum(p.numel() for p in module().parameters()) == expected


def test_dt_bias_init_all_directions_versus_released_quirk():
    fixed = DirectionalMamba(128, order_set="cross2d")
    quirk = DirectionalMamba(128, order_set="cross2d", dt_init_all_directions=False)
    softplus = lambda p: F.softplus(p.detach())  # noqa: E731
    assert softplus(fixed.dt_proj_bias).max() <= 0.1 + 1e-6
    assert softplus(quirk.dt_proj_bias[0]).max() <= 0.1 + 1e-6
    assert softplus(quirk.dt_proj_bias[1:]).min() > 0.5  # default Linear bias: delta0 about 0.5-0.9


def test_member_layer_norm_matches_one_layer_norm_per_member():
    torch.manual_seed(0)
    norm = MemberLayerNorm(3, 16).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 2, 5, 16, dtype=torch.float64, requires_grad=True)
    y = norm(x)
    for m in range(3):
        ref = F.layer_norm(x[m], (16,), norm.weight[m], norm.bias[m], norm.eps)
        assert torch.allclose(y[m], ref, atol=1e-12)
    y.square().sum().backward()  # differentiable in both the input and the per-member affine parameters
    assert x.grad is not None and norm.weight.grad.abs().sum() > 0 and norm.bias.grad.abs().sum() > 0
    single = MemberLayerNorm(1, 16).double()  # one member: the plain fused layer_norm path
    assert torch.allclose(single(x[:1]), F.layer_norm(x[:1], (16,), eps=single.eps), atol=1e-12)
