"""Seeds as pure functions of (run seed, step, direction).

A ZO update is defined by the seeds that regenerate its directions, so every seed is derived by
hashing, never drawn from a global RNG: a resumed run, a replay and every rank compute the same
seeds without communicating. SplitMix64 is the mixing function (Steele et al., 2014).
"""

from __future__ import annotations

import hashlib

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One SplitMix64 output for state ``x`` (64-bit arithmetic)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix(*parts: int) -> int:
    """Hash a tuple of non-negative integers into a 63-bit seed (fits ``torch.Generator``)."""
    h = 0
    for p in parts:
        h = splitmix64(h ^ (p & _MASK64))
    return h >> 1


def step_seed(run_seed: int, step: int, direction: int = 0) -> int:
    """The seed of direction ``direction`` at training step ``step``."""
    return mix(run_seed, step, direction)


def name_key(name: str) -> int:
    """A stable integer for a parameter name (never ``id()`` or iteration order)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1
