"""Convolutional blocks: the kernel-size-1 convolutions run as matrix products, with the modules' own parameters."""

import pytest
import torch
from torch import nn

from scripts.networks.blocks import CrossModalChannelAttention, DilatedGatedConvBlock, pointwise_conv


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_equals_the_module(spatial_dims, bias):
    torch.manual_seed(0)
    conv = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(6, 5, 1, bias=bias).double()
    x = torch.randn(3, 6, *range(4, 4 + spatial_dims), dtype=torch.float64, requires_grad=True)
    y, y_ref = pointwise_conv(conv, x), conv(x)
    assert y.shape == y_ref.shape
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(y.square().sum(), [x, *conv.parameters()])
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, *conv.parameters()])
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


def test_pointwise_conv_takes_non_contiguous_input():
    conv = nn.Conv2d(4, 3, 1)
    x = torch.randn(2, 9, 9, 4).permute(0, 3, 1, 2)  # channels-last memory
    assert torch.allclose(pointwise_conv(conv, x), conv(x), atol=1e-6)


def test_blocks_with_pointwise_convs_match_plain_module_calls():
    # the blocks' forward equals the same maths written with the modules' own forward
    torch.manual_seed(1)
    block = DilatedGatedConvBlock(2, 8, dilation=3).double().eval()
    attention = CrossModalChannelAttention(2, 8).double()
    x, q = torch.randn(2, 8, 12, 10, dtype=torch.float64), torch.randn(2, 8, 12, 10, dtype=torch.float64)
    u = block.act(block.query(block.norm_query(x))) * block.act(block.gate(block.norm_gate(x)))
    v = block.act(block.dilated(block.norm_mid(u)))
    p1 = block.pyramid_conv(block.act(block.norm_out(v)))
    p2 = block.pyramid_conv(p1)
    assert torch.allclose(block(x), x + p1 + p2 + block.pyramid_conv(p2), atol=1e-12)
    a = attention.query(q).flatten(2)
    weights = torch.sigmoid(a.amax(2) + a.mean(2))[..., None, None]
    assert torch.allclose(attention(q, x), attention.value(x) * weights, atol=1e-12)
