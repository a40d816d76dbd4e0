"""Step checkpoints: ``<run_dir>/checkpoints/step-<N>/``, written atomically.

A checkpoint holds the trainable weights (and fp32 masters) of this run's shards, the method's
state, the trainer state and the resolved config. It is written into a temporary directory, a
``COMPLETE`` marker goes in last, and the directory is renamed into place, so a kill or a full
disk during a save leaves the previous checkpoint intact. Directories without the marker are
ignored, with a warning, in favour of the latest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from pipeline.zo.shard_io import load_shards, save_shards
from pipeline.zo.shards import ParamShard

COMPLETE = "COMPLETE"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _step_of(path: Path) -> int | None:
    if not path.name.startswith(PREFIX):
        return None
    try:
        return int(path.name[len(PREFIX) :])
    except ValueError:
        return None


def complete_checkpoints(run_dir: Path, *, warn: bool = True) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every complete checkpoint, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = _step_of(path)
        if step is None:
            continue
        if (path / COMPLETE).is_file():
            found.append((step, path))
        elif warn:
            print(f"warning: ignoring incomplete checkpoint {path} (no {COMPLETE} marker)",
                  file=sys.stderr)
    return sorted(found)


def latest(run_dir: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def _state_shards(method, shards: list[ParamShard]) -> list[ParamShard]:
    """A method's sharded state as ParamShards, so it is saved and resharded like the weights:
    tensors keyed ``"<kind>::<param>"`` laid out like that parameter's shard (ZO-Adam's moments),
    or ParamShards with a layout of their own (P-GAP's rows of ``U``, flat slices of an
    ``(out, r)`` matrix at their global offset)."""
    return _as_shards(method.shard_state(), shards) if hasattr(method, "shard_state") else []


def _state_targets(method, shards: list[ParamShard]) -> list[ParamShard]:
    """Where a checkpoint's sharded method state is loaded: the method's own targets when they
    differ from what it saves (P-GAP needs more rows of ``U`` than it owns), else the same."""
    if hasattr(method, "shard_state_targets"):
        return _as_shards(method.shard_state_targets(), shards)
    return _state_shards(method, shards)


def _as_shards(state: dict, shards: list[ParamShard]) -> list[ParamShard]:
    by_name = {s.name: s for s in shards}
    out = []
    for key, tensor in state.items():
        if isinstance(tensor, ParamShard):
            out.append(tensor)
            continue
        shard = by_name[key.partition("::")[2]]
        out.append(ParamShard(key, shard.shape, shard.start, tensor.reshape(-1)))
    return out


def _all_ok(backend, ok: bool) -> bool:
    """Whether every rank succeeded (one tiny collective when sharded)."""
    if backend.world_size == 1:
        return ok
    flag = backend.all_reduce_mean(torch.tensor([0.0 if ok else 1.0]))
    return flag.item() == 0.0


def save(run_dir: Path, step: int, backend, method, trainer_state: dict[str, Any],
         config_yaml: str, *, keep_last: int = 0) -> Path:
    """Write ``step-<step>`` atomically; keep only the newest ``keep_last`` (0: keep all).

    Every rank writes its shards into the temporary directory; global rank 0 writes the rest, the
    ``COMPLETE`` marker last, and renames the directory once all ranks succeeded.
    """
    root = checkpoint_root(run_dir)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}"
    lead = backend.rank == 0

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def finalize() -> None:
        torch.save(method.state_dict(), tmp / "method.pt")
        state = {**trainer_state, "world_size": backend.world_size}
        (tmp / "trainer.json").write_text(json.dumps(state, indent=2) + "\n")
        (tmp / "config.yaml").write_text(config_yaml)
        with open(tmp / COMPLETE, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    phases = [
        (lambda: prepare() if lead else None),
        (lambda: save_shards(backend.shards() + _state_shards(method, backend.shards()),
                             tmp / f"shards-rank{backend.rank}.safetensors")),
        (lambda: finalize() if lead else None),
    ]
    for phase in phases:  # every rank runs every phase, so the collectives stay matched
        error: Exception | None = None
        try:
            phase()
        except (OSError, SafetensorError) as exc:  # safetensors reports I/O errors as its own
            error = exc
        if not _all_ok(backend, error is None):
            if lead:
                shutil.rmtree(tmp, ignore_errors=True)
            prev = latest(run_dir)
            kept = (f"the previous checkpoint {prev[1]} is intact" if prev
                    else "no earlier checkpoint")
            reason = error or "another rank could not write its shards"
            raise CheckpointError(
                f"could not write checkpoint step {step} under {root}: {reason}; {kept}. Free "
                "disk space or fix the directory's permissions, then resume"
            )
    if lead and keep_last > 0:
        for _, old in complete_checkpoints(run_dir, warn=False)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, shards, method) -> dict[str, Any]:
    """Restore shards (from any world size) and method state; returns the trainer state.

    The replicated method state comes first: it tells a method which sharded state to expect
    (P-GAP's factors exist only after a refresh)."""
    method.load_state_dict(torch.load(path / "method.pt", weights_only=True))
    states = _state_targets(method, shards)
    load_shards(shards + states, sorted(path.glob("shards-rank*.safetensors")))
    if states:
        method.load_shard_state({s.name: s.local for s in states})
    state = json.loads((path / "trainer.json").read_text())
    state.pop("world_size", None)
    return state
