"""Compiled selective scan (CPU): one fused C kernel, built at run time, with a clean fallback.

The ``fast`` backend runs the recurrence as one small PyTorch op per time step (single-threaded, each op
below PyTorch's parallel grain size) plus separate ops for the softplus, ``exp(delta * A)``, the drive
``delta * B * u``, the ``C`` contraction and the ``D`` skip. Here all of it is one loop nest in C
(``scan_kernel.c``): per (batch, group) lane and block of 16 channels the N states stay in registers for all
L steps, and the softplus, exponentials, recurrence, contraction and skip are explicit SIMD code. Two more
memory-bound steps of the Mamba mixer are folded in for inference: the low-rank dt projection
(``delta_proj_weight``: delta is computed per step from its R-dimensional input instead of being written
and read back as an (L, batch, G, P) tensor) and the causal depthwise convolution + SiLU
(:func:`causal_conv_silu_kernel`, one pass instead of one PyTorch op per tap plus the activation).

Build: on first use the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) compiles the kernel
into a temporary shared library (about 3 s with GCC; no PyTorch headers), which is loaded with ctypes and
checked against the float64 reference on a small problem. The built library is kept in a per-user cache
(:func:`kernel_cache_dir`, keyed by the source, the compiler and this CPU), so later processes skip the compiler. If anything fails (no compiler, compiler
error, time-out after :data:`COMPILE_TIMEOUT` s, failed self-check) a warning is logged once and the
``fast`` path is used; nothing raises.

Scope: forward without autograd (``torch.no_grad``/``inference_mode``, or no input requiring grad), CPU
tensors, float32 (SIMD, Cephes-accurate exp/log, ~1e-7 relative) or float64 (scalar, C library exp and
log1p), N <= 64. With autograd (training) the scan runs :class:`scripts.ssm.compiled_grad.CompiledSelectiveScan`,
this forward with stored checkpoints plus the C backward of the same library; anything else (other devices,
N > 64, no kernel) runs the ``fast`` backend unchanged.
Work items (lane x channel block) are split over ``torch.get_num_threads()`` threads: on PyTorch's own OpenMP
threads when the library could be built with ``-fopenmp`` against the runtime PyTorch loaded (Linux), else
over a small Python thread pool (ctypes releases the GIL during the call).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .mixer import causal_conv_silu_reference, gate_merge_reference

__all__ = [
    "COMPILE_TIMEOUT",
    "compiled_scan_available",
    "compiled_scan_info",
    "kernel_applicable",
    "kernel_cache_dir",
    "causal_conv_silu_kernel",
    "max_conv_width",
    "max_norm_width",
    "mixer_scan_applicable",
    "mixer_scan_kernel",
    "MixerKernelWeights",
    "prepare_mixer_weights",
    "causal_conv_silu_reference",
    "gate_merge_kernel",
    "gate_merge_reference",
    "scan_time_major_kernel",
    "register_self_check",
]

#: seconds the C compiler may take before the build is abandoned (then the ``fast`` path is used)
COMPILE_TIMEOUT = float(os.environ.get("CLINICALFMAMBA_COMPILE_TIMEOUT", "60"))
_SOURCE = Path(__file__).with_name("scan_kernel.c")
#: environment variable naming the target the kernels are built for (GCC/Clang ``-march``): ``native`` (default),
#: or for example ``x86-64-v3`` (AVX2 + FMA, no AVX-512) or ``x86-64`` (SSE2) to build and test the portable paths
ARCH_ENV_VAR = "CLINICALFMAMBA_KERNEL_ARCH"

_logger = logging.getLogger(__name__)
_lock = threading.RLock()  # re-entered by the self-check
_build: dict = {}  # filled once: lib, nmax, seconds, compiler, flags, error
_extra_self_checks: list[Callable[[], None]] = []  # run after the forward checks; a failure disables the library
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_size = 0


def _find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _loaded_openmp_runtimes() -> set[str]:
    """Files of the GNU OpenMP runtime (libgomp) mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            return {os.path.realpath(line.split(None, 5)[5].strip()) for line in maps if "libgomp" in line and "/" in line}
    except (OSError, IndexError):
        return set()


def _libgomp_so1_runtimes() -> list[str]:
    """The loaded runtimes named ``libgomp.so*``: the one a library linked with ``-fopenmp`` binds to
    (other packages' renamed copies, such as scikit-learn's ``libgomp-<hash>.so``, are left out)."""
    return [p for p in _loaded_openmp_runtimes() if os.path.basename(p).startswith("libgomp.so")]


def _share_torch_openmp() -> bool:
    """Whether to build the kernel with OpenMP on PyTorch's own runtime.

    PyTorch's intra-op threads (GNU OpenMP on Linux builds) keep spinning for a while after each operator;
    a kernel that splits its work over threads of its own then competes with them for the cores (measured:
    a 2-thread scan call took 15.4 ms right after a PyTorch operator against 10.7 ms alone). A library built
    with ``-fopenmp`` names ``libgomp.so.1``, which the dynamic loader resolves to the runtime PyTorch already
    loaded, so the kernel runs on the same, already awake threads. Off when PyTorch's parallel backend is not
    OpenMP, when no runtime named ``libgomp.so.1`` is loaded (other packages' renamed copies, such as
    scikit-learn's ``libgomp-<hash>.so``, do not count), or with ``CLINICALFMAMBA_SCAN_OPENMP=0``.
    """
    if os.environ.get("CLINICALFMAMBA_SCAN_OPENMP", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    return len(_libgomp_so1_runtimes()) == 1


def kernel_cache_dir() -> Path | None:
    """Where built kernel libraries are kept between processes: ``$CLINICALFMAMBA_KERNEL_CACHE``, else
    ``$XDG_CACHE_HOME/clinicalfmamba`` (``~/.cache/clinicalfmamba``); None when that variable is ``0`` or empty."""
    configured = os.environ.get("CLINICALFMAMBA_KERNEL_CACHE")
    if configured is not None:
        return Path(configured).expanduser() if configured not in ("", "0") else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clinicalfmamba"


def kernel_arch() -> str:
    """The ``-march`` target of the kernel build: ``$CLINICALFMAMBA_KERNEL_ARCH``, default ``native`` (this CPU).

    Another target builds the code paths of other machines on this one: ``x86-64-v3`` the AVX2 paths (no AVX-512
    instructions), ``x86-64`` the SSE2 baseline; the tests run the kernels built so against the reference.
    """
    arch = os.environ.get(ARCH_ENV_VAR, "").strip() or "native"
    if not all(c.isalnum() or c in "-_.+" for c in arch):
        raise ValueError(f"{ARCH_ENV_VAR}={arch!r} is not a -march value (letters, digits, '-', '_', '.', '+')")
    return arch


def _cache_key(source: Path, compiler: str, openmp: bool, arch: str = "native") -> str:
    """Hash of everything the library depends on: the source, the compiler binary, the OpenMP choice, the ``-march``
    target and this CPU's model and instruction-set flags (``-march=native``: never load one built elsewhere)."""
    digest = hashlib.sha256(source.read_bytes())
    stat = os.stat(compiler)
    digest.update(f"{compiler}|{stat.st_size}|{stat.st_mtime_ns}|{openmp}|{arch}|{sys.platform}|{platform.machine()}".encode())
    try:
        with open("/proc/cpuinfo") as info:
            digest.update("".join(sorted({line for line in info if line.startswith(("model name", "flags"))})).encode())
    except OSError:
        digest.update(platform.processor().encode())
    return digest.hexdigest()[:32]


def _compile(source: Path, output: str, openmp: bool = False) -> tuple[str, list[str]]:
    """Compile ``source`` into the shared library ``output`` (or copy it from the kernel cache, where an identical
    build for this CPU is kept: :func:`kernel_cache_dir`); returns (compiler, flags). Raises on failure."""
    if sys.platform == "win32":
        raise RuntimeError("the compiled scan is built with a Unix C compiler; not supported on Windows")
    compiler = _find_compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
    arch = kernel_arch()
    cache = kernel_cache_dir()
    cached = None if cache is None else cache / f"scan_kernel_{_cache_key(source, compiler, openmp, arch)}"
    if cached is not None and cached.with_suffix(".so").is_file() and cached.with_suffix(".json").is_file():
        try:
            flags = json.loads(cached.with_suffix(".json").read_text())["flags"]
            shutil.copyfile(cached.with_suffix(".so"), output)
            return compiler, flags
        except (OSError, ValueError, KeyError):
            pass  # unreadable entry: build again
    base = ["-O3", "-std=gnu99", "-fPIC", "-shared", "-fno-math-errno", "-Wno-psabi"] + (["-fopenmp"] if openmp else [])
    errors = []
    # -march=native: the library is built for, and used on, this machine; an explicit target has no fallback (a build
    # for another target than asked would test the wrong code)
    for march in ([f"-march={arch}"], []) if arch == "native" else ([f"-march={arch}"],):
        flags = base + march
        proc = subprocess.run(
            [compiler, *flags, str(source), "-o", output, "-lm"], capture_output=True, text=True, timeout=COMPILE_TIMEOUT
        )
        if proc.returncode == 0:
            if cached is not None:
                _store_in_cache(output, cached, flags)
            return compiler, flags
        errors.append(proc.stderr.strip()[-2000:])
    raise RuntimeError(f"{compiler} failed: {errors[-1]}")


def _store_in_cache(library: str, cached: Path, flags: list[str]) -> None:
    """Keep a built library for later processes (atomic renames; a cache that cannot be written is skipped)."""
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        for suffix, write in ((".so", lambda f: shutil.copyfile(library, f)), (".json", lambda f: Path(f).write_text(json.dumps({"flags": flags})))):
            fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=suffix)
            os.close(fd)
            write(tmp)
            os.replace(tmp, cached.with_suffix(suffix))
    except OSError as exc:
        _logger.info("kernel cache %s not written (%s)", cached.parent, exc)


def _build_and_load(tmp: str) -> tuple[ctypes.CDLL, str, list[str], bool]:
    """Compile and load the library, with OpenMP on PyTorch's runtime when that works, else without."""
    if _share_torch_openmp():
        before = _loaded_openmp_runtimes()
        try:
            output = os.path.join(tmp, "scan_kernel_openmp.so")
            compiler, flags = _compile(_SOURCE, output, openmp=True)
            lib = ctypes.CDLL(output)
            if _loaded_openmp_runtimes() == before and lib.scan_openmp() == 1:
                return lib, compiler, flags, True
            _logger.info("OpenMP build of the scan kernel loaded a second OpenMP runtime; using the build without OpenMP")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            _logger.info("OpenMP build of the scan kernel failed (%s); using the build without OpenMP", exc)
    output = os.path.join(tmp, "scan_kernel.so")
    compiler, flags = _compile(_SOURCE, output)
    return ctypes.CDLL(output), compiler, flags, False


def _load() -> dict:
    """Build, load and self-check the kernel (once per process); never raises."""
    with _lock:
        if _build:
            return _build
        start = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix="clinicalfmamba_scan_")
        try:
            lib, compiler, flags, openmp = _build_and_load(tmp)  # mapped into the process: the file can go
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            for fn in (lib.scan_f32, lib.scan_f64):  # ... wdt, R, ckpt, T, lo, hi, nthreads
                fn.argtypes = [i64] * 5 + [ptr] * 5 + [i64] + [ptr] * 2 + [ctypes.c_int] + [ptr] * 3 + [i64, ptr, i64, ptr] + [i64] * 4
                fn.restype = None
            for fn in (lib.scan_bwd_f32, lib.scan_bwd_f64):  # L, lanes, G, P, N, T, delta .. C, bc_stride, D, bias, ...
                fn.argtypes = [i64] * 6 + [ptr] * 5 + [i64] + [ptr] * 2 + [ctypes.c_int] + [ptr] * 10 + [i64] * 3
                fn.restype = None
            for fn in (lib.conv_silu_f32, lib.conv_silu_f64):  # lanes, G, P, K, x, x_stride, index, taps, bias, out, ...
                fn.argtypes = [i64] * 4 + [ptr, i64] + [ptr] * 4 + [i64] * 3
                fn.restype = None
            # L, B, G, P, N, R, K, x, x_stride, index, taps, conv_bias, src, src_stride, wxt, CP, wdt, dt_bias, A, D, y, h, ...
            # ... D, y, h, KD, out, z, z_stride, ln_w, ln_b, eps, lo, hi, nthreads
            lib.mixer_scan_f32.argtypes = [i64] * 7 + [ptr, i64] + [ptr] * 4 + [i64, ptr, i64] + [ptr] * 6 + [i64, ptr, ptr, i64, ptr, ptr, ctypes.c_double] + [i64] * 3
            lib.mixer_scan_f32.restype = None
            for fn in (lib.gate_merge_f32, lib.gate_merge_f64):  # L, B, M, K, P, y, index, z, z_stride, ln_w, ln_b, eps, out, ...
                fn.argtypes = [i64] * 5 + [ptr] * 3 + [i64, ptr, ptr, ctypes.c_double, ptr] + [i64] * 3
                fn.restype = None
            _build.update(
                lib=lib,
                nmax=int(lib.scan_nmax()),
                tnmax=int(lib.scan_tnmax()),
                block=int(lib.scan_width()),
                isa=_isa(lib),
                kmax=int(lib.scan_kmax()),
                pmax=int(lib.scan_pmax()),
                fused_pmax=int(lib.scan_fused_pmax()),
                xmax=int(lib.scan_xmax()),
                compiler=compiler,
                flags=flags,
                openmp=openmp,
            )
            _self_check()
            _build["seconds"] = time.perf_counter() - start
            _logger.info("compiled selective scan built in %.2f s (%s %s)", _build["seconds"], compiler, " ".join(flags))
        except Exception as exc:  # noqa: BLE001 - any failure means: use the fast path
            _build.clear()
            _build.update(lib=None, error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - start)
            _logger.warning("compiled selective scan unavailable, using the fast PyTorch scan instead (%s)", _build["error"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return _build


def _isa(lib: ctypes.CDLL) -> str:
    """The vector instruction set the library's float32 kernels use (``AVX-512``, ``AVX2+FMA``, ``SSE2``, ``NEON``...)."""
    lib.scan_isa.restype = ctypes.c_char_p
    return lib.scan_isa().decode()


def _self_check() -> None:
    """Compare the freshly built kernels, forward and backward, with the float64 reference on a small problem (both dtypes)."""
    from .reference import selective_scan_ref, warm_up_exp

    warm_up_exp()  # the float64 references below must not take the first, racy exp of the process
    g = torch.Generator().manual_seed(0)
    batch, dim, length, n_state, groups = 2, 38, 21, 5, 2  # 19 channels per group: one full and one partial block
    u, delta, z = (torch.randn(batch, dim, length, generator=g, dtype=torch.float64) for _ in range(3))
    A = -torch.rand(dim, n_state, generator=g, dtype=torch.float64) * 3
    B, C = (torch.randn(batch, groups, n_state, length, generator=g, dtype=torch.float64) for _ in range(2))
    D, bias = (torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        ref = selective_scan_ref(u, delta, A, B, C, D, z, bias, True)
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
            args = [t.to(dtype) for t in (u, delta, A, B, C, D, z, bias)]
            y = _scan_channels_first(*args, delta_softplus=True)
            err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
            if not err <= tol:  # also catches NaN
                raise RuntimeError(f"self-check failed for {dtype}: relative error {err:.2e} > {tol:.0e}")
        # the folded dt projection and the fused causal convolution + SiLU, time-major
        per_group, rank, width = dim // groups, 3, 4
        x = torch.randn(length, batch, groups, per_group, generator=g, dtype=torch.float64)
        dt = torch.randn(length, batch, groups, rank, generator=g, dtype=torch.float64)
        w_dt = torch.randn(groups, per_group, rank, generator=g, dtype=torch.float64) / 2
        taps, conv_bias = torch.randn(groups, per_group, width, generator=g, dtype=torch.float64), D.view(groups, -1)
        a_g, b_t, c_t = A.view(groups, per_group, n_state), B.permute(3, 0, 1, 2), C.permute(3, 0, 1, 2)
        ref_conv = causal_conv_silu_reference(x, taps, conv_bias)
        y_merge = torch.randn(length, batch, 2 * groups, per_group, generator=g, dtype=torch.float64)  # M = 2, K = groups
        merge_index = torch.randperm(y_merge.numel() // per_group, generator=g)
        z_merge = torch.randn(2, batch, length, 2 * per_group, generator=g, dtype=torch.float64)[..., :per_group]
        ref_merge = gate_merge_reference(y_merge, merge_index, z_merge)
        norm_w, norm_b = (torch.randn(2, per_group, generator=g, dtype=torch.float64) for _ in range(2))
        ref_merge_norm = F.layer_norm(ref_merge, (per_group,)) * norm_w[:, None, None] + norm_b[:, None, None]
        conv_index = torch.randperm(x.numel() // per_group, generator=g)  # x's rows, shuffled, read from "tokens"
        tokens = torch.empty(1, batch, x.numel() // per_group // batch, per_group, dtype=torch.float64)
        tokens.view(-1, per_group)[conv_index] = x.reshape(-1, per_group)
        delta_lr = torch.einsum("lbgr,gpr->lbgp", dt, w_dt).permute(1, 2, 3, 0).reshape(batch, dim, length)
        ref_y = selective_scan_ref(x.permute(1, 2, 3, 0).reshape(batch, dim, length), delta_lr, A, B, C, D, None, bias, True)
        ref_y = ref_y.reshape(batch, groups, per_group, length).permute(3, 0, 1, 2)
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
            cast = [t.to(dtype) for t in (x, dt, w_dt, taps, conv_bias, a_g, b_t, c_t, bias.view(groups, -1))]
            conv = causal_conv_silu_kernel(cast[0], cast[3], cast[4])
            conv_gathered = causal_conv_silu_kernel(tokens.to(dtype), cast[3], cast[4], index=conv_index)
            y = scan_time_major_kernel(cast[0], cast[1], cast[5], cast[6], cast[7], cast[4], cast[8], True, delta_proj_weight=cast[2])[0]
            merge = gate_merge_kernel(y_merge.to(dtype), merge_index, z_merge.to(dtype))
            merge_norm = gate_merge_kernel(y_merge.to(dtype), merge_index, z_merge.to(dtype), norm_w.to(dtype), norm_b.to(dtype))
            checks = (
                ("causal conv + SiLU", conv, ref_conv), ("gathered causal conv + SiLU", conv_gathered, ref_conv),
                ("low-rank delta scan", y, ref_y), ("direction merge", merge, ref_merge), ("merge + norm", merge_norm, ref_merge_norm),
            )  # fmt: skip
            for name, out, ref in checks:
                err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
                if not err <= tol:
                    raise RuntimeError(f"self-check of the {name} failed for {dtype}: relative error {err:.2e} > {tol:.0e}")
    # the fused mixer kernel (float32 only) against the separate float64 kernels checked above
    with torch.no_grad():
        w_x = torch.randn(groups, rank + 2 * n_state, per_group, generator=g, dtype=torch.float64) / 4
        for source in (None, tokens.flip(2)):
            u = causal_conv_silu_kernel(tokens, taps, conv_bias, index=conv_index)
            s = u if source is None else source.reshape(-1, per_group)[conv_index].view_as(u)
            dt_, b_, c_ = torch.einsum("lbgp,gcp->lbgc", s, w_x).split([rank, n_state, n_state], dim=-1)
            ref_fused = scan_time_major_kernel(u, dt_, a_g, b_, c_, conv_bias, bias.view(groups, -1), True, delta_proj_weight=w_dt)[0]
            cast = [t.float() if t is not None else None for t in (tokens, taps, conv_bias, w_x, w_dt, bias.view(groups, -1), a_g, source)]
            fused = mixer_scan_kernel(cast[0], conv_index, cast[1], cast[2], cast[3], cast[4], cast[5], cast[6], cast[2], source=cast[7])
            err = ((fused.double() - ref_fused).abs().max() / ref_fused.abs().max()).item()
            if not err <= 1e-4:
                raise RuntimeError(f"self-check of the fused mixer kernel failed: relative error {err:.2e} > 1e-04")
    for check in _extra_self_checks:  # registered by the modules built on this library (the backward)
        check()


def register_self_check(check: Callable[[], None]) -> None:
    """Run ``check`` in the library's self-check, after the forward kernels' checks (it raises on a wrong result;
    the library is then not used). For modules that bind more of the library (:mod:`scripts.ssm.compiled_grad`);
    register at import, before the first build."""
    if check not in _extra_self_checks:
        _extra_self_checks.append(check)


def compiled_scan_available() -> bool:
    """Whether the kernel is built and loaded (builds it on first call; False after a failed build)."""
    return _load()["lib"] is not None


def compiled_scan_info() -> dict:
    """Build report: ``available``, ``seconds`` (first-call build + self-check), ``compiler``, ``flags``, ``openmp``
    (threads shared with PyTorch's OpenMP runtime), ``isa`` and ``simd_width`` (the vector instruction set the float32
    kernels use and their vectors' length in floats), ``error``."""
    info = _load()
    return {
        "available": info["lib"] is not None,
        "seconds": info.get("seconds"),
        "compiler": info.get("compiler"),
        "flags": info.get("flags"),
        "openmp": info.get("openmp", False),
        "isa": info.get("isa"),
        "simd_width": info.get("block"),
        "error": info.get("error"),
    }


def kernel_applicable(*tensors: torch.Tensor | None, n_state: int) -> bool:
    """True when the kernel can run these inputs: CPU, no autograd needed, N supported, kernel built."""
    present = [t for t in tensors if t is not None]
    if any(t.device.type != "cpu" for t in present):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    info = _load()
    return info["lib"] is not None and n_state <= info["nmax"]


def _forget_pool() -> None:  # a forked child has the pool object but not its threads
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _threads(items: int) -> int:
    return max(1, min(torch.get_num_threads(), items))


def _run(fn, args: list, items: int) -> None:
    """Call the kernel on work items 0..items-1, split over torch's thread count."""
    global _pool, _pool_size
    threads = _threads(items)
    if threads == 1 or _build.get("openmp"):
        fn(*args, 0, items, threads)  # the OpenMP build splits the items itself, on PyTorch's threads
        return
    with _lock:
        if _pool is None or _pool_size != threads - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = concurrent.futures.ThreadPoolExecutor(threads - 1, thread_name_prefix="clinicalfmamba_scan")
            _pool_size = threads - 1
        pool = _pool
    bounds = [items * i // threads for i in range(threads + 1)]
    futures = [pool.submit(fn, *args, bounds[i], bounds[i + 1], 1) for i in range(1, threads)]
    fn(*args, bounds[0], bounds[1], 1)
    for future in futures:
        future.result()


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A 4D tensor (time-major (L, batch, G, N), or tokens (M, B, L, P)) and the stride between its rows of the last
    dim; copies only if the rows are not evenly spaced with unit stride inside (split views of one projection
    output are not copied)."""
    length, batch, groups, _ = x.shape
    s = x.stride()
    if s[3] == 1 and s[1] == groups * s[2] and s[0] == batch * groups * s[2] and s[2] >= x.shape[3]:
        return x, s[2]
    x = x.contiguous()
    return x, x.shape[3]


def scan_time_major_kernel(
    u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, h0=None, delta_proj_weight=None, ckpt=None, ckpt_every=1
):
    """The kernel on time-major inputs (shapes as :func:`scripts.ssm.selective_scan_time_major`).

    With ``delta_proj_weight`` (G, P, R), ``delta`` is the low-rank input (L, batch, G, R) and the kernel
    computes ``einsum("lbgr,gpr->lbgp", delta, delta_proj_weight)`` on the fly (Mamba's dt projection).
    Returns y (L, batch, G, P) and the last state (batch, G, N, P), in float32 or float64 (the promoted
    compute dtype). The caller checks :func:`kernel_applicable` first. With ``ckpt``, a contiguous
    (ceil(L / ckpt_every), batch * G, N, P) tensor of the compute dtype, the state before every ``ckpt_every``-th
    step is written into it (for the backward, :mod:`scripts.ssm.compiled_grad`).
    """
    compute = torch.promote_types(u.dtype, torch.float32)
    length, batch, groups, per_group = u.shape
    n_state = A.shape[-1]
    u = u.to(compute).contiguous()
    if delta_proj_weight is None:
        delta, dtr, dt_stride, wdt, rank = delta.to(compute).contiguous(), None, 0, None, 0
    else:
        dtr, dt_stride = _rows(delta.to(compute))
        wdt = delta_proj_weight.to(compute).reshape(groups, per_group, -1).transpose(-1, -2).contiguous()  # (G, R, P)
        rank = wdt.shape[1]
        if dtr.shape[3] != rank:
            raise ValueError(f"low-rank delta has {dtr.shape[3]} values per row, the projection expects {rank}")
    a_t = A.to(compute).reshape(groups, per_group, n_state).transpose(-1, -2).contiguous()  # (G, N, P)
    B, C = B.to(compute), C.to(compute)
    (B, sb), (C, sc) = _rows(B), _rows(C)
    if sb != sc:
        (B, sb), (C, sc) = _rows(B.contiguous()), _rows(C.contiguous())
    D = None if D is None else D.to(compute).reshape(groups, per_group).contiguous()
    bias = None if delta_bias is None else delta_bias.to(compute).reshape(groups, per_group).contiguous()
    y = torch.empty_like(u)
    lanes = batch * groups
    h = u.new_zeros(lanes, n_state, per_group) if h0 is None else h0.to(compute).reshape(lanes, n_state, per_group).clone()
    if length:
        lib = _load()["lib"]
        fn = lib.scan_f32 if compute == torch.float32 else lib.scan_f64
        args = [
            length, lanes, groups, per_group, n_state,
            None if dtr is not None else delta.data_ptr(), u.data_ptr(), a_t.data_ptr(), B.data_ptr(), C.data_ptr(), sb,
            None if D is None else D.data_ptr(), None if bias is None else bias.data_ptr(),
            int(bool(delta_softplus)), y.data_ptr(), h.data_ptr(),
            None if dtr is None else dtr.data_ptr(), dt_stride, None if wdt is None else wdt.data_ptr(), rank,
            None if ckpt is None else ckpt.data_ptr(), ckpt_every,
        ]  # fmt: skip
        _run(fn, args, lanes * (-(-per_group // _build["block"])))
    return y, h.view(batch, groups, n_state, per_group)


def causal_conv_silu_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`causal_conv_silu_reference` in one pass of the compiled kernel (the caller checks
    :func:`kernel_applicable` and :func:`max_conv_width`); float32 or float64 (the promoted compute dtype).

    With ``index`` (the mixers' direction gather), ``x`` is the (M, B, L, P) tokens (rows of P evenly spaced, for
    example a column slice of the input projection) and the kernel reads row ``index[(t * B + b) * G + g]`` of them
    for step t of sequence (b, g), as ``causal_conv_silu_reference(x.reshape(-1, P)[index].view(L, B, G, P), ...)``
    without the gathered copy. Output (L, B, G, P) contiguous.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    groups, per_group, width = weight.shape
    if width > _load()["kmax"]:
        raise ValueError(f"causal convolution of width {width}: the kernel takes at most {_load()['kmax']}")
    x = x.to(compute)
    if index is None:
        length, batch = x.shape[:2]
        x, stride = x.contiguous(), per_group
    else:
        members, batch, tokens, _ = x.shape
        length = index.numel() // (batch * groups)
        x, stride = _rows(x)
        if index.dtype != torch.int64 or index.numel() % (batch * groups):
            raise ValueError(f"index must hold (L, {batch}, {groups}) int64 row numbers, got {index.numel()} {index.dtype}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= members * batch * tokens):
            raise ValueError("index refers to rows outside x")
        index = index.contiguous()
    taps = weight.to(compute).permute(2, 0, 1).contiguous()  # (K, G, P)
    bias = bias.to(compute).reshape(groups, per_group).contiguous()
    out = torch.empty(length, batch, groups, per_group, dtype=compute)
    if length:
        lib = _load()["lib"]
        fn = lib.conv_silu_f32 if compute == torch.float32 else lib.conv_silu_f64
        args = [
            batch * groups, groups, per_group, width, x.data_ptr(), stride, None if index is None else index.data_ptr(),
            taps.data_ptr(), bias.data_ptr(), out.data_ptr(),
        ]  # fmt: skip
        _run(fn, args, length)
    return out


def max_conv_width() -> int:
    """Widest causal convolution the kernel takes (0 without a kernel)."""
    return _load().get("kmax") or 0


def mixer_scan_applicable(x: torch.Tensor, d_inner: int, d_state: int, dt_rank: int, d_conv: int, lanes: int) -> bool:
    """Whether :func:`mixer_scan_kernel` takes this mixer's shapes: float32, sizes within the kernel's buffers, and
    at least one lane per thread (its work items are lanes; fewer lanes run faster as separate kernels)."""
    info = _load()
    return (
        info["lib"] is not None and x.dtype == torch.float32 and d_inner <= info["fused_pmax"]
        and dt_rank + 2 * d_state <= info["xmax"] and d_state <= info["nmax"] and d_conv <= info["kmax"]
        and lanes >= torch.get_num_threads()
    )  # fmt: skip


class MixerKernelWeights(NamedTuple):
    """A mixer's parameters in the float32 layouts :func:`mixer_scan_kernel` reads (:func:`prepare_mixer_weights`)."""

    taps: torch.Tensor  # (K, G, P) conv taps
    conv_bias: torch.Tensor  # (G, P)
    wxt: torch.Tensor  # (G, P, CP) x projection transposed, zero-padded to CP columns
    wdt: torch.Tensor  # (G, R, P) dt projection transposed
    A: torch.Tensor  # (G, N, P)
    dt_bias: torch.Tensor  # (G, P)
    D: torch.Tensor | None  # (G, P)
    norm_weight: torch.Tensor | None  # (M, P)
    norm_bias: torch.Tensor | None  # (M, P)


def prepare_mixer_weights(
    conv_weight: torch.Tensor, conv_bias: torch.Tensor, x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor,
    dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor | None, norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
) -> MixerKernelWeights:
    """The layouts :func:`mixer_scan_kernel` needs, computed once: a module can keep them between inference calls
    while its parameters are unchanged (about ten small copies per call otherwise). Shapes as :func:`mixer_scan_kernel`."""
    groups, per_group, _ = conv_weight.shape
    n_state, rank = A.shape[-1], dt_proj_weight.shape[-1]
    f32 = dict(dtype=torch.float32)
    block = _load().get("block", 16)
    padded = -(-(rank + 2 * n_state) // block) * block
    members = None if norm_weight is None else norm_weight.shape[0]
    return MixerKernelWeights(
        taps=conv_weight.to(**f32).permute(2, 0, 1).contiguous(),
        conv_bias=conv_bias.to(**f32).reshape(groups, per_group).contiguous(),
        wxt=F.pad(x_proj_weight.to(**f32).transpose(1, 2), (0, padded - rank - 2 * n_state)).contiguous(),
        wdt=dt_proj_weight.to(**f32).reshape(groups, per_group, rank).transpose(-1, -2).contiguous(),
        A=A.to(**f32).reshape(groups, per_group, n_state).transpose(-1, -2).contiguous(),
        dt_bias=dt_bias.to(**f32).reshape(groups, per_group).contiguous(),
        D=None if D is None else D.to(**f32).reshape(groups, per_group).contiguous(),
        norm_weight=None if norm_weight is None else norm_weight.to(**f32).reshape(members, per_group).contiguous(),
        norm_bias=None if norm_bias is None else norm_bias.to(**f32).reshape(members, per_group).contiguous(),
    )


def mixer_scan_kernel(
    x: torch.Tensor, index: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor, x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor | None, source: torch.Tensor | None = None,
    z: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None, eps: float = 1e-5,
    prepared: MixerKernelWeights | None = None, check_index: bool = True,
) -> torch.Tensor:
    """A mixer's work between its input projection and its merge, in one float32 kernel pass (inference).

    Equal to :func:`causal_conv_silu_kernel` (``x``, ``index``, ``conv_weight`` (G, P, K), ``conv_bias``), then the
    x projection ``einsum("lbgp,gcp->lbgc", s, x_proj_weight)`` of s = that output, or of ``source`` gathered by
    ``index`` (cross-modal mixers), split into (dt (R), B (N), C (N)), then the selective scan of the output with the
    low-rank delta ``dt`` through ``dt_proj_weight`` (G, P, R), ``dt_bias`` (G, P) and softplus, ``A`` (G, P, N) and
    ``D`` (G, P): y (L, B, G, P), one work item per lane. Neither the convolution's output nor the projection is
    written to memory.

    With ``z`` (M, B, L, P) the merge follows in the same pass (:func:`gate_merge_kernel`, with the output norm when
    ``norm_weight`` and ``norm_bias`` are given): each work item is one (batch, member) set whose G / M direction
    lanes add into the token rows they visit (``index`` holds their token row numbers), so no time-major y is
    written at all; returns (M, B, L, P). The caller checks :func:`kernel_applicable` and :func:`mixer_scan_applicable`.

    ``prepared``: the result of :func:`prepare_mixer_weights` for these parameters, kept by the caller (the parameter
    arguments are then read for their shapes only). ``check_index=False`` skips the bounds check of ``index`` (two
    reductions), for callers whose index was built for this x's shape.
    """
    groups, per_group, width = conv_weight.shape
    n_state, rank = A.shape[-1], dt_proj_weight.shape[-1]
    members, batch, tokens, _ = x.shape
    if index.dtype != torch.int64 or index.numel() % (batch * groups):
        raise ValueError(f"index must hold (L, {batch}, {groups}) int64 row numbers, got {index.numel()} {index.dtype}")
    if check_index and index.numel() and (int(index.min()) < 0 or int(index.max()) >= members * batch * tokens):
        raise ValueError("index refers to rows outside x")
    if x_proj_weight.shape != (groups, rank + 2 * n_state, per_group):
        raise ValueError(f"x projection weight {tuple(x_proj_weight.shape)}, expected {(groups, rank + 2 * n_state, per_group)}")
    length = index.numel() // (batch * groups)
    merge = z is not None
    if merge:
        if groups % members or z.shape != (members, batch, length, per_group) or length != tokens:
            raise ValueError(f"the merge needs z {(members, batch, tokens, per_group)} and G a multiple of M, got z {tuple(z.shape)}, G {groups}")
        if (norm_weight is None) != (norm_bias is None):
            raise ValueError("the output norm needs both its weight and its bias")
        if norm_weight is not None and per_group > max_norm_width():
            raise ValueError(f"rows of {per_group} channels: the merge normalises at most {max_norm_width()}")
    x, x_stride = _rows(x)
    src, src_stride = (None, 0) if source is None else _rows(source.to(torch.float32))
    f32 = dict(dtype=torch.float32)
    if prepared is None:
        prepared = prepare_mixer_weights(conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, norm_weight, norm_bias)
    elif (norm_weight is None) != (prepared.norm_weight is None):
        raise ValueError("the prepared weights and the arguments disagree on the output norm")
    taps, conv_bias, wxt, wdt, a_t, dt_bias, D = prepared[:7]
    padded = wxt.shape[-1]
    if padded % _load()["block"]:
        raise ValueError(f"prepared weights padded to {padded} columns, not a multiple of this kernel build's {_load()['block']}")
    index = index.contiguous()
    h = torch.zeros(batch * groups, n_state, per_group, **f32)
    if merge:
        out = torch.empty(members, batch, length, per_group, **f32)
        zr, z_stride = _rows(z.to(**f32))
        nw, nb = prepared.norm_weight, prepared.norm_bias
        merge_args = [groups // members, out.data_ptr(), zr.data_ptr(), z_stride, None if nw is None else nw.data_ptr(), None if nb is None else nb.data_ptr(), float(eps)]
        y, items = out, batch * members
    else:
        y = torch.empty(length, batch, groups, per_group, **f32)
        merge_args = [1, None, None, 0, None, None, 0.0]
        items = batch * groups
    if length:
        args = [
            length, batch, groups, per_group, n_state, rank, width, x.data_ptr(), x_stride, index.data_ptr(),
            taps.data_ptr(), conv_bias.data_ptr(), None if src is None else src.data_ptr(), src_stride, wxt.data_ptr(), padded,
            wdt.data_ptr(), dt_bias.data_ptr(), a_t.data_ptr(), None if D is None else D.data_ptr(), y.data_ptr(), h.data_ptr(),
            *merge_args,
        ]  # fmt: skip
        _run(_load()["lib"].mixer_scan_f32, args, items)
    return y


def gate_merge_kernel(
    y: torch.Tensor, index: torch.Tensor, z: torch.Tensor, norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None, eps: float = 1e-5,
) -> torch.Tensor:
    """:func:`gate_merge_reference` in one pass of the compiled kernel, output contiguous (M, B, L, P); the
    caller checks :func:`kernel_applicable`. ``z`` may be a column slice of a wider tensor (no copy). With
    ``norm_weight`` and ``norm_bias`` (M, P), each output row is then normalised as ``F.layer_norm`` over P with
    member m's affine, in the same pass (P up to :func:`max_norm_width`)."""
    compute = torch.promote_types(y.dtype, torch.float32)
    members, batch, length, width = z.shape
    y = y.to(compute).contiguous()
    directions = y.shape[2] // members
    if index.dtype != torch.int64 or index.numel() != length * batch * members * directions:
        raise ValueError(f"index must hold {length * batch * members * directions} int64 row numbers, got {index.numel()} {index.dtype}")
    if int(index.min()) < 0 or int(index.max()) >= y.numel() // width:
        raise ValueError("index refers to rows outside y")
    if (norm_weight is None) != (norm_bias is None):
        raise ValueError("the output norm needs both its weight and its bias")
    if norm_weight is not None:
        if width > max_norm_width():
            raise ValueError(f"rows of {width} channels: the merge normalises at most {max_norm_width()}")
        norm_weight = norm_weight.to(compute).reshape(members, width).contiguous()
        norm_bias = norm_bias.to(compute).reshape(members, width).contiguous()
    index = index.contiguous()
    z, z_stride = _rows(z.to(compute))
    out = torch.empty(members, batch, length, width, dtype=compute)
    if length:
        lib = _load()["lib"]
        fn = lib.gate_merge_f32 if compute == torch.float32 else lib.gate_merge_f64
        args = [
            length, batch, members, directions, width, y.data_ptr(), index.data_ptr(), z.data_ptr(), z_stride,
            None if norm_weight is None else norm_weight.data_ptr(), None if norm_bias is None else norm_bias.data_ptr(),
            float(eps), out.data_ptr(),
        ]  # fmt: skip
        _run(fn, args, length)
    return out


def max_norm_width() -> int:
    """Widest row the merge kernel normalises (0 without a kernel)."""
    return _load().get("pmax") or 0



def _scan_channels_first(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The kernel on mamba_ssm's (batch, dim, L) layout, no autograd (the self-check's entry); y in u's dtype."""
    n_state = A.shape[-1]
    batch, dim, length = u.shape
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    groups = B.shape[1]
    per_group = dim // groups

    def time_major(x):  # (batch, dim, L) -> (L, batch, G, P)
        return x.permute(2, 0, 1).reshape(length, batch, groups, per_group)

    args = (time_major(u), time_major(delta), A.reshape(groups, per_group, n_state), B.permute(3, 0, 1, 2), C.permute(3, 0, 1, 2))
    y = scan_time_major_kernel(*args, D, delta_bias, delta_softplus)[0].reshape(length, batch, dim).permute(1, 2, 0)
    return (y if z is None else y * F.silu(z.to(y.dtype))).to(u.dtype)
