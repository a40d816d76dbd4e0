"""``method.cache_noise``: keep a step's noise in memory so each direction is generated once.

Without the cache a MeZO step generates ``z`` three times (perturb, flip, restore+update), each a
fused pass over the weights. With it the first pass stores this rank's ``z`` (fp32, 4 bytes per
trainable element and direction) and the others only read it; the arithmetic is the same fp32
operations, so the weights are bitwise those of an uncached run. The cache holds the directions
of one step; a new seed evicts the oldest. :func:`plan` enables it only when it fits.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import psutil
import torch

from pipeline.zo import noise


class NoiseCache:
    def __init__(self, directions: int):
        self.directions = max(1, directions)
        self._seeds: OrderedDict[int, dict[tuple[str, int], torch.Tensor]] = OrderedDict()
        self.generated = 0  # shard generations, for tests and benchmarks

    def get(self, seed: int, shard) -> torch.Tensor:
        """This shard's ``z`` of ``seed`` (do not modify it)."""
        entry = self._seeds.get(seed)
        if entry is None:
            while len(self._seeds) >= self.directions:
                self._seeds.popitem(last=False)
            entry = self._seeds[seed] = {}
        slot = (shard.name, shard.start)
        if slot not in entry:
            entry[slot] = noise.noise(seed, shard.key, shard.start, shard.numel, shard.total,
                                      kind=shard.noise, device=shard.local.device)
            self.generated += 1
        return entry[slot]

    def clear(self) -> None:
        self._seeds.clear()


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def plan(shards, directions: int) -> NoiseCache | None:
    """A cache for ``directions`` per step if it fits in half the free memory, else None."""
    if not shards:
        return None
    need = 4 * directions * sum(s.numel for s in shards)
    free = available_bytes(shards[0].local.device)
    if need > free // 2:
        warnings.warn(f"method.cache_noise: the step's noise needs {need / 2**30:.2f} GiB, "
                      f"{free / 2**30:.2f} GiB free; generating it on the fly instead",
                      stacklevel=2)
        return None
    return NoiseCache(directions)
