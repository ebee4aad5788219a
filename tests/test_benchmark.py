"""The benchmark's 3D probe and FLOP counting on tiny inputs (timings themselves are never asserted)."""

import json
from pathlib import Path

import pytest
import torch

from scripts.benchmark import network_3d_from_config, network_flops, volume_probe


def test_3d_network_comes_from_the_inference_config():
    net = network_3d_from_config()
    assert net.spatial_dims == 3
    out = net.eval()(torch.rand(1, 2, 16, 16, 8))
    assert out.shape == (1, 1, 16, 16, 8)


def _peak_rss_gb() -> float:
    """This process's high-water resident memory from /proc (VmHWM), the figure ``ru_maxrss`` reports."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024**2


def test_volume_probe_reports_time_flops_and_peak_memory(monkeypatch):
    import scripts.benchmark as benchmark

    timed = {"seconds": 1.25, "ratio": 3.5, "low": 3.0, "high": 4.0, "rate": 1e9}
    calls = []
    monkeypatch.setattr(
        benchmark, "paired_floor_ratio", lambda fn, flops, repeats: calls.append((fn(), flops)) or timed
    )
    probe = volume_probe(size=16, repeats=1)
    assert probe["seconds"] == 1.25 and probe["ratio"] == 3.5  # the paired timing of the 3D pass, reported as is
    assert calls[0][0].shape == (1, 1, 16, 16, 16)  # the timed call is the 3D network on a 16^3 pair
    assert probe["peak_rss_gb"] == pytest.approx(_peak_rss_gb(), rel=0.02)
    # FLOPs scale with the voxel count: 8x the volume, about 8x the FLOPs (conv + matmul dominate)
    net = network_3d_from_config().eval()
    small, large = (network_flops(net, torch.rand(1, 2, s, s, s)) for s in (16, 32))
    assert abs(probe["gflop"] * 1e9 - small) / small < 1e-6 and calls[0][1] == small
    assert 6.0 < large / small < 9.0


def test_training_step_flops_count_forward_and_backward():
    from scripts.benchmark import network_2d_from_config, network_flops, training_step_flops

    forward = network_flops(network_2d_from_config().eval(), torch.rand(1, 2, 32, 32))
    step = training_step_flops(batch=1, crop=32)
    assert 2.5 * forward < step < 3.5 * forward  # backward: about twice the forward's products


def test_training_step_timing_runs_a_real_step(monkeypatch):
    import types

    import scripts.benchmark as benchmark

    made = []
    real_network = benchmark.network_2d_from_config

    def recording_network():
        net = real_network()
        made.append((net, [p.detach().clone() for p in net.parameters()]))
        return net

    clock = iter([10.0, 10.75, 20.0, 20.5, 30.0, 31.0])  # timed calls of 0.75, 0.5 and 1.0 s on a fake clock
    monkeypatch.setattr(benchmark, "network_2d_from_config", recording_network)
    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    assert benchmark.training_step_seconds(batch=1, crop=32, repeats=3) == pytest.approx(0.75)  # the median
    ((net, before),) = made
    # warm-up + 3 timed steps of Adam: every trained parameter moved
    moved = [not torch.equal(a, b) for a, b in zip(before, net.parameters())]
    assert sum(moved) > 0.9 * len(moved)


def test_training_epoch_timing_runs_the_train_config(tmp_path):
    """The measured epoch is the bundle's own train.json for one epoch, read back from its epoch log."""
    import csv

    import numpy as np
    from PIL import Image

    from scripts.benchmark import training_epoch_seconds

    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        for sub in ("MRI", "CT"):
            (tmp_path / "data" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(tmp_path / "data" / sub / f"{i}.png")
        rows.append(
            {"task": "CT-MRI", "mri": f"MRI/{i}.png", "other": f"CT/{i}.png", "split": "train" if i < 3 else "val"}
        )
    with open(tmp_path / "data" / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tiny = {
        "_target_": "scripts.networks.ClinicalFMamba",
        "features": [4, 8, 8],
        "depth": 1,
        "decoder_depth": 1,
        "d_state": 4,
        "swap_d_state": 4,
    }
    import time

    start = time.perf_counter()
    seconds = training_epoch_seconds(
        tmp_path / "run", datalist=str(tmp_path / "data"), network_def=tiny, patch_size=[32, 32], batch_size=2
    )
    assert 0 < seconds < time.perf_counter() - start  # the epoch alone: less than the whole workflow
    with open(tmp_path / "run" / "training_log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    assert [r["epoch"] for r in log] == ["1"] and log[0]["iterations"] == "2"  # 3 pairs, batch 2
    assert not log[0].get("val_qabf")  # no validation in the timed epoch


def test_scan_seconds_are_measured_inside_a_forward_pass():
    from scripts.benchmark import scan_seconds_in
    from scripts.networks import ClinicalFMamba
    from scripts.ssm import compiled_scan_available, set_scan_backend

    net = ClinicalFMamba(features=(8, 8, 16), depth=1, decoder_depth=1).eval()
    x = torch.rand(1, 2, 32, 32)
    with torch.inference_mode():
        spent = scan_seconds_in(lambda: net(x), repeats=1)
        if compiled_scan_available():
            assert spent is not None and 0 < spent < 10
        set_scan_backend("fast")
        try:
            assert scan_seconds_in(lambda: net(x), repeats=1) is None  # the kernel is not used
        finally:
            set_scan_backend(None)


def test_2d_network_comes_from_the_inference_config():
    from scripts.benchmark import network_2d_from_config

    net = network_2d_from_config()
    definition = json.loads((Path(__file__).resolve().parents[1] / "configs" / "inference.json").read_text())[
        "network_def"
    ]
    assert (net.refine is not None) == bool(definition.get("refine")) and (net.selection is not None) == bool(
        definition.get("source_selection")
    )
    assert net.spatial_dims == 2


def test_paired_floor_ratio_pairs_each_run_with_its_own_gemm_rate(monkeypatch):
    import scripts.benchmark as benchmark

    # a fake clock on a machine whose speed halves and recovers: GEMMs and the timed call slow down together
    clock = {"t": 0.0, "gemms": 0}
    real_matmul = torch.Tensor.__matmul__

    def slow_phase() -> bool:
        return (clock["gemms"] // 4) % 2 == 0

    def gemm(a, b):
        clock["gemms"] += 1
        clock["t"] += 0.1 if slow_phase() else 0.05
        return real_matmul(a, b)

    def timed_call():
        clock["t"] += 0.2 if slow_phase() else 0.1

    monkeypatch.setattr(torch.Tensor, "__matmul__", gemm)
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock["t"])
    out = benchmark.paired_floor_ratio(timed_call, flops=1e9, repeats=5, size=8)
    slow_rate = 2 * 8**3 / 0.1
    # every paired run has the same ratio: 0.2 s at the slow rate = 0.1 s at twice that rate
    assert out["ratio"] == pytest.approx(0.2 * slow_rate / 1e9)
    assert out["low"] == pytest.approx(out["ratio"]) and out["high"] == pytest.approx(out["ratio"])  # no spread left
    # unpaired, the median time with the best rate would double it
    assert out["seconds"] * (2 * slow_rate) / 1e9 == pytest.approx(2 * out["ratio"])


def test_cpu_description_names_model_isa_and_cpus():
    from scripts.benchmark import cpu_description

    block = (
        "processor\t: {i}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
        "stepping\t: 1\nflags\t\t: fpu sse avx2 {extra}\n\n"
    )
    two = block.format(i=0, extra="avx512f avx512dq") + block.format(i=1, extra="avx512f avx512dq")
    assert cpu_description(two) == "AMD EPYC (family 25 model 17 stepping 1, AVX-512, 2 logical CPUs)"
    one = block.format(i=0, extra="").replace("cpu family\t: 25\n", "")
    assert cpu_description(one) == "AMD EPYC (AVX2, 1 logical CPU)"


def test_image_probe_fuses_a_large_pair_in_tiles_and_reports_its_peak_memory():
    """The large-image measurement of the benchmark, at a quick size: a 64 x 64 pair above a 32 x 32 threshold is
    fused in 3 x 3 windows of 32 (overlap 0.25) through configs/inference.json, and written."""
    from scripts.benchmark import image_probe

    probe = image_probe(64, tile_above_pixels=32 * 32, tile_size=32)
    assert probe["network_calls"] == 9 and probe["written"] == 1
    assert probe["peak_rss_gb"] == pytest.approx(_peak_rss_gb(), rel=0.02)
    assert image_probe(32, tile_above_pixels=32 * 32, tile_size=32)["network_calls"] == 1  # at the threshold: whole


def test_docs_quote_the_recorded_benchmark_output() -> None:
    """docs/performance.md holds the recorded benchmark table (``--markdown docs/results/benchmark.md``) verbatim, and
    every row of the model card's speed table is a row of that record: no typed speed figures."""
    root = Path(__file__).resolve().parents[1]
    record = [line for line in (root / "docs" / "results" / "benchmark.md").read_text().splitlines() if line]
    assert record[0] == "| measurement | result |" and len(record) > 10
    assert "\n".join(record) in (root / "docs" / "performance.md").read_text()
    card = (root / "docs" / "README.md").read_text()
    speed = card.split("### Speed", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in speed.splitlines() if line.startswith("| ")]
    assert len(rows) >= 5 and all(row in record for row in rows), [r for r in rows if r not in record]
