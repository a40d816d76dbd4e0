"""Perturbation inside FSDP2's all-gather: the perturbed shard is what gets gathered.

FSDP2 unshards a unit by copying each parameter's local shard into one flat all-gather input
(``foreach_all_gather``), then all-gathering it. Through the public
``FSDPModule.set_custom_all_gather`` every unit here runs :class:`PerturbingAllGather`, which,
while a perturbed forward is in progress, overwrites this rank's segment of each trainable
parameter in that input with its perturbed values
(:meth:`pipeline.zo.perturbation.Perturbation.write`) and then all-gathers as FSDP2's default
does. So:

- the stored shards are never written (the all-gather input is FSDP2's own transient buffer):
  the restore is exact in every dtype, and no memory is added;
- whenever FSDP2 gathers a unit (in its pre-forward, or earlier when prefetching), the gathered
  weights carry the perturbation; nothing depends on the order of hooks;
- on CUDA the writes run on FSDP2's all-gather stream, after its copy-in and before the
  collective, so no extra synchronisation is needed.

At world size 1 FSDP2 skips the collective and copies the shard into the unsharded parameter
itself, so there a forward pre-hook (after FSDP2's, which unsharded the unit) writes the perturbed
values into that unsharded copy, which is freed at the unit's reshard.

The segments follow FSDP2's layout of the input: its parameters in order, each
``prod(padded_sharded_param_size)`` elements, this rank's elements first (rows of ``Shard(0)``).
This reads ``FSDPModule._get_fsdp_state()._fsdp_param_groups`` (FSDP2's parameter groups), and
checks the layout against the input it is given.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

from pipeline.parallel.delivery import Delivery
from pipeline.zo.shards import ParamShard


def _groups(module: FSDPModule):
    return list(module._get_fsdp_state()._fsdp_param_groups)


def _unsharded_hook(delivery, fsdp_params, _module, _args) -> None:
    delivery._into_unsharded(fsdp_params)


class PerturbingAllGather(DefaultAllGather):
    """FSDP2's default all-gather, with this rank's trainable segments perturbed first."""

    def __init__(self, delivery: Delivery, segments: list[tuple[int, int, ParamShard | None]],
                 numel: int, refused: str | None = None):
        self.delivery = delivery
        self.refused = refused  # why this unit cannot be perturbed in its all-gather input
        self.segments = segments  # (offset in the input, padded size, shard or None)
        self.numel = numel

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        if self.delivery.active is not None:
            if self.refused:
                raise ValueError(self.refused)
            if input_tensor.numel() != self.numel:
                raise RuntimeError(
                    f"FSDP2's all-gather input has {input_tensor.numel()} elements, the layout "
                    f"of its unit {self.numel}: this torch version lays it out differently"
                )
            for offset, _, shard in self.segments:
                if shard is not None and shard.numel:
                    self.delivery.write(shard, input_tensor[offset : offset + shard.numel])
        return super().__call__(output_tensor, input_tensor, group, async_op)


class FSDPDelivery(Delivery):
    def __init__(self, model: torch.nn.Module, shards: list[ParamShard], world_size: int):
        super().__init__(shards)
        by_param = {}
        params = dict(model.named_parameters())
        for shard in shards:
            by_param[id(params[shard.name])] = shard
        for module in model.modules():
            if not isinstance(module, FSDPModule):
                continue
            for group in _groups(module):
                fsdp_params = [(fp, by_param.get(id(fp.sharded_param)))
                               for fp in group.fsdp_params]
                if not any(shard for _, shard in fsdp_params):
                    continue
                if world_size == 1:
                    module.register_forward_pre_hook(partial(_unsharded_hook, self,
                                                             fsdp_params))
                    continue
                segments, offset = [], 0
                for fp, shard in fsdp_params:
                    size = math.prod(fp.padded_sharded_param_size)
                    segments.append((offset, size, shard))
                    offset += size
                dtypes = {fp.sharded_param.dtype for fp, _ in fsdp_params}
                # a unit mixing dtypes (a bf16 base with fp32 LoRA adapters) all-gathers raw
                # bytes: it loads and evaluates, but a perturbed forward through it is refused
                refused = None if len(dtypes) == 1 else (
                    f"an FSDP unit mixes parameter dtypes {sorted(map(str, dtypes))}: its "
                    "all-gather input is then raw bytes; load the model in one dtype "
                    "(model.dtype=fp32 with method.tuning=lora)")
                module.set_custom_all_gather(PerturbingAllGather(self, segments, offset,
                                                                    refused))

    def _into_unsharded(self, fsdp_params) -> None:
        if self.active is None:
            return
        for fp, shard in fsdp_params:
            if shard is not None and shard.numel:
                self.write(shard, fp.unsharded_param.data.view(-1))
