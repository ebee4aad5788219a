"""``tune_allocator`` on glibc: it reports success and large allocations really move from mmap to the heap."""

import platform
import subprocess
import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]

# in a fresh process: where does glibc put a 64 MiB block, before and after tune_allocator()?
PROBE = """
import ctypes, json
from scripts.cpu_tuning import tune_allocator

libc = ctypes.CDLL("libc.so.6")
names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in names]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def placement():
    block = libc.malloc(64 << 20)
    info = libc.mallinfo2()
    libc.free(block)
    return {"mmapped": info.hblkhd, "heap": info.arena}

before = placement()
applied = tune_allocator()
print(json.dumps({"before": before, "applied": applied, "after": placement(), "again": tune_allocator()}))
"""


def test_tune_allocator_moves_large_blocks_to_the_heap_on_glibc():
    import json

    glibc = platform.libc_ver()[0] == "glibc"
    if not glibc:  # macOS, Windows, musl: a documented no-op that says so
        from scripts.cpu_tuning import tune_allocator

        assert tune_allocator() is False
        return
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=BUNDLE_ROOT, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["applied"] is True and result["again"] is True
    assert result["before"]["mmapped"] >= 64 << 20  # glibc's default: a block this large gets its own mapping
    assert result["after"]["mmapped"] < 64 << 20 and result["after"]["heap"] >= 64 << 20  # now served by the heap
