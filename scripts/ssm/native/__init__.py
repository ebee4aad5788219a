"""The compiled CPU kernels of the ``compiled`` scan backend: C sources built on first use by the system compiler.

Modules, each with one job:

- ``scan_kernel.h`` / ``scan_kernel.c`` / ``scan_scalar.h``: the kernels; the header states each kernel's parameter
  struct and contract, the scalar template is the float64 path;
- :mod:`~scripts.ssm.native.build`: compiler discovery, flags, the per-user cache, the compile time-out, OpenMP;
- :mod:`~scripts.ssm.native.binding`: the ctypes Structures matching the C structs, the entry points' signatures;
- :mod:`~scripts.ssm.native.threads`: splitting a call's work items over threads;
- :mod:`~scripts.ssm.native.ops`: the Python entry points (scan forward and backward, causal conv + SiLU, fused mixer
  scan, gated merge), each taking the library explicitly;
- :mod:`~scripts.ssm.native.selfcheck`: every kernel against the float64 references, before a library is used;
- :mod:`~scripts.ssm.native.loader`: the process's library, built, checked and loaded once; None after a failure.

:mod:`scripts.ssm.compiled_backend` registers them as the ``compiled`` backend; the networks reach them only through
:mod:`scripts.ssm`'s public entry points.
"""

from .binding import KernelLibrary
from .loader import compiled_scan_available, compiled_scan_info, kernel_library

__all__ = ["KernelLibrary", "compiled_scan_available", "compiled_scan_info", "kernel_library"]
