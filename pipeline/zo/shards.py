"""ParamShard: the part of one trainable parameter that a rank may touch.

Methods work only on ParamShards (plus small replicated tensors); they never gather a parameter.
The single-process backend hands out whole parameters (``start = 0``); the sharded backends hand
out each rank's flat slice with its global offset, so noise keyed by global element index is the
same at any world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.zo.seeds import name_key


@dataclass
class ParamShard:
    name: str
    shape: tuple[int, ...]
    start: int
    local: torch.Tensor
    master: torch.Tensor | None = None
    decay: bool = True
    noise: str = "gaussian"  # method.noise: the distribution of this shard's dense directions
    cache: Any = None  # method.cache_noise: a NoiseCache shared by the method's shards, or None

    def __post_init__(self) -> None:
        if self.local.dim() != 1:
            raise ValueError(f"{self.name}: ParamShard.local must be a 1-D view")
        self.key = name_key(self.name)

    @property
    def total(self) -> int:
        """Global element count of the parameter."""
        return math.prod(self.shape)

    @property
    def numel(self) -> int:
        return self.local.numel()

    @property
    def weights(self) -> torch.Tensor:
        """The tensor updates go to: the fp32 master when there is one, else the stored weights."""
        return self.master if self.master is not None else self.local


def decays(name: str, ndim: int) -> bool:
    """Weight decay skips biases and normalisation weights (MeZO, following HF Trainer)."""
    lowered = name.lower()
    return ndim >= 2 and "norm" not in lowered and not lowered.endswith("bias")
