import pytest
import torch

from scripts.networks import ClinicalFMamba

TINY = dict(features=(8, 8, 16), depth=1, decoder_depth=1, d_state=4, swap_d_state=4)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("size", [(64, 64), (96, 128), (256, 256)])
def test_output_shape_and_range_for_several_sizes(size):
    net = ClinicalFMamba(**TINY).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 2, *size))
    assert out.shape == (2, 1, *size)
    assert torch.isfinite(out).all() and out.min() > 0 and out.max() < 1


def test_full_width_network_runs_on_a_non_square_input():
    net = ClinicalFMamba().eval()
    with torch.no_grad():
        out = net(torch.rand(1, 2, 64, 96))
    assert out.shape == (1, 1, 64, 96) and 0 < out.min() and out.max() < 1


@pytest.mark.parametrize("size", [(16, 8, 24), (8, 32, 16), (24, 24, 24)])
def test_3d_tiny_network_shape_for_non_cubic_sizes(size):
    net = ClinicalFMamba(spatial_dims=3, channel_exchange=False, pyramid=False, **TINY).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 2, *size))
    assert out.shape == (1, 1, *size) and 0 < out.min() and out.max() < 1


RELEASED_3D = dict(
    spatial_dims=3,
    reference_compat=True,
    channel_exchange=False,
    pyramid=False,
    decoder_depth=0,
    scan_order="released3d_single",
    cross_scan_order="released3d_cross",
)


def test_3d_compatibility_configuration_count_documented():
    # released 6,002,209 minus its unused members (shallow_fusion1/2 2 x 884,864, Recon3D.conv_in 221,248,
    # 5 unused direction sets x 10 single-modality mixers x 12,032) = 3,409,633; ours is 1,088 below
    # (the released CMCA3D's dead block, whose size is not recorded) -- see docs/architecture.md
    net = ClinicalFMamba(**RELEASED_3D)
    assert n_params(net) == 3_408_545
    assert 6_002_209 - 2 * 884_864 - 221_248 - 10 * 5 * 12_032 - n_params(net) == 1_088


def test_compatibility_configuration_matches_the_released_component_counts():
    net = ClinicalFMamba(reference_compat=True)
    assert [n_params(b) for b in net.encoder_blocks] == [29_056, 115_456, 460_288]
    assert n_params(net.stem) == 320
    assert [n_params(d) for d in net.downsamples] == [4_128, 8_256, 32_896]
    assert n_params(net.single_blocks) == 10 * 153_344  # 5 blocks x 2 modalities
    assert n_params(net.token_swap) == 233_472
    assert n_params(net.cross_blocks) == 2 * 186_368
    assert n_params(net.merge) == 16_512
    assert n_params(net.decoder_blocks) == 333_312
    assert n_params(net.attention) == 2_048 and n_params(net.head) == 289
    # decoder convs 92,448 as released, plus the third (256-px) up stage 32->32 conv + BN = 9,312
    assert n_params(net.up_stages) == 92_448 + 9_312
    assert n_params(net) == 3_244_225  # documented in docs/architecture.md


def test_default_configuration_has_only_used_parameters():
    net = ClinicalFMamba()
    # released used-only count 3,155,521 + first down-sampling (4,128) + third up stage (9,312)
    assert n_params(net) == 3_155_521 + 4_128 + 9_312
    x = torch.rand(1, 2, 32, 32)
    net(x).mean().backward()
    unused = [name for name, p in net.named_parameters() if p.grad is None]
    assert unused == []


def test_every_parameter_of_the_compat_model_except_the_dead_ones_gets_a_gradient():
    net = ClinicalFMamba(reference_compat=True, **TINY)
    net(torch.rand(1, 2, 32, 32)).mean().backward()
    unused = {name for name, p in net.named_parameters() if p.grad is None}
    assert unused and all("unused_" in name for name in unused)


def test_input_checks_give_clear_errors():
    net = ClinicalFMamba(**TINY)
    with pytest.raises(ValueError, match="not divisible by 8"):
        net(torch.rand(1, 2, 60, 64))
    with pytest.raises(ValueError, match=r"expects \(B, 2, H, W\)"):
        net(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="in_channels must be 2"):
        ClinicalFMamba(in_channels=3)


def test_modalities_are_not_interchangeable_but_both_matter():
    net = ClinicalFMamba(**TINY).eval()
    x = torch.rand(1, 2, 32, 32)
    with torch.no_grad():
        base = net(x)
        for c in (0, 1):
            x2 = x.clone()
            x2[:, c] = torch.rand(32, 32)
            assert (net(x2) - base).abs().max() > 1e-4


def test_tiny_network_trains_with_decreasing_loss():
    torch.manual_seed(0)
    net = ClinicalFMamba(**TINY)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x = torch.rand(4, 2, 32, 32)
    target = x.amax(dim=1, keepdim=True)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = (net(x) - target).abs().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_training_after_inference_mode_forward():
    """Index caches filled under torch.inference_mode() must not break a later training step."""
    net = ClinicalFMamba(spatial_dims=2, features=(4, 8, 8), depth=1, decoder_depth=1, d_state=4)
    x = torch.rand(1, 2, 32, 32)
    with torch.inference_mode():
        net(x)
    net(x).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def _base_and_extended(spatial_dims: int, **option):
    """A tiny network and the same network with an optional addition, sharing every weight the base has.

    Returns (base, extended, missing, unexpected) with the keys ``load_state_dict`` reported."""
    torch.manual_seed(0)
    tiny = {**TINY, "features": (8, 16), "dilations": (1, 3)} if spatial_dims == 3 else TINY
    base = ClinicalFMamba(spatial_dims=spatial_dims, **tiny).eval()
    extended = ClinicalFMamba(spatial_dims=spatial_dims, **option, **tiny).eval()
    missing, unexpected = extended.load_state_dict(base.state_dict(), strict=False)
    return base, extended, missing, unexpected


@pytest.mark.parametrize("spatial_dims,size", [(2, (32, 48)), (3, (16, 16, 32))])
def test_refinement_starts_as_identity_and_learns(spatial_dims, size):
    # the optional full-resolution refinement (not in the paper) adds nothing until trained
    base, refined, missing, unexpected = _base_and_extended(spatial_dims, refine=True)
    assert unexpected == [] and missing and all(k.startswith("refine.") for k in missing)
    x = torch.rand(2, 2, *size)
    with torch.no_grad():
        assert torch.equal(base(x), refined(x))
    refined.train()
    refined(x).mean().backward()
    assert refined.refine.out.weight.grad.abs().max() > 0  # the zero-initialised output conv learns first
    assert base.refine is None and n_params(refined) - n_params(base) == n_params(refined.refine)


@pytest.mark.parametrize("spatial_dims,size", [(2, (32, 48)), (3, (16, 16, 32))])
def test_source_selection_mixes_decoded_image_and_sources(spatial_dims, size):
    # the optional source-selection output (not in the paper): F = g (w A + (1 - w) B) + (1 - g) D
    base, mixed, missing, unexpected = _base_and_extended(spatial_dims, source_selection=True)
    assert unexpected == [] and sorted(missing) == ["selection.logits.bias", "selection.logits.weight"]
    x = torch.rand(2, 2, *size)
    with torch.no_grad():
        direct = base(x)
        # at initialisation w = 1/2 everywhere and g = sigmoid(-2)
        g = torch.sigmoid(torch.tensor(-2.0))
        expected = g * x.mean(1, keepdim=True) + (1 - g) * direct
        torch.testing.assert_close(mixed(x), expected, rtol=1e-5, atol=1e-6)
        # saturated logits copy a source's pixels exactly: w -> 1 selects A, w -> 0 selects B
        mixed.selection.logits.bias.copy_(torch.tensor([60.0, 60.0]))
        torch.testing.assert_close(mixed(x), x[:, :1], rtol=0, atol=1e-6)
        mixed.selection.logits.bias.copy_(torch.tensor([-60.0, 60.0]))
        torch.testing.assert_close(mixed(x), x[:, 1:], rtol=0, atol=1e-6)
        out = mixed(torch.rand(2, 2, *size))
        assert out.min() >= 0 and out.max() <= 1  # a convex mix of [0, 1] images
    mixed.selection.logits.bias.data.copy_(torch.tensor([0.0, -2.0]))
    mixed.train()
    mixed(x).mean().backward()
    assert mixed.selection.logits.weight.grad.abs().max() > 0


def test_source_selection_needs_one_output_channel():
    with pytest.raises(ValueError, match="out_channels must be 1"):
        ClinicalFMamba(source_selection=True, out_channels=2, **TINY)
