"""Process-level CPU settings that matter for this network's many large temporaries.

glibc serves allocations above its mmap threshold (128 KiB, growing to at most 32 MiB) with fresh
``mmap`` pages and returns them on free, so every large temporary tensor pays page faults on first
touch. The Mamba mixers create many 2-8 MB temporaries per call; keeping them in the heap
(``mallopt``) makes CPU inference and training markedly faster (see docs/performance.md). This is
the same effect people get from running PyTorch under jemalloc or tcmalloc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["tune_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds so large tensors reuse heap memory.

    Returns True when applied (glibc found), False elsewhere (macOS, Windows, musl): a no-op there.
    Safe to call more than once.
    """
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, threshold_bytes)
        )
    except (OSError, AttributeError):
        return False
    _done = ok
    if ok:
        logging.getLogger(__name__).info("glibc malloc: mmap/trim thresholds raised to %d MiB", threshold_bytes >> 20)
    return ok
