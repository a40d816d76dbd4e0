"""The C heap helpers: a pinned mmap threshold serves large allocations from their own mappings,
which leave the resident set when freed (glibc; elsewhere the helpers do nothing)."""

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

GLIBC = ctypes.util.find_library("c") is not None and hasattr(
    ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2")

# mapped bytes (mallinfo2's hblkhd) around a 1 MiB tensor, after glibc has raised its dynamic
# threshold by freeing an 8 MiB mapped block: without a pinned threshold the tensor comes from
# the heap, with it from a mapping of its own
PROBE = """
import ctypes, sys, torch
from pipeline.heap import pin_mmap_threshold

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
big = torch.empty(8 << 20, dtype=torch.uint8); del big
pinned = sys.argv[1] == "pin" and pin_mmap_threshold()
before = libc.mallinfo2().hblkhd
t = torch.empty(1 << 20, dtype=torch.uint8)
during = libc.mallinfo2().hblkhd
del t
after = libc.mallinfo2().hblkhd
print(int(pinned), during - before, after - before)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt/mallinfo2")
def test_pinned_threshold_maps_large_tensors_and_returns_them_on_free():
    def probe(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return [int(v) for v in out.stdout.split()]

    pinned, grew, left = probe("pin")
    assert pinned == 1 and grew >= 1 << 20 and left == 0
    pinned, grew, left = probe("default")
    assert pinned == 0 and grew == 0  # served from the heap: stays resident when freed
