"""PyTorch FSDP2 backend: ``fully_shard`` per transformer block plus the root.

Each trainable parameter is a DTensor sharded along dim 0 (``Shard(0)``); this rank's shard is
its local tensor, rows ``[r*ceil(d0/ws), ...)`` of the parameter, i.e. the flat global range
starting at ``row0 * prod(shape[1:])``. A perturbed forward writes each unit's perturbed shard
into FSDP2's all-gather input (:mod:`pipeline.parallel.fsdp_delivery`), so the stored shards are
never written while measuring and no memory is added; updates go into the local tensors. The
root module stays unsharded after a ``no_grad`` forward, so every forward ends with
``reshard()``: no gathered copy survives into the next forward.

Mixed precision: storage is the configured dtype; FSDP2's ``MixedPrecisionPolicy`` is not used
(the forward runs in the storage dtype, as inference does).
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import fully_shard

from pipeline.models.objective import batch_loss, candidate_scores
from pipeline.models.tuning import load_tuned_model, tuned_names
from pipeline.parallel import make_shard, wants_master
from pipeline.parallel.distributed import DistributedBackend, init_process_group
from pipeline.parallel.fsdp_delivery import FSDPDelivery


def _blocks(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks (``model.model.layers`` for Llama/Qwen/OPT-style LMs)."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return list(module)
    raise ValueError(f"{type(model).__name__}: found no ModuleList of transformer blocks")


class FSDPBackend(DistributedBackend):
    def __init__(self, model, names: list[str], device, *, master: bool):
        super().__init__(device)
        for block in _blocks(model):
            fully_shard(block, reshard_after_forward=True)
        fully_shard(model, reshard_after_forward=True)
        self.model = model
        params = dict(model.named_parameters())
        self._shards = []
        for name in names:
            p = params[name]
            local = p.to_local() if hasattr(p, "to_local") else p.data
            rows = -(-p.shape[0] // self.world_size)
            start = min(self.rank * rows, p.shape[0]) * (p.numel() // max(p.shape[0], 1))
            self._shards.append(
                make_shard(name, p.shape, start, local.view(-1), master=master)
            )
        self._delivery = FSDPDelivery(model, self._shards, self.world_size)

    @classmethod
    def from_config(cls, cfg) -> FSDPBackend:
        device = init_process_group(cfg.model.device)
        model = load_tuned_model(cfg, device)
        names = tuned_names(model, cfg)
        return cls(model, names, device, master=wants_master(cfg))

    def shards(self):
        return self._shards

    def _forward(self, fn, batch, at=None) -> torch.Tensor:
        try:
            with torch.no_grad(), self._delivery.applying(at):
                out = fn(self.model, batch.to(self.device))
        finally:
            self.model.reshard()
        return out.cpu()

    def loss(self, batch, at=None) -> torch.Tensor:
        """This rank's batch loss (fp32) at the stored weights, or perturbed by ``at``."""
        return self._forward(batch_loss, batch, at)

    def scores(self, batch) -> torch.Tensor:
        return self._forward(candidate_scores, batch)

