"""Classic fusion baselines: mean, max and the Laplacian-pyramid rule."""

import numpy as np
import pytest
import torch

from scripts.baselines import (
    LaplacianPyramidFusion,
    MaxFusion,
    MeanFusion,
    laplacian_pyramid,
    reconstruct_laplacian_pyramid,
)


def test_mean_and_max_rules():
    image = torch.tensor([[[[0.2, 0.9]], [[0.6, 0.1]]]])  # (1, 2, 1, 2)
    torch.testing.assert_close(MeanFusion()(image), torch.tensor([[[[0.4, 0.5]]]]))
    torch.testing.assert_close(MaxFusion()(image), torch.tensor([[[[0.6, 0.9]]]]))


@pytest.mark.parametrize("shape", [(2, 2, 37, 53), (1, 2, 64, 64), (1, 2, 9, 10, 11), (1, 2, 1, 5)])
def test_pyramid_reconstructs_exactly_any_size(shape):
    x = torch.rand(shape, dtype=torch.float64)
    bands = laplacian_pyramid(x, 4)
    assert bands[0].shape == x.shape
    torch.testing.assert_close(reconstruct_laplacian_pyramid(bands), x)


@pytest.mark.parametrize("shape", [(2, 2, 37, 53), (1, 2, 256, 256), (1, 2, 9, 10, 11)])
def test_laplacian_fusion_shape_range_dtype(shape):
    image = torch.rand(shape)
    out = LaplacianPyramidFusion(levels=4)(image)
    assert out.shape == (shape[0], 1) + shape[2:] and out.dtype == image.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_laplacian_fusion_of_identical_sources_is_the_source():
    a = torch.rand(1, 1, 40, 33, dtype=torch.float64)
    torch.testing.assert_close(LaplacianPyramidFusion()(torch.cat([a, a], dim=1)), a)


def test_laplacian_fusion_keeps_details_of_both_sources():
    # source 0: a vertical bar, source 1: a horizontal bar on the same grey level
    a = torch.full((1, 1, 32, 32), 0.3, dtype=torch.float64)
    b = a.clone()
    a[..., :, 10:12] = 0.9
    b[..., 20:22, :] = 0.9
    fused = LaplacianPyramidFusion()(torch.cat([a, b], dim=1))
    mean = MeanFusion()(torch.cat([a, b], dim=1))
    # both bars keep (nearly) full contrast against the background, unlike the mean rule
    assert fused[0, 0, 5, 10:12].mean() - fused[0, 0, 5, 25] > 0.45
    assert fused[0, 0, 20:22, 5].mean() - fused[0, 0, 25, 5] > 0.45
    assert mean[0, 0, 5, 10:12].mean() - mean[0, 0, 5, 25] == pytest.approx(0.3)


def test_laplacian_fusion_symmetric_without_ties():
    image = torch.rand(1, 2, 24, 24, dtype=torch.float64)
    swapped = image.flip(1)
    torch.testing.assert_close(LaplacianPyramidFusion()(image), LaplacianPyramidFusion()(swapped))


def test_laplacian_fusion_rejects_bad_input():
    with pytest.raises(ValueError):
        LaplacianPyramidFusion(levels=0)
    with pytest.raises(ValueError):
        LaplacianPyramidFusion()(torch.rand(1, 1, 8, 8))


def test_laplacian_fusion_on_real_pair(shared_data):
    from PIL import Image

    from scripts.metrics import compute_metrics

    mri = np.asarray(Image.open(shared_data / "harvard/CT-MRI/MRI/34002.png").convert("L"), dtype=np.float32) / 255
    ct = np.asarray(Image.open(shared_data / "harvard/CT-MRI/CT/34002.png").convert("L"), dtype=np.float32) / 255
    image = torch.from_numpy(np.stack([mri, ct]))[None]
    lp = compute_metrics(LaplacianPyramidFusion()(image), mri, ct, metrics=["SD", "SF", "Qabf"])
    mean = compute_metrics(MeanFusion()(image), mri, ct, metrics=["SD", "SF", "Qabf"])
    # the multi-scale rule keeps more contrast and more edges than averaging
    assert lp["SD"] > mean["SD"] and lp["SF"] > mean["SF"] and lp["Qabf"] > mean["Qabf"]
