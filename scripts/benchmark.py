"""Benchmark: selective-scan and network speed on this machine, as ratios measured in one run.

    python -m scripts.benchmark                      # everything (the reference scan at L=4096 takes minutes)
    python -m scripts.benchmark --quick              # skip the reference loop at L=4096
    python -m scripts.benchmark --markdown out.md    # also write the table

Ratios printed:
- fast scan forward+backward vs the sequential reference (``selective_scan_ref``, whose autograd
  backward is quadratic in L) and vs a sequential loop with a linear backward (``unbind`` slicing); the compiled
  scan's forward+backward (C kernels, what training runs on CPU) vs both;
- inference scan forward (L=1024): the compiled C kernel (``compiled`` backend) vs the fast PyTorch scan, and
  the kernel's first-call build time;
- 256x256 network inference time vs its FLOP floor (default scan backend; also with the ``fast`` scan) = network
  FLOPs (conv + matmul, counted by ``torch.utils.flop_counter``) / this machine's measured float32 matrix-multiply
  rate, each timed run paired with a GEMM rate measured just before it (the machine's speed drifts); and the share
  of that time spent inside the compiled selective scans, whose exponentials the FLOP count leaves out;
- training: one step (forward, backward, Adam) on a batch of 4 random 128x128 crops with the paper's loss, as
  pairs per second and against its own FLOP floor (forward + backward conv and matmul FLOPs / matmul rate), and
  the Harvard train-split epoch (446 pairs, 112 steps) it implies; then one real epoch of
  ``configs/train.json`` on the Harvard train split, timed (``--no-epoch`` skips it; needs ``../shared/data``);
- large 2D images: one 2048^2 and one 4096^2 pair (an upsampled sample) fused through ``configs/inference.json``
  (tiled above 1024^2 pixels) in a fresh process each, reporting its peak resident memory (``--images`` sets the
  sides; ``--images`` with no value skips them);
- 3D: one 128^3 volume pair fused whole by the 3D network of ``configs/inference_3d.json``, timed in a fresh
  process whose peak resident memory (``ru_maxrss``, model and input included) is reported (``--no-3d`` skips it).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scripts.cpu_tuning import tune_allocator
from scripts.networks.optimize import optimize_for_inference
from scripts.ssm import (
    compiled_scan_available,
    compiled_scan_info,
    resolve_backend,
    selective_scan,
    selective_scan_compiled,
    selective_scan_fast,
    selective_scan_ref,
    set_scan_backend,
)

__all__ = [
    "image_probe",
    "cpu_description",
    "matmul_rate",
    "network_flops",
    "paired_floor_ratio",
    "time_call",
    "volume_probe",
    "network_3d_from_config",
]

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU as the floor ratio depends on it: model name, family/model/stepping, widest vector ISA, logical CPUs.

    The ratio is against the machine's own GEMM rate, so it differs between CPUs whose vector units differ (an Intel
    core with two 512-bit FMA ports against an AMD Zen 4 core that splits 512-bit work over 256-bit units).
    ``cpuinfo`` is the text of ``/proc/cpuinfo`` (read when None); elsewhere the platform's processor name.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor's block is enough
            continue
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    cpus = cpuinfo.count("\nprocessor") + cpuinfo.startswith("processor")
    details = []
    if "cpu family" in fields and "model" in fields:
        details.append(f"family {fields['cpu family']} model {fields['model']} stepping {fields.get('stepping', '?')}")
    details += [isa] if isa else []
    details += [f"{cpus} logical CPU{'s' * (cpus != 1)}"] if cpus else []
    return f"{name} ({', '.join(details)})" if details else name


def time_call(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(size: int = 2048) -> float:
    """Measured float32 matrix-multiply rate in FLOP/s (best of several square GEMMs)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = min(time_call(lambda: a @ b, repeats=5) for _ in range(2))
    return 2 * size**3 / seconds


NETWORK_REPEATS = 15  # paired runs of the 2D network (median reported; a few seconds in all)


def paired_floor_ratio(fn, flops: float, repeats: int = 7, size: int = 2048) -> dict[str, float]:
    """Time ``fn`` against its FLOP floor with every run paired with a GEMM rate measured right before it.

    A shared virtual machine's speed drifts by tens of percent over minutes; one rate measured away from the timed
    runs can flatter or penalise the ratio by as much. Each run's ratio uses the best of two 2048^3 GEMMs timed
    just before it. Returns the median ``seconds``, the median ``ratio`` (seconds / (flops / rate)), the lowest and
    highest paired ratio (``low``, ``high``: the spread the machine gave this run) and the median ``rate`` (FLOP/s).
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    fn()
    a @ b
    seconds, ratios, rates = [], [], []
    for _ in range(repeats):
        gemm = []
        for _ in range(2):
            start = time.perf_counter()
            a @ b
            gemm.append(time.perf_counter() - start)
        rate = 2 * size**3 / min(gemm)
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        seconds.append(elapsed)
        ratios.append(elapsed * rate / flops)
        rates.append(rate)
    return {
        "seconds": statistics.median(seconds), "ratio": statistics.median(ratios),
        "low": min(ratios), "high": max(ratios),
        "rate": statistics.median(rates),
    }  # fmt: skip


def network_flops(net: torch.nn.Module, x: torch.Tensor) -> int:
    """Conv + matmul FLOPs of one forward pass (2 per multiply-add).

    Counted with the plain PyTorch (``fast``) scan backend, so that work the compiled kernel folds into
    the scan (the dt projection) still counts. Pass the plain network, not one prepared by
    :func:`scripts.networks.optimize.optimize_for_inference` (whose up-sampling convolutions skip taps): the floor is
    the network's, not one implementation's.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    set_scan_backend("fast")
    try:
        with counter, torch.no_grad():
            net(x)
    finally:
        set_scan_backend(None)
    return counter.get_total_flops()


def scan_seconds_in(fn, repeats: int = 3) -> float | None:
    """Median wall time spent inside the compiled scan kernels during ``fn()`` (None if no kernel is used): the
    scan alone, and the fused mixer kernel (causal conv + x projection + scan, :func:`mixer_scan_kernel`).

    The scan's exponentials and recurrence are not matrix multiplies, so the FLOP floor does not count them;
    this shows how much of the inference time they take.
    """
    import scripts.ssm.compiled_backend as compiled_backend  # where the compiled backend calls its kernels

    targets = [(compiled_backend, "scan_time_major_kernel"), (compiled_backend, "mixer_scan_kernel")]
    originals = [getattr(module, name) for module, name in targets]
    spent = [0.0]

    def timing(original):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return timed

    for (module, name), original in zip(targets, originals):
        setattr(module, name, timing(original))
    try:
        fn()  # warm-up
        totals = []
        for _ in range(repeats):
            spent[0] = 0.0
            fn()
            totals.append(spent[0])
    finally:
        for (module, name), original in zip(targets, originals):
            setattr(module, name, original)
    median = statistics.median(totals)
    return median if median > 0 else None


def _unbind_loop_scan(u, delta, A, B, C):
    """Sequential loop with view slicing: same maths as the reference, linear-time autograd backward."""
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A)).unbind(2)
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u).unbind(2)
    c_steps = C.unbind(2)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for a_t, b_t, c_t in zip(delta_a, delta_b_u, c_steps):
        h = a_t * h + b_t
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))
    return torch.stack(ys, dim=2)


def scan_inputs(length: int, d_inner: int = 256, d_state: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, d_inner, length, generator=g)
    delta = F.softplus(torch.randn(1, d_inner, length, generator=g) - 3)
    A = -torch.arange(1, d_state + 1.0).repeat(d_inner, 1)
    B = torch.randn(1, d_state, length, generator=g)
    C = torch.randn(1, d_state, length, generator=g)
    return [t.requires_grad_() for t in (u, delta, A, B, C)]


def time_fwd_bwd(fn, inputs, repeats: int) -> float:
    def step():
        for t in inputs:
            t.grad = None
        fn(*inputs).sum().backward()

    return time_call(step, repeats=repeats, warmup=1 if repeats > 1 else 0)


HARVARD_TRAIN_PAIRS = 446


def training_step_seconds(batch: int = 4, crop: int = 128, repeats: int = 3) -> float:
    """Median seconds of one training step of the bundle's 2D network (``train.json`` loss and optimiser)."""
    return time_call(training_step(batch, crop), repeats=repeats, warmup=1)


def training_step(batch: int = 4, crop: int = 128):
    """One training step of the bundle's 2D network (``train.json`` loss and optimiser), as a callable."""
    from scripts.losses import FusionLoss

    net = network_2d_from_config().train()
    loss_fn = FusionLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-4)
    image = torch.rand(batch, 2, crop, crop)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(image), image).backward()
        optimizer.step()

    return step


def training_step_flops(batch: int = 4, crop: int = 128) -> int:
    """Conv + matmul FLOPs of one training step's forward and backward (network and loss), ``fast`` scan backend
    as in :func:`network_flops`; the Adam update (element-wise) is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from scripts.losses import FusionLoss

    net, loss_fn = network_2d_from_config().train(), FusionLoss()
    image = torch.rand(batch, 2, crop, crop)
    counter = FlopCounterMode(display=False)
    set_scan_backend("fast")
    try:
        with counter:
            loss_fn(net(image), image).backward()
    finally:
        set_scan_backend(None)
    return counter.get_total_flops()


def training_epoch_seconds(output_dir: str | Path, **override) -> float:
    """Wall time of one real training epoch of ``configs/train.json`` (no validation), from its epoch log.

    Runs the bundle's own training workflow for one epoch into ``output_dir`` (a new folder): the Harvard
    train split by default; ``override`` replaces config entries (e.g. ``datalist``, ``network_def`` in tests).
    Data caching before the epoch is not counted.
    """
    import csv

    from monai.bundle import ConfigWorkflow

    configs = BUNDLE_ROOT / "configs"
    settings = {
        "bundle_root": str(BUNDLE_ROOT),
        "output_dir": str(output_dir),
        "val_interval": 10**6,
        "train#trainer#max_epochs": 1,
        **override,
    }
    wf = ConfigWorkflow(
        config_file=str(configs / "train.json"),
        meta_file=str(BUNDLE_ROOT / "metadata.json"),
        logging_file=str(configs / "logging.conf"),
        workflow_type="train",
        **settings,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    with open(Path(output_dir) / "training_log.csv", newline="") as f:
        return float(list(csv.DictReader(f))[-1]["epoch_seconds"])


def _network_from_configs(*names: str) -> torch.nn.Module:
    """``network_def`` of the bundle configs ``names`` (later files override earlier ones)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / name) for name in names])
    return parser.get_parsed_content("network_def")


def network_2d_from_config() -> torch.nn.Module:
    """The 2D network as ``configs/inference.json`` defines it (the architecture of the shipped weights)."""
    return _network_from_configs("inference.json")


def network_3d_from_config() -> torch.nn.Module:
    """The 3D network as ``configs/inference_3d.json`` defines it (layered on ``inference.json``)."""
    return _network_from_configs("inference.json", "inference_3d.json")


def volume_probe(size: int = 128, repeats: int = 3) -> dict[str, float]:
    """Fuse one ``size``^3 pair whole with the 3D network; seconds (median), their FLOP-floor ratio (each run paired
    with a GEMM rate, :func:`paired_floor_ratio`), GFLOP and this process's peak RSS (GB).

    Meant to run in a fresh process (``python -m scripts.benchmark --volume-probe 128``) so that the peak
    resident memory belongs to the 3D inference alone.
    """
    tune_allocator()
    net = network_3d_from_config().eval()
    x = torch.rand(1, 2, size, size, size)
    flops = network_flops(net, x)
    net = optimize_for_inference(net)  # timed as the inference workflow runs it
    with torch.inference_mode():
        timed = paired_floor_ratio(lambda: net(x), flops, repeats=repeats)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {
        "seconds": timed["seconds"],
        "ratio": timed["ratio"],
        "gflop": flops / 1e9,
        "peak_rss_gb": peak_kb / 1024**2,
    }


def image_probe(size: int = 2048, **override: Any) -> dict[str, float]:
    """Fuse one ``size`` x ``size`` pair through ``configs/inference.json`` as shipped (weights, tiling, writer);
    wall seconds, this process's peak RSS (GB) and the network calls (1 for a whole-image pass, else the tiles).

    The pair is the embedded CT-MRI sample 34012 upsampled (bicubic) to the size, written as PNGs to a temporary
    folder. ``override``: config values (e.g. ``tile_above_pixels``, ``tile_size`` for a quick run). Meant to run
    in a fresh process (``python -m scripts.benchmark --image-probe 4096``) so that the peak belongs to it alone.
    """
    import tempfile

    from monai.bundle import ConfigWorkflow
    from PIL import Image

    configs = BUNDLE_ROOT / "configs"
    sample = BUNDLE_ROOT / "docs" / "samples" / "CT-MRI"
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for folder in ("MRI", "CT"):
            (Path(tmp) / folder).mkdir()
            Image.open(sample / folder / "34012.png").convert("L").resize((size, size), Image.BICUBIC).save(
                Path(tmp) / folder / "34012.png"
            )
        rows.append({"mri": f"{tmp}/MRI/34012.png", "other": f"{tmp}/CT/34012.png", "task": "CT-MRI", "id": "34012"})
        wf = ConfigWorkflow(
            config_file=str(configs / "inference.json"),
            meta_file=str(BUNDLE_ROOT / "metadata.json"),
            logging_file=str(configs / "logging.conf"),
            workflow_type="infer",
            bundle_root=str(BUNDLE_ROOT),
            datalist=rows,
            output_dir=f"{tmp}/out",
            **override,
        )
        wf.initialize()
        network = wf.parser.get_parsed_content("network")
        calls = []
        network.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape[2:])))
        start = time.perf_counter()
        wf.run()
        seconds = time.perf_counter() - start
        written = len(wf.parser.get_parsed_content("summary").written)
        wf.finalize()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"seconds": seconds, "peak_rss_gb": peak_kb / 1024**2, "network_calls": len(calls), "written": written}


def _image_probe_subprocess(size: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark", "--image-probe", str(size)],
        cwd=BUNDLE_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _volume_probe_subprocess(size: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark", "--volume-probe", str(size)],
        cwd=BUNDLE_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(
    quick: bool = False,
    size: int = 256,
    volume: int | None = 128,
    epoch: bool = True,
    images: Sequence[int] = (2048, 4096),
) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []

    def report(name: str, value: str) -> None:
        rows.append((name, value))
        print(f"{name:<58} {value}", flush=True)

    allocator = "glibc mmap threshold raised" if tune_allocator() else "default allocator"
    report(
        "machine",
        f"{cpu_description()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {allocator}",
    )
    rate = matmul_rate()
    report("float32 matmul rate (2048^3 GEMM)", f"{rate / 1e9:.1f} GFLOP/s")

    compiled = compiled_scan_available()
    for length in (1024, 4096):
        inputs = scan_inputs(length)
        t_fast = time_fwd_bwd(selective_scan_fast, inputs, repeats=3)
        t_comp = time_fwd_bwd(selective_scan_compiled, inputs, repeats=3) if compiled else None
        t_loop = time_fwd_bwd(_unbind_loop_scan, inputs, repeats=3)
        report(f"scan fwd+bwd L={length} d_inner=256 N=8: fast", f"{t_fast * 1e3:.1f} ms")
        if t_comp is not None:
            report(
                f"scan fwd+bwd L={length}: compiled (C forward + C backward)",
                f"{t_comp * 1e3:.1f} ms ({t_fast / t_comp:.1f}x faster than fast)",
            )
        report(
            f"scan fwd+bwd L={length}: unbind loop (linear backward)",
            f"{t_loop * 1e3:.1f} ms ({t_loop / t_fast:.1f}x fast)",
        )
        if quick and length > 1024:
            report(f"scan fwd+bwd L={length}: reference loop", "skipped (--quick)")
            continue
        t_ref = time_fwd_bwd(selective_scan_ref, inputs, repeats=1)
        speedups = f"speed-up {t_ref / t_fast:.1f}x (fast)" + (
            f", {t_ref / t_comp:.1f}x (compiled)" if t_comp is not None else ""
        )
        report(f"scan fwd+bwd L={length}: reference loop (selective_scan_ref)", f"{t_ref:.2f} s -> {speedups}")

    info = compiled_scan_info()
    report(
        "compiled scan kernel: first-call build + self-check",
        f"{info['seconds']:.2f} s ({info['isa']}, {info['simd_width']} floats per vector)"
        if info["available"]
        else f"unavailable ({info['error']})",
    )
    if info["available"]:
        inputs = [t.detach() for t in scan_inputs(1024)]
        with torch.inference_mode():
            t_f, t_c = (
                time_call(lambda b=b: selective_scan(*inputs, backend=b), repeats=5) for b in ("fast", "compiled")
            )
        report(
            "scan forward (inference) L=1024: compiled vs fast",
            f"{t_c * 1e3:.1f} ms vs {t_f * 1e3:.1f} ms ({t_f / t_c:.1f}x)",
        )

    net = network_2d_from_config().eval()
    x = torch.rand(1, 2, size, size)
    flops = network_flops(net, x)
    net = optimize_for_inference(net)  # timed as the inference workflow runs it
    with torch.inference_mode():
        timed = paired_floor_ratio(lambda: net(x), flops, repeats=NETWORK_REPEATS)
        set_scan_backend("fast")
        try:
            timed_fast = paired_floor_ratio(lambda: net(x), flops, repeats=3)
        finally:
            set_scan_backend(None)
        t_scan = scan_seconds_in(lambda: net(x))
    t_net, floor = timed["seconds"], flops / timed["rate"]
    report(f"network FLOPs, one {size}x{size} pair (conv + matmul)", f"{flops / 1e9:.2f} GFLOP")
    report(
        f"{size}x{size} inference (bundle network, batch 1, {resolve_backend(None, 'cpu')} scan)",
        f"{t_net:.3f} s = {timed['ratio']:.2f}x the FLOP floor (median of {NETWORK_REPEATS} runs, "
        f"each against the GEMM rate measured just before it: {timed['low']:.2f}x to {timed['high']:.2f}x; "
        f"median rate {timed['rate'] / 1e9:.1f} GFLOP/s, "
        f"floor {floor:.3f} s)",
    )
    if t_scan is not None:
        report(
            f"{size}x{size} inference: time inside the scan kernels "
            "(the fused mixer kernel's conv and x projection included)",
            f"{t_scan:.3f} s = {t_scan / t_net:.0%} of the pass; "
            f"the rest {t_net - t_scan:.3f} s = {(t_net - t_scan) / floor:.2f}x the floor",
        )
    report(
        f"{size}x{size} inference with the fast (PyTorch) scan",
        f"{timed_fast['seconds']:.3f} s = {timed_fast['ratio']:.2f}x the FLOP floor",
    )

    step_flops = training_step_flops()
    timed_step = paired_floor_ratio(training_step(), step_flops, repeats=3)
    t_step = timed_step["seconds"]
    steps = -(-HARVARD_TRAIN_PAIRS // 4)
    report("training step, batch 4 x 128x128 crops (fwd + bwd + Adam)", f"{t_step:.2f} s = {4 / t_step:.1f} pairs/s")
    report(
        "training step FLOPs (fwd + bwd, conv + matmul) and floor ratio",
        f"{step_flops / 1e9:.1f} GFLOP: {timed_step['ratio']:.2f}x the floor ({step_flops / timed_step['rate']:.3f} s)",
    )
    report(
        f"Harvard train epoch estimate ({HARVARD_TRAIN_PAIRS} pairs, {steps} steps x timed step)",
        f"{steps * t_step / 60:.1f} min",
    )
    if epoch:
        harvard = BUNDLE_ROOT.parent / "shared" / "data" / "harvard"
        if harvard.is_dir():
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                t_epoch = training_epoch_seconds(Path(tmp) / "run")
            report(
                "Harvard train epoch, measured (configs/train.json, 1 epoch, no validation)", f"{t_epoch / 60:.2f} min"
            )
        else:
            report("Harvard train epoch, measured", f"skipped ({harvard} not found)")

    for side in images:
        probe = _image_probe_subprocess(side)
        how = "whole image" if probe["network_calls"] == 1 else f"{probe['network_calls']} tiles"
        report(
            f"{side}x{side} pair through configs/inference.json: peak resident memory (fresh process)",
            f"{probe['peak_rss_gb']:.2f} GB ({how}, {probe['seconds']:.1f} s)",
        )

    if volume:
        probe = _volume_probe_subprocess(volume)
        report(f"3D network FLOPs, one {volume}^3 pair (inference_3d.json network)", f"{probe['gflop']:.1f} GFLOP")
        report(
            f"{volume}^3 volume inference (whole volume, batch 1)",
            f"{probe['seconds']:.2f} s = {probe['ratio']:.2f}x the FLOP floor (runs paired with GEMM rates)",
        )
        report(f"{volume}^3 volume inference: peak resident memory (fresh process)", f"{probe['peak_rss_gb']:.2f} GB")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the slow reference loop at L=4096")
    parser.add_argument("--size", type=int, default=256, help="image side for the network timing")
    parser.add_argument("--volume", type=int, default=128, help="volume side for the 3D timing and peak memory")
    parser.add_argument("--no-3d", action="store_true", help="skip the 3D volume measurement")
    parser.add_argument("--no-epoch", action="store_true", help="skip the measured Harvard training epoch (minutes)")
    parser.add_argument(
        "--images",
        type=int,
        nargs="*",
        default=[2048, 4096],
        help="sides of the large 2D pairs whose peak memory is measured",
    )
    parser.add_argument("--volume-probe", type=int, help=argparse.SUPPRESS)  # internal: the 3D measurement process
    parser.add_argument("--image-probe", type=int, help=argparse.SUPPRESS)  # internal: the large-image process
    parser.add_argument("--markdown", help="also write the results as a markdown table to this file")
    args = parser.parse_args()
    if args.volume_probe:
        print(json.dumps(volume_probe(args.volume_probe)))
        return
    if args.image_probe:
        print(json.dumps(image_probe(args.image_probe)))
        return
    volume = None if args.no_3d else args.volume
    rows = run(quick=args.quick, size=args.size, volume=volume, epoch=not args.no_epoch, images=args.images)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("| measurement | result |\n| --- | --- |\n")
            f.writelines(f"| {name} | {value} |\n" for name, value in rows)


if __name__ == "__main__":
    main()
