"""Keep the C heap from holding freed memory: the resident set of a CPU run is what it uses.

glibc keeps memory freed by many mid-sized allocations mapped in its heap, so after a phase that
allocates and frees a lot at once (ZO-Act's calibration rows, P-GAP's refresh) the process's
resident set stays at the phase's peak for the rest of the run although nothing uses it.

- :func:`release_free_memory`: ``malloc_trim(0)`` returns those pages after such a phase.
- :func:`pin_mmap_threshold`: from then on every allocation of at least ``MMAP_THRESHOLD`` bytes
  gets its own mapping, returned to the system when freed. glibc starts at 128 KiB and raises
  its threshold to the size of each freed mapped block (up to 32 MiB), after which a step's
  large transients come from the heap and what they free stays resident. 8 MiB is above the
  largest transient a perturbed forward makes per module (weight pieces are at most 4 MiB,
  :mod:`pipeline.parallel.piecewise`), so those are reused from the heap rather than faulted in
  afresh each forward, which a 256 KiB threshold cost every step. Pinned after loading: the
  load's allocations would pay the same faults.
- :func:`mapped_above`: a lower threshold for one phase whose many mid-sized transients would
  grow the heap (P-GAP's refresh).

The figures (page faults and system time per step, P-GAP's peak against inference at each
threshold) and their commands are in the README, "Training memory against inference".

Elsewhere than glibc (or if a function is missing) these do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
MMAP_THRESHOLD = 8 * 1024 * 1024
FINE_THRESHOLD = 256 * 1024  # what :func:`mapped_above` is for: a phase of many large transients

_pinned: int | None = None  # the threshold pin_mmap_threshold set in this process


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
    global _pinned
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    release_free_memory()
    if not mallopt(M_MMAP_THRESHOLD, nbytes):
        return False
    _pinned = nbytes
    return True


@contextlib.contextmanager
def mapped_above(nbytes: int = FINE_THRESHOLD) -> Iterator[None]:
    """Within the block, allocations of ``nbytes`` or more get their own mapping; after it the
    pinned threshold is back and the heap's free pages are returned. For a phase whose many
    mid-sized transients would otherwise grow the heap (P-GAP's refresh). In a process that has
    not pinned a threshold (GPU runs, other C libraries) it only returns the free pages after."""
    pinned = _pinned
    if pinned is not None:
        _libc().mallopt(M_MMAP_THRESHOLD, nbytes)
    try:
        yield
    finally:
        if pinned is not None:
            _libc().mallopt(M_MMAP_THRESHOLD, pinned)
        release_free_memory()
