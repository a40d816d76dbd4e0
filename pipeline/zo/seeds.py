"""Seeds as pure functions of (run seed, step, direction).

A ZO update is defined by the seeds that regenerate its directions, so every seed is derived by
hashing, never drawn from a global RNG: a resumed run, a replay and every rank compute the same
seeds without communicating. The mixing function is SplitMix64 (:mod:`pipeline.splitmix`).
"""

from __future__ import annotations

import hashlib

from pipeline.splitmix import mix, splitmix64

__all__ = ["mix", "name_key", "splitmix64", "step_seed"]


def step_seed(run_seed: int, step: int, direction: int = 0) -> int:
    """The seed of direction ``direction`` at training step ``step``."""
    return mix(run_seed, step, direction)


def name_key(name: str) -> int:
    """A stable integer for a parameter name (never ``id()`` or iteration order)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1
