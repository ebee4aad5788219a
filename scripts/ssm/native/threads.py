"""Splitting a kernel call's work items over ``torch.get_num_threads()`` threads.

A library built with OpenMP splits the items itself, on PyTorch's own OpenMP threads (one call). Otherwise the
items are cut into equal ranges, one per thread, run on a small Python thread pool plus the calling thread (ctypes
releases the GIL during the call). Work items never write the same output element, so the split does not change
the result.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import threading

import torch

__all__ = ["run_items", "thread_count"]

_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_size = 0


def _forget_pool() -> None:  # a forked child has the pool object but not its threads
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def thread_count(items: int) -> int:
    """Threads a call of ``items`` work items uses: ``torch.get_num_threads()``, at most one per item."""
    return max(1, min(torch.get_num_threads(), items))


def run_items(fn, params: ctypes.Structure, items: int, openmp: bool) -> None:
    """Call the entry point ``fn(&params, lo, hi, nthreads)`` on work items 0..items-1, split over
    :func:`thread_count` threads: by the library itself when it is built with OpenMP (``openmp``), else here."""
    global _pool, _pool_size
    threads = thread_count(items)
    ref = ctypes.byref(params)
    if threads == 1 or openmp:
        fn(ref, 0, items, threads)
        return
    with _lock:
        if _pool is None or _pool_size != threads - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = concurrent.futures.ThreadPoolExecutor(threads - 1, thread_name_prefix="clinicalfmamba_scan")
            _pool_size = threads - 1
        pool = _pool
    bounds = [items * i // threads for i in range(threads + 1)]
    futures = [pool.submit(fn, ref, bounds[i], bounds[i + 1], 1) for i in range(1, threads)]
    fn(ref, bounds[0], bounds[1], 1)
    for future in futures:
        future.result()
