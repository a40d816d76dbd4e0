"""Training order: a pure function of (run seed, step), so resume and replay need no state."""

from __future__ import annotations

import torch

from pipeline.splitmix import mix

_ORDER_STREAM = 0xDA7A


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the examples of ``step``: consecutive slices of per-epoch permutations."""
    out: list[int] = []
    pos = step * batch_size
    perm: list[int] | None = None
    epoch = -1
    while len(out) < batch_size:
        if pos // n != epoch:
            epoch = pos // n
            gen = torch.Generator().manual_seed(mix(seed, _ORDER_STREAM, epoch))
            perm = torch.randperm(n, generator=gen).tolist()
        take = min(batch_size - len(out), n - pos % n)
        out.extend(perm[pos % n : pos % n + take])
        pos += take
    return out
