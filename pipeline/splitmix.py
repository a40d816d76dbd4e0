"""SplitMix64 (Steele et al., 2014): the one integer hash every seed and every data order here is
derived from, so a resumed run, a replay and every rank compute them without communicating.

:mod:`pipeline.zo.seeds` builds step and direction seeds on it; :mod:`pipeline.data.sampling` the
training order. It sits below both so that neither imports the other for it.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One SplitMix64 output for state ``x`` (64-bit arithmetic)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def mix(*parts: int) -> int:
    """Hash a tuple of non-negative integers into a 63-bit seed (fits ``torch.Generator``)."""
    h = 0
    for p in parts:
        h = splitmix64(h ^ (p & MASK64))
    return h >> 1
