"""Step checkpoints: ``<run_dir>/checkpoints/step-<N>/``, written atomically.

A checkpoint holds the trainable weights (and fp32 masters) of this run's shards, the method's
state, the trainer state and the resolved config. It is written into a temporary directory, a
``COMPLETE`` marker goes in last, and the directory is renamed into place, so a kill or a full
disk during a save leaves the previous checkpoint intact. Directories without the marker are
ignored, with a warning, in favour of the latest complete one.

The marker is a manifest: the size and sha256 of every file of the checkpoint (each rank hashes
the shard file it wrote, rank 0 the rest), so a file truncated or overwritten after the save is
found by :func:`verify` before anything reads it. :func:`latest_verified` is the checkpoint a
resume may use: the newest that verifies, after a one-line warning for each newer one that does
not. (A marker holding only the step number, from before manifests, is checked for its files.)
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
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
CORRUPT_PREFIX = "corrupt-"  # a checkpoint set aside by a resume that fell back past it
DIGEST_SUFFIX = ".digest.json"  # a rank's size + sha256 of its shard file, until the marker
REQUIRED = ("method.pt", "trainer.json", "config.yaml")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_of(path: Path) -> int | None:
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
        step = step_of(path)
        if step is None:
            continue
        if (path / COMPLETE).is_file():
            found.append((step, path))
        elif warn:
            print(f"warning: ignoring incomplete checkpoint {path} (no {COMPLETE} marker)",
                  file=sys.stderr)
    return sorted(found)


def latest(run_dir: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint, unverified (cheap: for status lines)."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def digest(path: Path) -> dict[str, Any]:
    """``{"size", "sha256"}`` of one file."""
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": sha}


def verify(path: Path) -> list[str]:
    """What is wrong with checkpoint ``path`` (empty: it verifies); reads every file once."""
    try:
        manifest = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError) as exc:
        return [f"its {COMPLETE} marker is unreadable ({exc})"]
    if not isinstance(manifest, dict):  # a marker from before manifests: the files must exist
        names = [*REQUIRED] + ([] if any(path.glob("shards-rank*.safetensors"))
                               else ["shards-rank0.safetensors"])
        return [f"{name} is missing" for name in names if not (path / name).is_file()]
    found = []
    for name, want in sorted(manifest.get("files", {}).items()):
        file = path / name
        if not file.is_file():
            found.append(f"{name} is missing")
        elif file.stat().st_size != want["size"]:
            found.append(f"{name} is {file.stat().st_size} bytes, {want['size']} were saved")
        elif digest(file)["sha256"] != want["sha256"]:
            found.append(f"{name} differs from what was saved (sha256)")
    return found


def latest_verified(run_dir: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint that verifies; warns (one line each) about newer ones
    that do not. Raises :class:`CheckpointError` when there are checkpoints and none verifies."""
    bad = []
    for step, path in reversed(complete_checkpoints(run_dir)):
        found = verify(path)
        if not found:
            if bad:
                print(f"warning: resuming from {path.name}, the newest checkpoint that verifies",
                      file=sys.stderr)
            return step, path
        print(f"warning: checkpoint {path} is corrupt: {'; '.join(found)}", file=sys.stderr)
        bad.append(path)
    if bad:
        raise CheckpointError(
            f"no checkpoint of {run_dir} verifies ({', '.join(p.name for p in bad)}; see the "
            f"warnings above). Restore their files, or move {checkpoint_root(run_dir)} away to "
            "start the run over"
        )
    return None


def set_aside_newer(run_dir: Path, step: int) -> list[Path]:
    """Rename checkpoints newer than ``step`` (those a resume fell back past) to
    ``corrupt-step-<N>``: kept for inspection, never loaded or overwritten by the new saves."""
    moved = []
    for later, path in complete_checkpoints(run_dir, warn=False):
        if later > step:
            target = path.with_name(CORRUPT_PREFIX + path.name)
            if target.exists():
                shutil.rmtree(target)
            os.replace(path, target)
            moved.append(target)
    return moved


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
        files = {name: digest(tmp / name) for name in REQUIRED}
        for record in sorted(tmp.glob(f".shards-rank*{DIGEST_SUFFIX}")):
            files[record.name[1:-len(DIGEST_SUFFIX)]] = json.loads(record.read_text())
            record.unlink()
        if len(files) != len(REQUIRED) + backend.world_size:
            raise OSError(f"{tmp} holds digests of {len(files) - len(REQUIRED)} shard files, "
                          f"expected {backend.world_size}")
        with open(tmp / COMPLETE, "w") as f:
            f.write(json.dumps({"step": step, "files": files}, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def write_shards() -> None:
        name = f"shards-rank{backend.rank}.safetensors"
        save_shards(backend.shards() + _state_shards(method, backend.shards()), tmp / name)
        (tmp / f".{name}{DIGEST_SUFFIX}").write_text(json.dumps(digest(tmp / name)))

    phases = [
        (lambda: prepare() if lead else None),
        write_shards,
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
    (P-GAP's factors exist only after a refresh). A file that cannot be read is a
    :class:`CheckpointError` naming it (:func:`verify` catches damage first when the marker has a
    manifest)."""
    try:
        method.load_state_dict(torch.load(path / "method.pt", weights_only=True))
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path / 'method.pt'} cannot be read (damaged or not a "
                              f"method state: {type(exc).__name__}); "
                              f"restore it or move {path} away to resume from an older "
                              "checkpoint") from None
    states = _state_targets(method, shards)
    try:
        load_shards(shards + states, sorted(path.glob("shards-rank*.safetensors")))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"the shard files of {path} cannot be read ({exc}); restore them "
                              f"or move {path} away to resume from an older checkpoint") from None
    if states:
        method.load_shard_state({s.name: s.local for s in states})
    state = json.loads((path / "trainer.json").read_text())
    state.pop("world_size", None)
    return state
