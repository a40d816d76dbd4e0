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

Loading is sharded (:mod:`pipeline.models.sharded_load`): the model is built and sharded on the
meta device, then each rank allocates its shards and reads only their rows from the checkpoint.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import fully_shard

from pipeline.models.tuning import tuned_names
from pipeline.parallel import make_shard, wants_master
from pipeline.parallel.distributed import DistributedBackend, init_process_group
from pipeline.parallel.fsdp_delivery import FSDPDelivery
from pipeline.parallel.fused import FusedEvaluation


def _blocks(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks (``model.model.layers`` for Llama/Qwen/OPT-style LMs)."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return list(module)
    raise ValueError(f"{type(model).__name__}: found no ModuleList of transformer blocks")


def _row_range(shape, rank: int, world: int) -> tuple[int, int]:
    """``(first row, rows)`` of this rank's ``Shard(0)`` chunk: ``ceil(d0 / world)`` rows each."""
    per = -(-shape[0] // world)
    first = min(rank * per, shape[0])
    return first, min(per, shape[0] - first)


def _load_local_shards(backend: FSDPBackend, checkpoint) -> None:
    """Allocate the meta-sharded model's local shards on the device and read their rows.

    ``to_empty`` gives every FSDP2 parameter its (padded) local storage, ties kept; each local
    shard is then the flat element range ``[first row * row size, ...)`` of its checkpoint
    tensor. Buffers and LoRA adapters come from the checkpoint's held values. The ParamShards that
    ``__init__`` built over the meta tensors are pointed at the real local tensors (and their fp32
    masters, if any, copied from them), so they keep their identity for everything holding them.
    """
    from torch.distributed.tensor import DTensor, Shard

    model, rank, world = backend.model, backend.rank, backend.world_size
    model.to_empty(device=backend.device)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),):
            raise RuntimeError(f"{name}: not sharded by FSDP2 along dim 0")
        local = p.to_local()
        first, rows = _row_range(p.shape, rank, world)
        if local.shape[0] != rows:
            raise RuntimeError(f"{name}: FSDP2 holds {local.shape[0]} rows on rank {rank}, not "
                               f"the {rows} of a Shard(0) chunk")
        checkpoint.read(name, p.shape, first * (p.numel() // p.shape[0]), local.view(-1))
    for name, b in model.named_buffers():
        checkpoint.read(name, b.shape, 0, b.view(-1))
    for shard in backend.shards():
        shard.local = params[shard.name].to_local().view(-1)
        if shard.master is not None:
            shard.master = shard.local.detach().to(torch.float32, copy=True)


class FSDPBackend(DistributedBackend):
    def __init__(self, model, names: list[str], device, *, master: bool, fused: bool = False):
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
        # fp32 masters live only on their owning rank: a gathered weight cannot be perturbed
        # from them, so those runs evaluate sequentially
        self._fused = FusedEvaluation(model, self._shards, params) \
            if fused and not master else None

    @classmethod
    def from_config(cls, cfg) -> FSDPBackend:
        from pipeline.models.sharded_load import skeleton

        device = init_process_group(cfg.model.device)
        model, checkpoint = skeleton(cfg)
        names = tuned_names(model, cfg)
        backend = cls(model, names, device, master=wants_master(cfg),
                      fused=cfg.train.fused_evaluations)
        _load_local_shards(backend, checkpoint)
        return backend

    def shards(self):
        return self._shards

    def _release(self) -> None:
        self.model.reshard()

