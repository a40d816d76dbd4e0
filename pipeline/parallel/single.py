"""The single-process backend: every parameter is one whole shard.

Backend contract (DESIGN.md): ``shards()``, ``loss(batch)`` (fp32 scalar of this rank's batch),
``scores(batch)``, ``all_reduce_mean(tensor)`` (float64, deterministic), ``rank``, ``world_size``,
``barrier()``.
"""

from __future__ import annotations

import torch

from pipeline.models.objective import batch_loss, candidate_scores
from pipeline.zo.shards import ParamShard, decays


class SingleBackend:
    rank = 0
    world_size = 1

    def __init__(self, model, trainable, device, *, master: bool):
        self.model = model
        self.device = device
        self._shards = []
        for name, p in trainable:
            local = p.data.view(-1)
            fp32 = local.detach().to(torch.float32, copy=True) if master else None
            self._shards.append(
                ParamShard(name, tuple(p.shape), 0, local, master=fp32, decay=decays(name, p))
            )

    def shards(self) -> list[ParamShard]:
        return self._shards

    @torch.no_grad()
    def loss(self, batch) -> torch.Tensor:
        return batch_loss(self.model, batch.to(self.device)).cpu()

    @torch.no_grad()
    def scores(self, batch) -> torch.Tensor:
        return candidate_scores(self.model, batch.to(self.device)).cpu()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(torch.float64)

    def barrier(self) -> None:
        pass
