"""The C heap helpers: a pinned mmap threshold serves large allocations from their own mappings,
which leave the resident set when freed (glibc; elsewhere the helpers do nothing)."""

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

GLIBC = ctypes.util.find_library("c") is not None and hasattr(
    ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2")

# glibc's mallinfo2 in a probe process: hblkhd is the bytes in blocks with a mapping of their own
MALLINFO = """
import ctypes, sys, torch

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
"""

# mapped bytes (mallinfo2's hblkhd) around a tensor of 1.5x the pinned threshold, after glibc
# has raised its dynamic threshold by freeing a mapped block of 3x it (glibc raises it up to 32
# MiB): without a pinned threshold the tensor comes from the heap, with it from a mapping of its
# own; a tensor of half the threshold stays in the heap either way (what keeps a step's weight
# pieces from being faulted in afresh every forward)
PROBE = MALLINFO + """
from pipeline.heap import MMAP_THRESHOLD, pin_mmap_threshold
assert 3 * MMAP_THRESHOLD <= 32 << 20
big = torch.empty(3 * MMAP_THRESHOLD, dtype=torch.uint8); del big
pinned = sys.argv[1] == "pin" and pin_mmap_threshold()
before = libc.mallinfo2().hblkhd
t = torch.empty(3 * MMAP_THRESHOLD // 2, dtype=torch.uint8)
during = libc.mallinfo2().hblkhd
del t
after = libc.mallinfo2().hblkhd
small = torch.empty(MMAP_THRESHOLD // 2, dtype=torch.uint8)
print(int(pinned), during - before, after - before, libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt/mallinfo2")
def test_pinned_threshold_maps_large_tensors_and_returns_them_on_free():
    def probe(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return [int(v) for v in out.stdout.split()]

    from pipeline.heap import MMAP_THRESHOLD

    pinned, grew, left, small = probe("pin")
    assert pinned == 1 and grew >= 3 * MMAP_THRESHOLD // 2 and left == 0 and small == 0
    pinned, grew, left, small = probe("default")
    assert pinned == 0 and grew == 0 and small == 0  # from the heap: stays resident when freed


# inside mapped_above a tensor of 1 MiB (between the fine and the pinned threshold) gets its own
# mapping; outside it, with the pinned threshold back, the same tensor comes from the heap
PHASE = MALLINFO + """
from pipeline.heap import mapped_above, pin_mmap_threshold

def mapped(n):
    before = libc.mallinfo2().hblkhd
    t = torch.empty(n, dtype=torch.uint8)
    return libc.mallinfo2().hblkhd - before

assert pin_mmap_threshold()
with mapped_above():
    inside = mapped(1 << 20)
print(inside, mapped(1 << 20))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt/mallinfo2")
def test_mapped_above_lowers_the_threshold_for_a_phase_only():
    out = subprocess.run([sys.executable, "-c", PHASE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    inside, outside = (int(v) for v in out.stdout.split())
    assert inside >= 1 << 20 and outside == 0
