"""Keep the C heap from holding freed memory: the resident set of a CPU run is what it uses.

glibc keeps memory freed by many mid-sized allocations mapped in its heap, so after a phase that
allocates and frees a lot at once (ZO-Act's calibration rows, P-GAP's refresh) the process's
resident set stays at the phase's peak for the rest of the run although nothing uses it.

- :func:`release_free_memory`: ``malloc_trim(0)`` returns those pages after such a phase.
- :func:`pin_mmap_threshold`: from then on every allocation of at least ``MMAP_THRESHOLD`` bytes
  (tensors, not Python objects) gets its own mapping, returned to the system when freed. glibc
  starts at 128 KiB and raises its threshold to the size of each freed mapped block (up to 32
  MiB), after which a step's transients (perturbed weight copies, noise blocks, activations)
  come from the heap and what they free stays resident. Measured on P-GAP (rank 16, fp16, every
  step a refresh: 20 probe forwards and a fit): the training peak fell from 926 to 824 MiB
  against an inference peak of 805-816 MiB (README, "Training memory against inference"). The
  step time it costs (``bench/pinned_heap.py``, MeZO fp32) measured 0.97x and 1.08x in two runs
  on a loaded machine; pinned from the process start (``MALLOC_MMAP_THRESHOLD_``) the load's
  allocations cost 4 s more system time, so it is pinned after loading.

Elsewhere than glibc (or if a function is missing) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
MMAP_THRESHOLD = 256 * 1024


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_free_memory() -> None:
    """``malloc_trim(0)`` where the C library has it."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of ``nbytes`` or more from its own mapping, for the rest of the
    process (glibc's ``mallopt(M_MMAP_THRESHOLD)``, which also stops the dynamic raise); first
    returns what the heap holds free. True where it took effect."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    release_free_memory()
    return bool(mallopt(M_MMAP_THRESHOLD, nbytes))
