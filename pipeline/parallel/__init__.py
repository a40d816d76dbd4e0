"""Execution backends: how the trainable parameters are held and how ranks talk.

Every backend builds its own model from the config (ZeRO-3 must partition it while it loads) and
provides the Backend contract of DESIGN.md: ``shards()``, ``loss(batch, at)``, ``losses(batch,
ats)`` (the losses at several points of one batch: one forward each, or with
``train.fused_evaluations`` one forward of the repeated batch, :mod:`pipeline.parallel.fused`),
``scores(batch)``, ``all_reduce_mean(tensor)``, ``rank``, ``world_size``, ``barrier()``,
``model``, ``device``.
"""

from __future__ import annotations

import importlib

import torch

from pipeline.models.selection import select_trainable
from pipeline.zo.shards import ParamShard, decays

BACKENDS = {
    "single": "pipeline.parallel.single:SingleBackend",
    "fsdp": "pipeline.parallel.fsdp:FSDPBackend",
    "zero3": "pipeline.parallel.zero3:Zero3Backend",
}


def build_backend(cfg):
    module, name = BACKENDS[cfg.parallel.backend].split(":")
    return getattr(importlib.import_module(module), name).from_config(cfg)


def wants_master(cfg) -> bool:
    """fp32 masters, only when ``precision.master_weights=fp32`` asks (the default has none)."""
    return cfg.precision.master_weights == "fp32"


def trainable_names(model, patterns: list[str]) -> list[str]:
    return [name for name, _ in select_trainable(model, patterns)]


def make_shard(name: str, shape, start: int, local, *, master: bool) -> ParamShard:
    """A ParamShard over ``local`` (a 1-D view of this rank's elements), with an fp32 master
    copy if asked."""
    fp32 = local.detach().to(torch.float32, copy=True) if master else None
    return ParamShard(name, tuple(shape), start, local, master=fp32, decay=decays(name, len(shape)))
