"""Convolutions with kept oneDNN weights (inference): equal to F.conv2d, follow parameter changes, fall back cleanly."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scripts.networks import ClinicalFMamba
from scripts.networks.optimize import optimize_for_inference
from scripts.networks.packed_conv import KeptConvWeights, packed_conv_available
from scripts.networks.rewrites import channels_last, is_channels_last


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_packed_path_is_available_on_this_build():
    # the CPU wheels of PyTorch ship oneDNN: the kept-weight path must not silently fall back here
    assert packed_conv_available()


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation,slope",
    [
        (3, 1, 1, 1, None),
        (3, 1, 1, 1, 0.2),
        (3, 1, 3, 3, 0.2),
        (2, 2, 0, 1, None),
        (3, 1, 1, 1, 0.0),
        (2, 1, 1, 1, None),
    ],
)
def test_kept_conv2d_equals_conv2d(kernel, stride, padding, dilation, slope):
    kept = KeptConvWeights()
    x = channels_last(randn(2, 6, 11, 9))
    weight, bias = randn(5, 6, kernel, kernel, seed=1), randn(5, seed=2)
    ref = F.conv2d(x, weight, bias, stride, padding, dilation)
    if slope is not None:
        ref = F.leaky_relu(ref, slope)
    with torch.inference_mode():
        out = kept.conv2d("c", x, lambda: (weight, bias), [weight, bias], stride, padding, dilation, slope)
    assert out.shape == ref.shape and is_channels_last(out)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert kept._entries["c"][3] is not None  # the kept oneDNN weight was used


def test_kept_weight_follows_in_place_updates_and_input_shapes():
    owner = KeptConvWeights()
    conv = nn.Conv2d(4, 3, 3, padding=1)
    x = channels_last(randn(1, 4, 8, 8))

    def run(inp):
        with torch.inference_mode():
            return owner.conv2d("c", inp, lambda: (conv.weight, conv.bias), [conv.weight, conv.bias], padding=1)

    first = run(x)
    kept = owner._entries["c"]
    assert torch.equal(run(x), first) and owner._entries["c"] is kept
    with torch.no_grad():
        conv.weight.mul_(2.0)  # an optimiser step or load_state_dict: in place
    with torch.no_grad():
        ref = conv(x)
    assert torch.allclose(run(x), ref, rtol=1e-5, atol=1e-5)
    bigger = channels_last(randn(1, 4, 12, 10, seed=3))
    with torch.no_grad():
        assert torch.allclose(run(bigger), conv(bigger), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [True, False])
def test_plain_path_for_float64_nchw_and_when_turned_off(packed):
    weight, bias = randn(5, 6, 3, 3, seed=1), randn(5, seed=2)
    inputs = [randn(2, 6, 7, 7).double(), randn(2, 6, 7, 7)] + ([] if packed else [channels_last(randn(2, 6, 7, 7))])
    for x in inputs:
        w, b = weight.to(x.dtype), bias.to(x.dtype)
        owner = KeptConvWeights(packed)
        with torch.inference_mode():
            out = owner.conv2d("c", x, lambda w=w, b=b: (w, b), [w, b], padding=1, negative_slope=0.1)
        assert owner._entries["c"][3] is None  # no oneDNN weight: F.conv2d
        assert torch.allclose(out, F.leaky_relu(F.conv2d(x, w, b, padding=1), 0.1), rtol=1e-6, atol=1e-6)


def test_float32_network_with_kept_weights_equals_plain_layers_and_unpacked_path():
    torch.manual_seed(0)
    net = ClinicalFMamba(
        2,
        features=(8, 16),
        dilations=(1, 3),
        depth=1,
        decoder_depth=1,
        d_state=4,
        swap_d_state=4,
        refine=True,
        source_selection=True,
    )
    for m in net.modules():  # running statistics and zero-initialised layers away from their defaults
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    nn.init.normal_(net.refine.out.weight, std=0.2)
    nn.init.normal_(net.selection.logits.weight, std=0.2)
    net.eval()
    fast = optimize_for_inference(copy.deepcopy(net))
    x = torch.rand(1, 2, 32, 24, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = net(x)
        packed = fast(x)
        assert fast.encoder_blocks[0].kept._entries["query"][3] is not None
        unpacked = optimize_for_inference(fast, packed_conv=False)(x)
        assert fast.encoder_blocks[0].kept._entries["query"][3] is None
    assert (packed - plain).abs().max() <= 1e-5
    assert (packed - unpacked).abs().max() <= 1e-6


def test_a_failing_onednn_call_falls_back_to_conv2d(monkeypatch, caplog):
    import scripts.networks.packed_conv as packed_conv

    owner = KeptConvWeights()
    x = channels_last(randn(1, 4, 6, 6))
    weight, bias = randn(3, 4, 3, 3, seed=1), randn(3, seed=2)

    def broken(*args):
        raise RuntimeError("unexpected arguments")

    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", broken)
    monkeypatch.setattr(packed_conv, "_available", [])  # checked afresh here, and the process's state kept
    with torch.inference_mode():
        out = owner.conv2d("c", x, lambda: (weight, bias), [weight, bias], padding=1)
    assert torch.allclose(out, F.conv2d(x, weight, bias, padding=1), rtol=1e-5, atol=1e-5)
    assert not packed_conv.packed_conv_available() and "using F.conv2d" in caplog.text
