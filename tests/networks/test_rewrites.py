"""Inference rewrites: every one equals the plain layers it replaces, and the swapped-in modules of
``optimize_for_inference`` run them only in eval mode without autograd."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scripts.benchmark import network_flops
from scripts.networks import ClinicalFMamba, CrossModalChannelAttention, DilatedGatedConvBlock, UpStage
from scripts.networks.blocks import FullResolutionRefinement
from scripts.networks.optimize import optimize_for_inference, runs_fast
from scripts.networks.rewrites import (
    channels_last,
    conv3_by_matmul,
    conv3_then_down2,
    fold_batch_norm,
    fold_batch_norm_before,
    is_channels_last,
    upsample_conv,
)

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def randomise_batch_norms(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def plain_and_rewritten(module, *inputs):
    """The plain module's output, then that of an optimised copy (eval mode, no autograd)."""
    fast = optimize_for_inference(copy.deepcopy(module))
    assert type(fast) is not type(module)  # a fast module was swapped in
    with torch.no_grad():
        return module(*inputs), fast(*inputs)


@pytest.mark.parametrize("size", [(7,), (5, 8), (4, 3, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_upsample_conv_equals_nearest_upsampling_then_conv(size, bias):
    dims = len(size)
    x, w = randn(2, 3, *size), randn(4, 3, *([3] * dims), seed=1)
    b = randn(4, seed=2) if bias else None
    ref = CONV[dims](F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1)
    out = upsample_conv(x, w, b)
    assert out.shape == ref.shape and out.is_contiguous()
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size,out_channels", [((9, 6), 1), ((5, 7), 3), ((4, 5, 3), 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv3_by_matmul_equals_the_convolution(size, out_channels, bias):
    dims = len(size)
    x, w = randn(2, 6, *size), randn(out_channels, 6, *([3] * dims), seed=1)
    b = randn(out_channels, seed=2) if bias else None
    out = conv3_by_matmul(x, w, b)
    assert torch.allclose(out, CONV[dims](x, w, b, padding=1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(8,), (6, 10), (4, 6, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv3_then_down2_equals_the_two_convolutions(size, bias):
    dims = len(size)
    conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    conv, down = conv_cls(2, 5, 3, padding=1, bias=bias).double(), conv_cls(5, 4, 2, stride=2, bias=bias).double()
    x = randn(2, 2, *size)
    assert torch.allclose(conv3_then_down2(x, conv, down), down(conv(x)), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="stride 2"):
        conv3_then_down2(x, conv, conv_cls(5, 4, 2, stride=1).double())


@pytest.mark.parametrize("conv_bias", [True, False])
def test_fold_batch_norm_equals_conv_then_norm(conv_bias):
    conv, norm = nn.Conv2d(3, 5, 3, padding=1, bias=conv_bias).double(), nn.BatchNorm2d(5).double()
    randomise_batch_norms(norm)
    norm.eval()
    x = randn(2, 3, 6, 7)
    weight, bias = fold_batch_norm(conv.weight, conv.bias, norm)
    assert torch.allclose(F.conv2d(x, weight, bias, padding=1), norm(conv(x)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("conv_bias", [True, False])
def test_fold_batch_norm_before_a_pointwise_conv(conv_bias):
    conv, norm = nn.Conv3d(3, 5, 1, bias=conv_bias).double(), nn.BatchNorm3d(3).double()
    randomise_batch_norms(norm)
    norm.eval()
    x = randn(2, 3, 4, 5, 6)
    weight, bias = fold_batch_norm_before(conv.weight, conv.bias, norm)
    assert torch.allclose(F.conv3d(x, weight, bias), conv(norm(x)), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="kernel-size-1"):
        fold_batch_norm_before(torch.ones(5, 3, 3, 3, 3), None, norm)
    assert fold_batch_norm_before(conv.weight, None, nn.BatchNorm3d(3).train()) is None


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("pyramid", [True, False])
def test_dilated_gated_block_rewritten_equals_its_layers(spatial_dims, pyramid):
    block = DilatedGatedConvBlock(spatial_dims, 6, dilation=2, pyramid=pyramid).double()
    randomise_batch_norms(block)
    block.eval()
    x = randn(2, 6, *([7] * spatial_dims))
    kept = x.clone()
    ref, out = plain_and_rewritten(block, x)
    assert torch.equal(x, kept)  # the in-place steps only touch fresh tensors
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)


def test_fold_batch_norm_refuses_what_it_cannot_fold():
    weight = torch.ones(4, 2, 3, 3)
    assert fold_batch_norm(weight, None, nn.BatchNorm2d(4).train()) is None  # batch statistics
    assert fold_batch_norm(weight, None, nn.BatchNorm2d(4, track_running_stats=False).eval()) is None
    assert fold_batch_norm(weight, None, nn.InstanceNorm2d(4)) is None


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize(
    "layout", [("up", "conv", "norm", "act"), ("up", "conv", "act", "norm"), ("act", "up", "conv", "norm")]
)
def test_up_stage_rewritten_equals_its_layers(spatial_dims, layout):
    stage = UpStage(spatial_dims, 4, 3, nn.LeakyReLU(0.2), layout).double()
    randomise_batch_norms(stage)
    stage.eval()
    x = randn(2, 4, *([5] * spatial_dims))
    ref, out = plain_and_rewritten(stage, x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-11)


def test_attention_add_to_updates_in_place_only_at_inference():
    attention = CrossModalChannelAttention(2, 6).double().eval()
    fast = optimize_for_inference(copy.deepcopy(attention))
    q, r, h = randn(2, 6, 7, 5), randn(2, 6, 7, 5, seed=1), randn(2, 6, 7, 5, seed=2)
    ref = h + attention(q, r)
    with torch.no_grad():
        kept = h.clone()
        assert torch.allclose(attention.add_to(kept, q, r), ref, rtol=0, atol=1e-12)
        assert torch.equal(kept, h)  # the plain module leaves its input alone
        out = fast.add_to(kept, q, r)
    assert out is kept  # in place
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_attention_add_both_equals_the_two_attentions(layout):
    attention = CrossModalChannelAttention(2, 6).double().eval()
    nn.init.normal_(attention.query.weight)  # weights away from 0.5 so that max and mean both matter
    to = channels_last if layout == "channels_last" else (lambda t: t)
    pair, h = to(randn(4, 6, 7, 5)), to(randn(2, 6, 7, 5, seed=1))  # pair: (a, b) stacked, batch 2 each
    a, b = pair[:2], pair[2:]
    ref = h + attention(a, b) + attention(b, a)
    with torch.no_grad():
        kept = h.clone()
        assert torch.allclose(attention.add_both(kept, pair), ref, rtol=0, atol=1e-12)
        assert torch.equal(kept, h)
        out = optimize_for_inference(copy.deepcopy(attention)).add_both(h, pair)
    assert out is h and is_channels_last(out) == (layout == "channels_last")  # in place, layout kept
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)


def test_refinement_rewritten_equals_the_concatenated_convolution():
    block = FullResolutionRefinement(2, 5).double().eval()
    nn.init.normal_(block.out.weight)  # starts at zero otherwise
    h, image = randn(2, 5, 8, 6), randn(2, 2, 8, 6, seed=1).float()
    ref, out = plain_and_rewritten(block, h, image)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)


def tiny_network(spatial_dims: int) -> ClinicalFMamba:
    net = ClinicalFMamba(
        spatial_dims, features=(4, 8), dilations=(1, 2), depth=1, decoder_depth=1, d_state=4, swap_d_state=4,
        refine=True, source_selection=True,
    ).double()  # fmt: skip
    randomise_batch_norms(net)
    for block in (net.refine.out, net.selection.logits):  # zero-initialised: make them matter
        nn.init.normal_(block.weight, std=0.3)
    return net.eval()


@pytest.mark.parametrize("spatial_dims,size", [(2, (16, 24)), (3, (8, 8, 12))])
def test_network_with_rewrites_equals_plain_layers(spatial_dims, size):
    net = tiny_network(spatial_dims)
    x = torch.rand(2, 2, *size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref, out = plain_and_rewritten(net, x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)


def test_fast_modules_run_their_rewrites_only_in_eval_mode_without_autograd(monkeypatch):
    import scripts.networks.optimize as optimize

    net = optimize_for_inference(tiny_network(2))
    assert not runs_fast(net.train())
    net.eval()
    with torch.enable_grad():
        assert not runs_fast(net)
    with torch.no_grad():
        assert runs_fast(net)

    def refuse(*args):
        raise AssertionError("a rewrite ran with autograd on")

    monkeypatch.setattr(optimize, "upsample_conv", refuse)
    monkeypatch.setattr(optimize, "conv3_by_matmul", refuse)
    net(torch.rand(1, 2, 16, 16, dtype=torch.float64)).sum().backward()  # eval mode, autograd on: plain layers
    assert net.stem.weight.grad is not None


def test_flop_count_is_the_architectures_not_the_rewrites():
    net = tiny_network(2)
    x = torch.rand(1, 2, 16, 16, dtype=torch.float64)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        optimize_for_inference(copy.deepcopy(net))(x)  # with the rewrites: fewer multiply-adds in the up-sampling
    assert network_flops(net, x) > counter.get_total_flops()


def test_head_falls_back_to_the_convolutions_when_the_maps_would_be_too_large(monkeypatch):
    import scripts.networks.rewrites as rewrites

    net = tiny_network(2)
    fast = optimize_for_inference(copy.deepcopy(net))
    x = torch.rand(1, 2, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calls = []
    monkeypatch.setattr("scripts.networks.optimize.conv3_by_matmul", lambda *a: calls.append(1) or conv3_by_matmul(*a))
    with torch.no_grad():
        ref = net(x)
        assert torch.allclose(fast(x), ref, rtol=0, atol=1e-12) and calls
        calls.clear()
        monkeypatch.setattr(rewrites, "MATMUL_MAPS_LIMIT", 1024)
        assert torch.allclose(fast(x), ref, rtol=0, atol=1e-12) and not calls


@pytest.mark.parametrize("size", [(5, 8), (4, 3, 5)])
def test_rewrites_keep_channels_last_memory(size):
    dims = len(size)
    x, w, b = randn(2, 3, *size), randn(4, 3, *([3] * dims), seed=1), randn(4, seed=2)
    xc = channels_last(x)
    assert is_channels_last(xc) and torch.equal(xc, x)
    up = upsample_conv(xc, w, b)
    assert torch.allclose(
        up, CONV[dims](F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1), rtol=0, atol=1e-12
    )
    assert is_channels_last(upsample_conv(xc.float(), w.float(), b.float()))  # (oneDNN keeps the layout in float32)
    head = conv3_by_matmul(xc, w[:2], b[:2])
    assert torch.allclose(head, CONV[dims](x, w[:2], b[:2], padding=1), rtol=0, atol=1e-12)
    assert head.is_contiguous()  # planar maps and output: the shifted sums and the selection run along contiguous rows
    single = channels_last(x[:, :1])  # one channel: same memory, channel stride 1, so convolutions return channels-last
    assert single.stride(1) == 1 and torch.equal(single, x[:, :1])
    assert is_channels_last(CONV[dims](single.float(), w[:, :1].float(), padding=1))


def test_attention_add_to_in_channels_last_memory():
    attention = CrossModalChannelAttention(2, 6).double().eval()
    q, r, h = (channels_last(randn(2, 6, 7, 5, seed=s)) for s in range(3))
    ref = h + attention(q, r)
    fast = optimize_for_inference(copy.deepcopy(attention))
    with torch.no_grad():
        out = fast.add_to(h, q, r)
        assert out is h and is_channels_last(out)  # in place, layout kept
        assert torch.allclose(out, ref, rtol=0, atol=1e-12)
        mixed = randn(2, 6, 7, 5, seed=4)  # h in the other layout: the plain sum, correct all the same
        assert torch.allclose(fast.add_to(mixed.clone(), q, r), mixed + attention(q, r), rtol=0, atol=1e-12)
