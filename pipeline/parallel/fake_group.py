"""The real backends on a fake process group, over a meta-device model (``--dry-run``).

A job's world size ``W`` (``parallel.nodes`` x ``parallel.gpus_per_node``) is simulated by
PyTorch's fake process group (``torch.testing._internal.distributed.fake_pg``): this process is
rank 0 of ``W``, and every collective returns at once. :func:`on_fake_group` builds the job's
backend there, as a real run would, but on the meta device (no weights, no memory):

- ``fsdp``: FSDP2 ``fully_shard`` per block and root of :func:`pipeline.models.meta.meta_model`,
  as :class:`~pipeline.parallel.fsdp.FSDPBackend` does;
- ``zero3``: DeepSpeed's own ``deepspeed.zero.Init`` and ``deepspeed.initialize``
  (:class:`~pipeline.parallel.zero3.Zero3Backend`). DeepSpeed cannot build a model on the meta
  device, so its ``Init`` is pointed at the meta device for both its local and its partition
  storage: DeepSpeed's partitioning code runs unchanged, the partitions hold no memory, and the
  weight initialisation is skipped (a real run loads the weights);
- ``single``: the meta model whole.

It also gives every rank's shard ranges from the libraries' own partition rules (DeepSpeed's
partition size ``p.ds_tensor.ds_numel`` with the backend's :func:`owned_range`, DTensor's
``Shard(0)`` chunking), which the caller checks against rank 0's real ParamShards.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.models.loading import DTYPES
from pipeline.models.meta import hf_config, meta_model
from pipeline.parallel import trainable_names, wants_master

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DryRunError(ValueError):
    """A job that cannot be dry-run as configured; the message says what to change."""


@dataclass
class FakeGroupBuild:
    backend: object  # the real backend, rank 0 of the fake group
    names: list[str]  # the trainable parameters
    per_rank: list[list[tuple[int, int]]]  # per parameter, each rank's (flat start, count)


def _fake_group(world: int, rank: int = 0) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise DryRunError("a dry run needs a process without a process group; run it outside "
                          "torchrun")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def _fsdp(cfg, world: int) -> FakeGroupBuild:
    from torch.distributed.tensor import Shard

    from pipeline.parallel.fsdp import FSDPBackend

    _fake_group(world)
    model = meta_model(cfg.model)
    names = trainable_names(model, cfg.model.trainable)
    backend = FSDPBackend(model, names, torch.device("cpu"), master=wants_master(cfg))
    params = dict(backend.model.named_parameters())
    per_rank = []
    for name in names:
        d0 = params[name].shape[0]
        row = params[name].numel() // max(d0, 1)
        ranges = []
        for r in range(world):
            rows, first = Shard.local_shard_size_and_offset(d0, world, r)
            ranges.append((first * row if rows else 0, rows * row))
        per_rank.append(ranges)
    return FakeGroupBuild(backend, names, per_rank)


def _zero3(cfg, world: int) -> FakeGroupBuild:
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from pipeline.parallel.zero3 import (
        Zero3Backend,
        _import_deepspeed,
        default_ds_config,
        owned_range,
        prepare_ds_config,
        read_ds_config,
    )

    deepspeed = _import_deepspeed("cpu")
    _fake_group(world)
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    path = cfg.parallel.ds_config or default_ds_config(cfg.model.dtype)
    ds_config = prepare_ds_config(read_ds_config(path), dtype=cfg.model.dtype,
                                  batch_size=cfg.train.batch_size, world_size=world)
    init = deepspeed.zero.Init(config_dict_or_path=copy.deepcopy(ds_config))
    init.local_device = init.remote_device = torch.device("meta")
    with no_init_weights(), init:
        model = AutoModelForCausalLM.from_config(hf_config(cfg.model),
                                                 dtype=DTYPES[cfg.model.dtype])
    model.tie_weights()  # no_init_weights also skips the tying that post_init does
    model.requires_grad_(False)
    model.eval()
    names = trainable_names(model, cfg.model.trainable)
    with _gpu_dtypes():
        engine, *_ = deepspeed.initialize(model=model, config=copy.deepcopy(ds_config))
    backend = Zero3Backend(engine, names, torch.device("cpu"), master=wants_master(cfg))
    params = dict(backend.model.named_parameters())
    per_rank = [[owned_range(params[n].ds_numel, params[n].ds_tensor.ds_numel, r)
                 for r in range(world)] for n in names]
    return FakeGroupBuild(backend, names, per_rank)


@contextlib.contextmanager
def _gpu_dtypes():
    """DeepSpeed's CPU accelerator refuses fp16; the simulated ranks are GPUs, which take it."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    original = accelerator.is_fp16_supported
    accelerator.is_fp16_supported = lambda: True
    try:
        yield
    finally:
        accelerator.is_fp16_supported = original


def _single(cfg) -> FakeGroupBuild:
    from pipeline.parallel.single import SingleBackend

    model = meta_model(cfg.model)
    names = trainable_names(model, cfg.model.trainable)
    backend = SingleBackend(model, names, "meta", master=wants_master(cfg))
    params = dict(model.named_parameters())
    return FakeGroupBuild(backend, names, [[(0, params[n].numel())] for n in names])


BUILDERS = {"fsdp": _fsdp, "zero3": _zero3}


@contextlib.contextmanager
def on_fake_group(cfg, world: int) -> Iterator[FakeGroupBuild]:
    """The job's backend as rank 0 of a fake group of ``world`` ranks (``single``: one process);
    on exit the backend is closed, the group destroyed and the rendezvous variables restored."""
    build = None
    saved_env = {k: os.environ.get(k) for k in ENV}
    try:
        if cfg.parallel.backend in BUILDERS:
            build = BUILDERS[cfg.parallel.backend](cfg, world)
        else:
            build = _single(cfg)
        yield build
    finally:
        if build is not None:
            build.backend.close()
        if dist.is_initialized():  # the backend failed to build on the fake group
            dist.destroy_process_group()
        for key, value in saved_env.items():  # the fake group's rendezvous variables go
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
