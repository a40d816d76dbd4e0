"""Saving and loading ParamShards: flat slices with their global offsets.

One safetensors file per rank holds, for every shard, its stored elements (``name``) and its fp32
master (``master::name``) when there is one; the metadata records each shard's global shape and
start, so a loader can map slices onto any other sharding of the same parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from pipeline.zo.shards import ParamShard

MASTER = "master::"


def save_shards(shards: list[ParamShard], path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    layout = {}
    for s in shards:
        tensors[s.name] = s.local.detach().contiguous()
        if s.master is not None:
            tensors[MASTER + s.name] = s.master.detach().contiguous()
        layout[s.name] = {"shape": list(s.shape), "start": s.start}
    save_file(tensors, str(path), metadata={"layout": json.dumps(layout)})


def load_shards(shards: list[ParamShard], path: Path) -> None:
    """Copy saved slices into ``shards`` (same sharding); a missing parameter is an error."""
    with safe_open(str(path), "pt") as f:
        layout = json.loads(f.metadata()["layout"])
    saved = load_file(str(path))
    for s in shards:
        entry = layout.get(s.name)
        if entry is None or entry["shape"] != list(s.shape) or entry["start"] != s.start:
            raise ValueError(f"{path}: no saved slice for {s.name} at offset {s.start}")
        s.local.copy_(saved[s.name])
        if s.master is not None:
            key = MASTER + s.name
            s.master.copy_(saved[key] if key in saved else saved[s.name].float())
