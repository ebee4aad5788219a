"""The benchmark's 3D probe and FLOP counting on tiny inputs (timings themselves are never asserted)."""

import torch

from scripts.benchmark import network_3d_from_config, network_flops, volume_probe


def test_3d_network_comes_from_the_inference_config():
    net = network_3d_from_config()
    assert net.spatial_dims == 3
    out = net.eval()(torch.rand(1, 2, 16, 16, 8))
    assert out.shape == (1, 1, 16, 16, 8)


def test_volume_probe_reports_time_flops_and_peak_memory():
    probe = volume_probe(size=16, repeats=1)
    assert probe["seconds"] > 0 and probe["peak_rss_gb"] > 0.05
    # FLOPs scale with the voxel count: 8x the volume, about 8x the FLOPs (conv + matmul dominate)
    net = network_3d_from_config().eval()
    small, large = (network_flops(net, torch.rand(1, 2, s, s, s)) for s in (16, 32))
    assert abs(probe["gflop"] * 1e9 - small) / small < 1e-6
    assert 6.0 < large / small < 9.0


def test_training_step_timing_runs_a_real_step():
    from scripts.benchmark import training_step_seconds

    assert training_step_seconds(batch=1, crop=32, repeats=1) > 0
