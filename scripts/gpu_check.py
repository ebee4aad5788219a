"""Short device check: scan backends (``fast``, ``chunked``, and ``mamba_ssm`` when installed) against the reference on
the device, then fusion latency.

    python -m scripts.gpu_check          # on a CUDA machine: 2D 256x256 and 3D 128^3 latency (a few minutes)
    python -m scripts.gpu_check --dry    # anywhere: the same steps on tiny sizes on the CPU (CI runs this)

Prints one line per check and exits non-zero when a backend disagrees with the float64 reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from scripts.networks import ClinicalFMamba
from scripts.ssm import BACKENDS, mamba_ssm_available, resolve_backend, selective_scan_ref

__all__ = ["check_backends", "latency", "main", "scan_latency"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_backends(device: torch.device, length: int = 512, tol: float = 1e-4) -> bool:
    """Every usable backend on ``device`` (float32) against the float64 CPU reference; True if all agree."""
    g = torch.Generator().manual_seed(0)
    batch, dim, n = 2, 64, 8
    u = torch.randn(batch, dim, length, generator=g, dtype=torch.float64)
    delta = torch.rand(batch, dim, length, generator=g, dtype=torch.float64) * 2 - 1
    A = -torch.rand(dim, n, generator=g, dtype=torch.float64) * 4
    B = torch.randn(batch, 4, n, length, generator=g, dtype=torch.float64)
    C = torch.randn(batch, 4, n, length, generator=g, dtype=torch.float64)
    D = torch.randn(dim, generator=g, dtype=torch.float64)
    z = torch.randn(batch, dim, length, generator=g, dtype=torch.float64)
    bias = torch.randn(dim, generator=g, dtype=torch.float64)
    ref = selective_scan_ref(u, delta, A, B, C, D, z, bias, True)
    names = ["fast", "chunked"] + (["mamba_ssm"] if device.type == "cuda" and mamba_ssm_available() else [])
    ok = True
    for name in names:
        args = [t.to(device=device, dtype=torch.float32) for t in (u, delta, A, B, C, D, z, bias)]
        y = BACKENDS[name](*args, True, False).double().cpu()
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        good = err < tol
        ok &= good
        print(
            f"scan backend {name:<10} on {device.type}: max rel. error vs float64 reference {err:.2e} "
            f"-> {'OK' if good else 'FAIL'}"
        )
    return ok


def scan_latency(device: torch.device, length: int, repeats: int) -> dict[str, float]:
    """Median seconds of one float32 scan forward (batch 1, 8 groups x 256 channels, N 8: a 256 x 256 mixer call)
    for each usable backend on ``device``: the per-step ``fast`` scan against the closed-form ``chunked`` one
    (and mamba_ssm's kernel when installed)."""
    g = torch.Generator().manual_seed(1)
    dim, n, groups = 2048, 8, 8
    u = torch.randn(1, dim, length, generator=g)
    delta = torch.rand(1, dim, length, generator=g) * 0.1
    A = -torch.rand(dim, n, generator=g) * 4
    B, C = (torch.randn(1, groups, n, length, generator=g) for _ in range(2))
    args = [t.to(device) for t in (u, delta, A, B, C)]
    names = ["fast", "chunked"] + (["mamba_ssm"] if device.type == "cuda" and mamba_ssm_available() else [])
    seconds = {}
    with torch.inference_mode():
        for name in names:
            times = []
            for _ in range(repeats + 1):
                _sync(device)
                start = time.perf_counter()
                BACKENDS[name](*args, None, None, None, False, False)
                _sync(device)
                times.append(time.perf_counter() - start)
            seconds[name] = statistics.median(times[1:])
    return seconds


def latency(net: torch.nn.Module, shape: tuple[int, ...], device: torch.device, repeats: int) -> float:
    """Median seconds of one forward pass (after a warm-up) on a random pair of ``shape``."""
    x = torch.rand(*shape, device=device)
    times = []
    with torch.inference_mode():
        net(x)
        _sync(device)
        for _ in range(repeats):
            start = time.perf_counter()
            net(x)
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU (keeps the script from rotting)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry or not torch.cuda.is_available() else "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; scan backend for this device: {resolve_backend(None, device)}")
    ok = check_backends(device, length=64 if args.dry else 1024)
    length = 64 if args.dry else 1024
    for name, seconds in scan_latency(device, length, repeats=1 if args.dry else 5).items():
        print(f"scan latency {name:<10} L={length}, 8 groups x 256 channels, N 8: {seconds * 1e3:.2f} ms")
    if args.dry:
        tiny = dict(features=(8, 8, 16), depth=1, decoder_depth=1, d_state=4, swap_d_state=4)
        runs = [
            ("2D 32x32 (tiny)", ClinicalFMamba(**tiny), (1, 2, 32, 32)),
            ("3D 16^3 (tiny)", ClinicalFMamba(spatial_dims=3, channel_exchange=False, **tiny), (1, 2, 16, 16, 16)),
        ]
        repeats = 1
    else:
        runs = [
            ("2D 256x256", ClinicalFMamba(), (1, 2, 256, 256)),
            (
                "3D 128^3",
                ClinicalFMamba(spatial_dims=3, channel_exchange=False, pyramid=False, decoder_depth=0),
                (1, 2, 128, 128, 128),
            ),
        ]
        repeats = 5
    for label, net, shape in runs:
        seconds = latency(net.to(device).eval(), shape, device, repeats)
        peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
        print(f"latency {label}: {seconds * 1e3:.1f} ms per pair{peak}")
    print("GPU check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
