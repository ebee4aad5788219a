"""The process's kernel library: built, loaded, bound and self-checked once, on first use; never raises.

:func:`kernel_library` returns the :class:`~scripts.ssm.native.binding.KernelLibrary`, or None when anything failed
(no compiler, compiler error, time-out, failed self-check); the failure is logged once as a warning and the
``compiled`` backend then runs the ``fast`` PyTorch scan. The library is built with OpenMP on PyTorch's own runtime
where that works (:func:`scripts.ssm.native.build.share_torch_openmp`), else without.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

from . import build, selfcheck
from .binding import KernelLibrary, bind

__all__ = ["build_report", "compiled_scan_available", "compiled_scan_info", "separate_build", "kernel_library"]

_logger = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}  # filled once: library, seconds, compiler, flags, error


def _build_and_load(tmp: str) -> tuple[ctypes.CDLL, str, list[str], bool]:
    """Compile and load the library, with OpenMP on PyTorch's runtime when that works, else without."""
    if build.share_torch_openmp():
        before = build.loaded_openmp_runtimes()
        try:
            output = os.path.join(tmp, "scan_kernel_openmp.so")
            compiler, flags = build.compile_library(build.SOURCE, output, openmp=True)
            cdll = ctypes.CDLL(output)
            if build.loaded_openmp_runtimes() == before and cdll.scan_openmp() == 1:
                return cdll, compiler, flags, True
            _logger.info(
                "OpenMP build of the scan kernel loaded a second OpenMP runtime; using the build without OpenMP"
            )
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            _logger.info("OpenMP build of the scan kernel failed (%s); using the build without OpenMP", exc)
    output = os.path.join(tmp, "scan_kernel.so")
    compiler, flags = build.compile_library(build.SOURCE, output)
    return ctypes.CDLL(output), compiler, flags, False


def build_report() -> dict:
    """Build, bind and self-check the library once per process; the state: ``library`` (None after a failure),
    ``seconds``, ``compiler``, ``flags``, ``error``."""
    with _lock:
        if _state:
            return _state
        start = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix="clinicalfmamba_scan_")
        try:
            cdll, compiler, flags, openmp = _build_and_load(tmp)  # mapped into the process: the file can go
            library = bind(cdll, openmp)
            selfcheck.self_check(library)
            seconds = time.perf_counter() - start
            _state.update(library=library, compiler=compiler, flags=flags, seconds=seconds, error=None)
            _logger.info("compiled selective scan built in %.2f s (%s %s)", seconds, compiler, " ".join(flags))
        except Exception as exc:  # noqa: BLE001 - any failure means: use the fast path
            _state.clear()
            _state.update(library=None, error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - start)
            _logger.warning(
                "compiled selective scan unavailable, using the fast PyTorch scan instead (%s)", _state["error"]
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return _state


def kernel_library() -> KernelLibrary | None:
    """The process's kernel library (built on the first call), or None when it could not be built or checked."""
    return build_report()["library"]


@contextlib.contextmanager
def separate_build() -> Iterator[None]:
    """Inside the block the process has no library yet: the next call builds (or loads from the cache) and checks
    again, under the environment of that moment. The library of before comes back afterwards. For tests of the build
    itself (a process normally builds once)."""
    with _lock:
        saved = dict(_state)
        _state.clear()
    try:
        yield
    finally:
        with _lock:
            _state.clear()
            _state.update(saved)


def compiled_scan_available() -> bool:
    """Whether the kernel is built and loaded (builds it on first call; False after a failed build)."""
    return kernel_library() is not None


def compiled_scan_info() -> dict:
    """Build report: ``available``, ``seconds`` (first-call build + self-check), ``compiler``, ``flags``, ``openmp``
    (threads shared with PyTorch's OpenMP runtime), ``isa`` and ``simd_width`` (the vector instruction set the float32
    kernels use and their vectors' length in floats), ``error``."""
    state = build_report()
    library = state["library"]
    return {
        "available": library is not None,
        "seconds": state.get("seconds"),
        "compiler": state.get("compiler"),
        "flags": state.get("flags"),
        "openmp": library is not None and library.openmp,
        "isa": None if library is None else library.isa,
        "simd_width": None if library is None else library.block,
        "error": state.get("error"),
    }
