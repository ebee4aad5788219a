"""Building the kernel library: compiler discovery, flags, the per-user cache, the compile time-out and the OpenMP
choice.

The system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) compiles ``scan_kernel.c`` (with its headers) into
a shared library, about 3 s with GCC. The library is kept in a per-user cache (:func:`kernel_cache_dir`), keyed by
the sources, the compiler, the OpenMP choice, the ``-march`` target and this CPU, so later processes skip the
compiler. Nothing here loads or checks the library (:mod:`scripts.ssm.native.loader` does).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

__all__ = [
    "ARCH_ENV_VAR",
    "CACHE_ENV_VAR",
    "COMPILE_TIMEOUT",
    "OPENMP_ENV_VAR",
    "SOURCE",
    "SOURCES",
    "TIMEOUT_ENV_VAR",
    "cache_key",
    "compile_library",
    "find_compiler",
    "kernel_arch",
    "kernel_cache_dir",
    "libgomp_so1_runtimes",
    "loaded_openmp_runtimes",
    "share_torch_openmp",
]

#: environment variable: seconds the C compiler may take before the build is abandoned (default 60)
TIMEOUT_ENV_VAR = "CLINICALFMAMBA_COMPILE_TIMEOUT"
#: seconds the C compiler may take before the build is abandoned (then the ``fast`` path is used)
COMPILE_TIMEOUT = float(os.environ.get(TIMEOUT_ENV_VAR, "60"))
#: environment variable naming the target the kernels are built for (GCC/Clang ``-march``): ``native`` (default),
#: or for example ``x86-64-v3`` (AVX2 + FMA, no AVX-512) or ``x86-64`` (SSE2) to build and test the portable paths
ARCH_ENV_VAR = "CLINICALFMAMBA_KERNEL_ARCH"
#: environment variable: the kernel cache folder; ``0`` or empty turns the cache off
CACHE_ENV_VAR = "CLINICALFMAMBA_KERNEL_CACHE"
#: environment variable: ``0`` builds without OpenMP (the work is then split over a Python thread pool)
OPENMP_ENV_VAR = "CLINICALFMAMBA_SCAN_OPENMP"
#: the C source compiled into the library
SOURCE = Path(__file__).with_name("scan_kernel.c")
#: every file the library is built from (the cache key hashes them all)
SOURCES = (SOURCE, SOURCE.with_name("scan_kernel.h"), SOURCE.with_name("scan_scalar.h"))

_logger = logging.getLogger(__name__)


def find_compiler() -> str | None:
    """Full path of the C compiler to use: ``$CC``, else ``cc``, ``gcc`` or ``clang``; None when there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def loaded_openmp_runtimes() -> set[str]:
    """Files of the GNU OpenMP runtime (libgomp) mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            return {
                os.path.realpath(line.split(None, 5)[5].strip()) for line in maps if "libgomp" in line and "/" in line
            }
    except (OSError, IndexError):
        return set()


def libgomp_so1_runtimes() -> list[str]:
    """The loaded runtimes named ``libgomp.so*``: the one a library linked with ``-fopenmp`` binds to (other
    packages' renamed copies, such as scikit-learn's ``libgomp-<hash>.so``, are left out)."""
    return [p for p in loaded_openmp_runtimes() if os.path.basename(p).startswith("libgomp.so")]


def share_torch_openmp() -> bool:
    """Whether to build the kernel with OpenMP on PyTorch's own runtime.

    PyTorch's intra-op threads (GNU OpenMP on Linux builds) keep spinning for a while after each operator; a kernel
    that splits its work over threads of its own then competes with them for the cores. A library built with
    ``-fopenmp`` names ``libgomp.so.1``, which the dynamic loader resolves to the runtime PyTorch already loaded, so
    the kernel runs on the same, already awake threads. Off when PyTorch's parallel backend is not OpenMP, when no
    runtime named ``libgomp.so.1`` is loaded (other packages' renamed copies do not count), or with
    ``CLINICALFMAMBA_SCAN_OPENMP=0``.
    """
    if os.environ.get(OPENMP_ENV_VAR, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    return len(libgomp_so1_runtimes()) == 1


def kernel_cache_dir() -> Path | None:
    """Where built kernel libraries are kept between processes: ``$CLINICALFMAMBA_KERNEL_CACHE``, else
    ``$XDG_CACHE_HOME/clinicalfmamba`` (``~/.cache/clinicalfmamba``); None when that variable is ``0`` or empty."""
    configured = os.environ.get(CACHE_ENV_VAR)
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


def cache_key(sources: Path | tuple[Path, ...], compiler: str, openmp: bool, arch: str = "native") -> str:
    """Hash of everything the library depends on: the sources, the compiler binary, the OpenMP choice, the ``-march``
    target and this CPU's model and instruction-set flags (``-march=native``: never load one built elsewhere)."""
    digest = hashlib.sha256()
    for source in (sources,) if isinstance(sources, Path) else sources:
        digest.update(source.read_bytes())
    stat = os.stat(compiler)
    machine = f"{sys.platform}|{platform.machine()}"
    digest.update(f"{compiler}|{stat.st_size}|{stat.st_mtime_ns}|{openmp}|{arch}|{machine}".encode())
    try:
        with open("/proc/cpuinfo") as info:
            digest.update("".join(sorted({line for line in info if line.startswith(("model name", "flags"))})).encode())
    except OSError:
        digest.update(platform.processor().encode())
    return digest.hexdigest()[:32]


def compile_library(source: Path, output: str, openmp: bool = False) -> tuple[str, list[str]]:
    """Compile ``source`` into the shared library ``output`` (or copy it from the kernel cache, where an identical
    build for this CPU is kept: :func:`kernel_cache_dir`); returns (compiler, flags). Raises on failure (no compiler,
    compiler error, :data:`COMPILE_TIMEOUT` passed: ``subprocess.TimeoutExpired``)."""
    if sys.platform == "win32":
        raise RuntimeError("the compiled scan is built with a Unix C compiler; not supported on Windows")
    compiler = find_compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
    arch = kernel_arch()
    cache = kernel_cache_dir()
    sources = SOURCES if source == SOURCE else (source,)
    cached = None if cache is None else cache / f"scan_kernel_{cache_key(sources, compiler, openmp, arch)}"
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
        command = [compiler, *flags, str(source), "-o", output, "-lm"]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
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
        writers = (
            (".so", lambda f: shutil.copyfile(library, f)),
            (".json", lambda f: Path(f).write_text(json.dumps({"flags": flags}))),
        )
        for suffix, write in writers:
            fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=suffix)
            os.close(fd)
            write(tmp)
            os.replace(tmp, cached.with_suffix(suffix))
    except OSError as exc:
        _logger.info("kernel cache %s not written (%s)", cached.parent, exc)
