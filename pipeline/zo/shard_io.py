"""Saving and loading ParamShards: flat slices with their global offsets.

Each rank writes one safetensors file holding, for every shard, its stored elements (``name``)
and its fp32 master (``master::name``) when there is one; the metadata records each shard's
global shape and start. A loader reads, for each of its own shards, the overlapping ranges of
every saved file, so a checkpoint written at one world size loads at any other (2 -> 1, 2 -> 3,
or into an unsharded model).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.file_modes import follow_umask
from pipeline.zo.shards import ParamShard

MASTER = "master::"


def save_shards(shards: list[ParamShard], path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    layout = {}
    for s in shards:
        tensors[s.name] = s.local.detach().contiguous().cpu()
        if s.master is not None:
            tensors[MASTER + s.name] = s.master.detach().contiguous().cpu()
        layout[s.name] = {"shape": list(s.shape), "start": s.start}
    save_file(tensors, str(path), metadata={"layout": json.dumps(layout)})
    follow_umask(path)  # safetensors writes 0600


def load_shards(shards: list[ParamShard], files: list[Path]) -> None:
    """Fill ``shards`` from the saved slices in ``files``, whatever sharding wrote them.

    A master missing from the checkpoint is rebuilt from the stored weights; a shard whose
    elements are not all covered is an error.
    """
    covered = {s.name: 0 for s in shards}
    by_name = {s.name: s for s in shards}
    for path in files:
        with safe_open(str(path), "pt") as f:
            layout = json.loads(f.metadata()["layout"])
            keys = set(f.keys())
            for name, entry in layout.items():
                shard = by_name.get(name)
                if shard is None:
                    continue
                if entry["shape"] != list(shard.shape):
                    raise ValueError(f"{path}: {name} has shape {entry['shape']}, the model "
                                     f"{list(shard.shape)}")
                saved = f.get_slice(name)
                lo = max(entry["start"], shard.start)
                hi = min(entry["start"] + saved.get_shape()[0], shard.start + shard.numel)
                if hi <= lo:
                    continue
                src = slice(lo - entry["start"], hi - entry["start"])
                dst = slice(lo - shard.start, hi - shard.start)
                shard.local[dst].copy_(saved[src])
                if shard.master is not None:
                    key = MASTER + name if MASTER + name in keys else name
                    shard.master[dst].copy_(f.get_slice(key)[src].float())
                covered[name] += hi - lo
    missing = [n for n, c in covered.items() if c != by_name[n].numel]
    if missing:
        raise ValueError(f"checkpoint {files[0].parent} does not cover {', '.join(missing[:5])}")
