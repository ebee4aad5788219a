"""The fusion loss against hand-computed values on tiny tensors, and its zero / invariance properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.transforms import SobelGradients

from scripts.losses import FusionLoss, sobel_kernels, sobel_magnitude

C1, C2 = 0.01**2, 0.03**2


def _const(value: float, size: int = 11, dims: int = 2) -> torch.Tensor:
    return torch.full((1, 1) + (size,) * dims, float(value))


def test_sobel_kernels_are_the_spec_kernels() -> None:
    k = sobel_kernels(2)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    ky = torch.tensor([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])
    assert torch.equal(k[1, 0], kx)  # derivative along W
    assert torch.equal(k[0, 0], -ky)  # derivative along H (sign irrelevant for |.|)
    assert sobel_kernels(3).shape == (3, 1, 3, 3, 3)


def test_sobel_magnitude_of_a_delta_by_hand() -> None:
    image = torch.zeros(1, 1, 3, 3)
    image[0, 0, 1, 1] = 1.0
    # cross-correlation with a delta gives the flipped kernels: |Kx| + |Ky|
    expected = torch.tensor([[2.0, 2, 2], [2, 0, 2], [2, 2, 2]])
    assert torch.equal(sobel_magnitude(image)[0, 0], expected)


def test_sobel_magnitude_of_a_constant_with_zero_padding_by_hand() -> None:
    s = sobel_magnitude(_const(1.0, 5))[0, 0]
    # interior 0; edges see the zero padding on one side: 1 + 2 + 1 = 4; corners 3 (x) + 3 (y) = 6
    expected = torch.tensor([[6.0, 4, 4, 4, 6], [4, 0, 0, 0, 4], [4, 0, 0, 0, 4], [4, 0, 0, 0, 4], [6, 4, 4, 4, 6]])
    assert torch.equal(s, expected)


def test_sobel_magnitude_matches_monai_sobel_gradients() -> None:
    image = torch.rand(1, 9, 12, generator=torch.Generator().manual_seed(0))
    grads = SobelGradients(kernel_size=3, padding_mode="zeros", normalize_kernels=False)(image)  # (2, H, W)
    expected = torch.as_tensor(grads).abs().sum(0)
    torch.testing.assert_close(sobel_magnitude(image[None])[0, 0], expected, rtol=1e-6, atol=1e-5)


def test_loss_on_constant_images_by_hand() -> None:
    """F = 0.5, A = 1, B = 0 on 11 x 11: every term in closed form."""
    fused, sources = _const(0.5), torch.cat([_const(1.0), _const(0.0)], dim=1)
    loss = FusionLoss()
    total = loss(fused, sources)
    terms = loss.last_terms
    intensity = 0.5  # |0.5 - max(1, 0)|
    # S(c) of an n x n constant: 4c on the 4(n - 2) edge pixels, 6c on the corners; S(F) = S(A) / 2
    gradient = 0.5 * (16 * 9 + 24) / 121
    # constant images: sigma = 0, so SSIM = (2 mu_f mu_s + C1) / (mu_f^2 + mu_s^2 + C1)
    ssim_fa = (2 * 0.5 * 1.0 + C1) / (0.25 + 1.0 + C1)
    ssim_fb = C1 / (0.25 + C1)
    ssim = 1 - (ssim_fa + ssim_fb) / 2
    assert terms["intensity"].item() == pytest.approx(intensity, rel=1e-6)
    assert terms["gradient"].item() == pytest.approx(gradient, rel=1e-6)
    assert terms["ssim"].item() == pytest.approx(ssim, rel=1e-5)
    assert total.item() == pytest.approx(2 * intensity + 10 * gradient + 5 * ssim, rel=1e-5)
    assert terms["total"].item() == pytest.approx(total.item())


def _ssim_one_window(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two 11 x 11 images with one Gaussian window (sigma 1.5), written out from the definition."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2
    cxy = (w * x * y).sum() - mx * my
    return ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx**2 + my**2 + C1) * (vx + vy + C2))


def test_ssim_term_matches_the_definition() -> None:
    rng = np.random.default_rng(1)
    f, a, b = (rng.random((11, 11)) for _ in range(3))
    t = lambda x: torch.tensor(x, dtype=torch.float32)[None, None]  # noqa: E731
    terms = FusionLoss().terms(t(f), torch.cat([t(a), t(b)], dim=1))
    expected = 1 - (_ssim_one_window(f, a) + _ssim_one_window(f, b)) / 2
    assert terms["ssim"].item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_intensity_and_gradient_terms_by_hand_on_a_tiny_image() -> None:
    a = torch.tensor([[[[0.0, 1.0], [0.5, 0.2]]]])
    b = torch.tensor([[[[0.3, 0.4], [0.9, 0.1]]]])
    f = torch.tensor([[[[0.1, 0.7], [0.9, 0.6]]]])
    # max(A, B) = [[0.3, 1.0], [0.9, 0.2]] -> |F - max| = [[0.2, 0.3], [0.0, 0.4]]
    loss = FusionLoss(w_ssim=0.0, win_size=1)  # SSIM needs no 11 x 11 window for this check
    terms = loss.terms(f, torch.cat([a, b], dim=1))
    assert terms["intensity"].item() == pytest.approx(0.9 / 4, rel=1e-6)

    # 2 x 2 with zero padding: every pixel is a corner; Sobel x at (0, 0) = 2 * I[0, 1] + 1 * I[1, 1], etc.
    def s(img: torch.Tensor) -> torch.Tensor:
        i = img[0, 0]
        gx = torch.tensor(
            [[2 * i[0, 1] + i[1, 1], -(2 * i[0, 0] + i[1, 0])], [2 * i[1, 1] + i[0, 1], -(2 * i[1, 0] + i[0, 0])]]
        )
        gy = torch.tensor(
            [[2 * i[1, 0] + i[1, 1], 2 * i[1, 1] + i[1, 0]], [2 * i[0, 0] + i[0, 1], 2 * i[0, 1] + i[0, 0]]]
        )
        return gx.abs() + gy.abs()

    for img in (a, b, f):
        torch.testing.assert_close(sobel_magnitude(img)[0, 0], s(img))
    expected = (s(f) - torch.maximum(s(a), s(b))).abs().mean()
    assert terms["gradient"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_terms_vanish_where_they_should() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, 16, 16, generator=g)
    loss = FusionLoss()
    # F = A = B: every term is 0
    terms = loss.terms(a, torch.cat([a, a], dim=1))
    assert terms["intensity"].item() == 0.0
    assert terms["gradient"].item() == 0.0
    assert terms["ssim"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["total"].item() == pytest.approx(0.0, abs=1e-5)
    # F = max(A, B) = A and S(F) = max(S(A), S(B)) = S(A) when B = A / 2: intensity and gradient terms 0, SSIM not
    terms = loss.terms(a, torch.cat([a, a / 2], dim=1))
    assert terms["intensity"].item() == 0.0
    assert terms["gradient"].item() == 0.0
    assert terms["ssim"].item() > 0.01
    # the source order does not matter
    b = torch.rand(2, 1, 16, 16, generator=g)
    f = torch.rand(2, 1, 16, 16, generator=g)
    t1, t2 = loss.terms(f, torch.cat([a, b], 1)), loss.terms(f, torch.cat([b, a], 1))
    for key in t1:
        torch.testing.assert_close(t1[key], t2[key])


def test_weights_are_applied_and_gradients_flow() -> None:
    g = torch.Generator().manual_seed(0)
    sources = torch.rand(2, 2, 16, 16, generator=g)
    fused = torch.rand(2, 1, 16, 16, generator=g, requires_grad=True)
    base = FusionLoss().terms(fused, sources)
    loss = FusionLoss(w_intensity=1.0, w_gradient=0.5, w_ssim=3.0)
    total = loss(fused, sources)
    expected = base["intensity"] + 0.5 * base["gradient"] + 3.0 * base["ssim"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(loss.last_terms) == {"intensity", "gradient", "ssim", "total"}
    assert all(not v.requires_grad for v in loss.last_terms.values())
    total.backward()
    assert fused.grad is not None and torch.isfinite(fused.grad).all() and fused.grad.abs().sum() > 0


def test_float32_under_autocast() -> None:
    sources = torch.rand(1, 2, 16, 16)
    fused = torch.rand(1, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = FusionLoss()(fused.bfloat16(), sources.bfloat16())
    assert total.dtype == torch.float32 and math.isfinite(total.item())


def test_3d() -> None:
    a = torch.rand(1, 1, 12, 12, 12)
    loss = FusionLoss(spatial_dims=3)
    assert loss(a, torch.cat([a, a], dim=1)).item() == pytest.approx(0.0, abs=1e-5)
    assert loss(torch.zeros_like(a), torch.cat([a, a], dim=1)).item() > 0


@pytest.mark.parametrize(
    "fused, sources",
    [
        (torch.rand(1, 2, 16, 16), torch.rand(1, 2, 16, 16)),  # fused must have 1 channel
        (torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)),  # sources must have 2
        (torch.rand(1, 1, 16, 16), torch.rand(1, 2, 16, 8)),  # same spatial size
        (torch.rand(1, 1, 16), torch.rand(1, 2, 16)),  # 2D
    ],
)
def test_shape_errors(fused: torch.Tensor, sources: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        FusionLoss()(fused, sources)


@pytest.mark.parametrize("shape", [(3, 1, 40, 37), (2, 2, 24, 30), (2, 1, 14, 20, 17)])
def test_separable_ssim_equals_monai_ssim_loss(shape) -> None:
    from monai.losses import SSIMLoss

    from scripts.losses import SeparableSSIM

    torch.manual_seed(0)
    x = torch.rand(shape, requires_grad=True)
    targets = [torch.rand(shape), (torch.rand(shape) + x.detach()) / 2]
    spatial_dims = len(shape) - 2
    monai_loss = SSIMLoss(
        spatial_dims=spatial_dims, data_range=1.0, kernel_type="gaussian", win_size=11, kernel_sigma=1.5
    )
    expected = torch.stack([1 - monai_loss(x, t) for t in targets])
    ours = SeparableSSIM(spatial_dims)(x, targets)
    assert torch.allclose(ours, expected, rtol=0, atol=2e-6)
    g_ours, g_ref = (torch.autograd.grad(v.sum(), x)[0] for v in (ours, expected))
    assert (g_ours - g_ref).abs().max() <= 1e-5 * g_ref.abs().max()


def test_separable_ssim_filter_matrix_is_the_valid_gaussian_correlation() -> None:
    from scripts.losses import gaussian_window, valid_filter_matrix

    window = gaussian_window(5, 1.0)
    signal = torch.randn(12, dtype=torch.float64)
    expected = torch.nn.functional.conv1d(signal.view(1, 1, -1), window.view(1, 1, -1)).view(-1)
    assert torch.allclose(valid_filter_matrix(12, window) @ signal, expected, atol=1e-14)
    assert window.sum().item() == pytest.approx(1.0) and window.argmax().item() == 2
    with pytest.raises(ValueError, match="window size 5"):
        valid_filter_matrix(4, window)
