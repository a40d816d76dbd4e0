"""Give the C heap's free memory back to the operating system after a large transient phase.

glibc keeps memory freed by many mid-sized allocations mapped in its heap, so after a phase that
allocates and frees a lot at once (ZO-Act's calibration rows, P-GAP's refresh) the process's
resident set stays at the phase's peak for the rest of the run although nothing uses it.
``malloc_trim(0)`` returns those pages. Elsewhere than glibc (or if it is missing) this does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """``malloc_trim(0)`` where the C library has it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
