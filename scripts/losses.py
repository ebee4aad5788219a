"""The ClinicalFMamba fusion loss (spec section 6): intensity-max L1, Sobel-gradient-max L1, two-source SSIM.

Fusion is unsupervised: the loss compares the fused image ``F`` with its two sources ``A`` (reference MRI) and
``B`` (CT / PET-Y / SPECT-Y)::

    L = w_intensity * mean|F - max(A, B)|
      + w_gradient  * mean|S(F) - max(S(A), S(B))|          S(I) = sum over axes of |Sobel_axis * I|
      + w_ssim      * (1 - (SSIM(F, A) + SSIM(F, B)) / 2)

with the reference code's 2D weights (2, 10, 5) by default. ``S`` is the L1 magnitude of the un-normalised
3x3 Sobel responses (``[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]`` and its transpose), cross-correlation with zero
padding 1, as in the reference ``fusion_loss_med``. In 3D the same separable Sobel (derivative ``[-1, 0, 1]``
along one axis, smoothing ``[1, 2, 1]`` along the others) is used for each of the three axes; this is the
natural extension of the 2D loss, not the reference's slice-wise 3D gradient loss.

SSIM is MONAI's definition (:class:`monai.losses.SSIMLoss`: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data
range 1), which averages the SSIM map over the *valid* windows; the reference code zero-pads the image by 5 pixels
instead, so its border windows compare against the padding (a quirk not reproduced here). :class:`SeparableSSIM`
computes it with the Gaussian window applied as one banded matrix product per axis (the window is an outer product
of 1D Gaussians) and the fused image's local statistics shared by both sources: the same values as MONAI's
``SSIMLoss`` (tested), about 9x faster with its backward on CPU, where the full 11x11 single-channel convolution's
backward is slow (docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FusionLoss", "SeparableSSIM", "gaussian_window", "sobel_kernels", "sobel_magnitude"]

_DERIVATIVE = (-1.0, 0.0, 1.0)
_SMOOTH = (1.0, 2.0, 1.0)


def sobel_kernels(spatial_dims: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Un-normalised Sobel kernels, one per spatial axis: ``(spatial_dims, 1, *[3] * spatial_dims)``.

    Kernel ``i`` differentiates along spatial axis ``i`` (``[-1, 0, 1]``) and smooths along the others
    (``[1, 2, 1]``). In 2D, kernel 1 (along W) is the spec's ``K_x = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]`` and
    kernel 0 (along H) is ``-K_y``; the sign does not matter for the magnitude.
    """
    derivative, smooth = torch.tensor(_DERIVATIVE, dtype=dtype), torch.tensor(_SMOOTH, dtype=dtype)
    kernels = []
    for axis in range(spatial_dims):
        kernel = torch.ones((1,) * spatial_dims, dtype=dtype)
        for d in range(spatial_dims):
            shape = [1] * spatial_dims
            shape[d] = 3
            kernel = kernel * (derivative if d == axis else smooth).reshape(shape)  # outer product
        kernels.append(kernel)
    return torch.stack(kernels).unsqueeze(1)


def sobel_magnitude(image: torch.Tensor, kernels: torch.Tensor | None = None) -> torch.Tensor:
    """``S(I) = sum_axis |Sobel_axis * I|`` per channel, zero padding 1: ``(B, C, *spatial)`` -> same shape."""
    spatial_dims = image.ndim - 2
    if spatial_dims not in (2, 3):
        raise ValueError(f"expected (B, C, H, W) or (B, C, D, H, W), got {tuple(image.shape)}")
    if kernels is None:
        kernels = sobel_kernels(spatial_dims)
    kernels = kernels.to(device=image.device, dtype=image.dtype)
    conv = F.conv2d if spatial_dims == 2 else F.conv3d
    batch, channels = image.shape[:2]
    responses = conv(image.reshape(batch * channels, 1, *image.shape[2:]), kernels, padding=1)
    return responses.abs().sum(1).reshape(image.shape)


def gaussian_window(size: int, sigma: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """MONAI's SSIM window: ``exp(-d^2 / (2 sigma^2))`` at ``d = -(size - 1) / 2 .. (size - 1) / 2``, sum 1: (size,)."""
    dist = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-((dist / sigma) ** 2) / 2)
    return (window / window.sum()).to(dtype)


def valid_filter_matrix(length: int, window: torch.Tensor) -> torch.Tensor:
    """(length - k + 1, length) banded matrix whose product with a signal is its valid cross-correlation with window."""
    k = window.numel()
    if length < k:
        raise ValueError(f"SSIM needs every spatial size >= the window size {k}, got {length}")
    rows = torch.arange(length - k + 1)
    matrix = window.new_zeros(length - k + 1, length)
    matrix[rows[:, None], rows[:, None] + torch.arange(k)] = window
    return matrix


class SeparableSSIM(nn.Module):
    """Mean SSIM of ``x`` against each of several targets, MONAI's definition, separable Gaussian filtering.

    Same quantity as ``1 - monai.losses.SSIMLoss(...)(x, y)`` with a Gaussian kernel (valid windows, mean over the
    map and the batch); the window is applied as a banded matrix product along each spatial axis, and the local
    mean and variance of ``x`` are computed once for all targets.

    x: (B, C, *spatial); targets: a list of tensors shaped like x -> (len(targets),) mean SSIM values.
    """

    def __init__(
        self,
        spatial_dims: int,
        win_size: int = 11,
        kernel_sigma: float = 1.5,
        data_range: float = 1.0,
        k1: float = 0.01,
        k2: float = 0.03,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.c1, self.c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
        self.register_buffer("window", gaussian_window(win_size, kernel_sigma, torch.float32), persistent=False)
        self._matrices: dict[tuple, torch.Tensor] = {}

    def _matrix(self, length: int, like: torch.Tensor) -> torch.Tensor:
        key = (length, like.device, like.dtype)
        if key not in self._matrices:
            self._matrices[key] = valid_filter_matrix(length, self.window.to(torch.float64)).to(like)
        return self._matrices[key]

    def filter(self, maps: torch.Tensor) -> torch.Tensor:
        """Gaussian-weighted local means over valid windows: (B, C, *spatial) -> (B, C, *(spatial - win + 1))."""
        out = maps
        for axis in range(self.spatial_dims):  # the last axis first: one matrix product along each axis
            dim = maps.ndim - 1 - axis
            out = torch.matmul(out.movedim(dim, -1), self._matrix(maps.shape[dim], maps).t()).movedim(-1, dim)
        return out

    def forward(self, x: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        n = len(targets)
        stats = self.filter(
            torch.cat([x, x * x, *targets, *(t * t for t in targets), *(x * t for t in targets)], dim=1)
        )
        c = x.shape[1]
        mu_x, mu_xx = stats[:, :c], stats[:, c : 2 * c]
        values = []
        for i in range(n):
            mu_y = stats[:, (2 + i) * c : (3 + i) * c]
            mu_yy = stats[:, (2 + n + i) * c : (3 + n + i) * c]
            mu_xy = stats[:, (2 + 2 * n + i) * c : (3 + 2 * n + i) * c]
            sigma_x, sigma_y, sigma_xy = mu_xx - mu_x * mu_x, mu_yy - mu_y * mu_y, mu_xy - mu_x * mu_y
            contrast = (2 * sigma_xy + self.c2) / (sigma_x + sigma_y + self.c2)
            values.append((((2 * mu_x * mu_y + self.c1) / (mu_x**2 + mu_y**2 + self.c1)) * contrast).mean())
        return torch.stack(values)


class FusionLoss(nn.Module):
    """Unsupervised fusion loss of a fused image against its two sources (see the module docstring).

    ``forward(fused, sources)``: ``fused`` ``(B, 1, *spatial)`` and ``sources`` ``(B, 2, *spatial)`` (channel 0 =
    ``A``, channel 1 = ``B``; the network's ``image`` input), both in [0, 1]. Returns the weighted total (a scalar)
    and keeps the detached terms of the last call in :attr:`last_terms` for logging: ``intensity``, ``gradient``,
    ``ssim`` (unweighted: the L1 terms and ``1 - mean SSIM``) and ``total``. :meth:`terms` returns them with
    gradients. Computed in float32 with autocast disabled (SSIM's variance terms are unstable in float16).

    Args:
        w_intensity: weight of ``mean|F - max(A, B)|``.
        w_gradient: weight of ``mean|S(F) - max(S(A), S(B))|``.
        w_ssim: weight of ``1 - (SSIM(F, A) + SSIM(F, B)) / 2``.
        spatial_dims: 2 or 3.
        win_size: SSIM Gaussian window size.
        kernel_sigma: SSIM Gaussian sigma.
        data_range: intensity range of the images (1 for [0, 1]).
        k1, k2: SSIM stability constants (``C1 = (k1 * data_range) ** 2``, ``C2 = (k2 * data_range) ** 2``).

    Example::

        loss = FusionLoss()
        value = loss(net(image), image)   # image (B, 2, H, W) is both the input and the "label"
        loss.last_terms                   # {"intensity": ..., "gradient": ..., "ssim": ..., "total": ...}
    """

    def __init__(
        self,
        w_intensity: float = 2.0,
        w_gradient: float = 10.0,
        w_ssim: float = 5.0,
        spatial_dims: int = 2,
        win_size: int = 11,
        kernel_sigma: float = 1.5,
        data_range: float = 1.0,
        k1: float = 0.01,
        k2: float = 0.03,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.w_intensity, self.w_gradient, self.w_ssim = float(w_intensity), float(w_gradient), float(w_ssim)
        self.spatial_dims = spatial_dims
        self.ssim = SeparableSSIM(spatial_dims, win_size, kernel_sigma, data_range, k1, k2)
        self.register_buffer("sobel", sobel_kernels(spatial_dims), persistent=False)
        self.last_terms: dict[str, torch.Tensor] = {}

    def _check(self, fused: torch.Tensor, sources: torch.Tensor) -> None:
        if fused.ndim != self.spatial_dims + 2 or sources.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"FusionLoss ({self.spatial_dims}D) expects fused (B, 1, *spatial) and sources (B, 2, *spatial), "
                f"got {tuple(fused.shape)} and {tuple(sources.shape)}"
            )
        if fused.shape[1] != 1 or sources.shape[1] != 2 or fused.shape[0] != sources.shape[0]:
            raise ValueError(
                f"expected fused (B, 1, ...) and sources (B, 2, ...), got {tuple(fused.shape)}, {tuple(sources.shape)}"
            )
        if fused.shape[2:] != sources.shape[2:]:
            raise ValueError(f"spatial shapes differ: fused {tuple(fused.shape)}, sources {tuple(sources.shape)}")

    def terms(self, fused: torch.Tensor, sources: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted terms and the weighted ``total``, each a scalar tensor with gradients."""
        self._check(fused, sources)
        device_type = fused.device.type if fused.device.type in ("cuda", "cpu", "mps", "xpu") else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            fused, sources = fused.float(), sources.float()
            if hasattr(fused, "as_tensor"):  # MetaTensor: plain tensors inside the loss
                fused = fused.as_tensor()
            if hasattr(sources, "as_tensor"):
                sources = sources.as_tensor()
            a, b = sources[:, 0:1], sources[:, 1:2]
            intensity = (fused - torch.maximum(a, b)).abs().mean()
            grad_f = sobel_magnitude(fused, self.sobel)
            grad_s = sobel_magnitude(sources, self.sobel)
            gradient = (grad_f - grad_s.amax(dim=1, keepdim=True)).abs().mean()
            ssim = 1 - self.ssim(fused, [a, b]).mean()  # 1 - (SSIM(F, A) + SSIM(F, B)) / 2
            total = self.w_intensity * intensity + self.w_gradient * gradient + self.w_ssim * ssim
        return {"intensity": intensity, "gradient": gradient, "ssim": ssim, "total": total}

    def forward(self, fused: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """Weighted total loss (scalar); the detached terms go to :attr:`last_terms`."""
        terms = self.terms(fused, sources)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return terms["total"]
