"""A run directory's life: new, resumed from its latest checkpoint, or finished.

``zopipe train`` on a directory that holds a complete checkpoint resumes from it, whatever the
initial-load options say, so a requeued job needs no new arguments. A changed config is checked
against the one the run started with: changes that break the run's trajectory are refused, the
harmless ones (more steps, another evaluation cadence, tracking) are allowed and reported.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import yaml

from pipeline import checkpoint
from pipeline.config import JobConfig, build
from pipeline.out_dirs import check_writable
from pipeline.stopping import STOPPED_FILE

HARMLESS = (
    "train.steps", "train.max_forwards", "train.eval_every", "train.eval_split",
    "train.final_split", "train.eval_zero_shot", "train.eval_batch_size", "train.threads",
    "train.max_nonfinite_steps", "model.device", "checkpoint.", "tracking.",
)
RUN_FILES = ("metrics.jsonl", "update_log.jsonl", "examples.jsonl")
LOCK_FILE = ".lock"


class RunDirError(ValueError):
    """The run directory cannot take this run; the message says why and what to do."""


def config_changes(old: JobConfig, new: JobConfig) -> tuple[list[str], list[str]]:
    """``(breaking, harmless)`` descriptions of the keys that differ."""
    a, b = old.flat(), new.flat()
    breaking, harmless = [], []
    for key in a:
        if a[key] != b[key]:
            text = f"{key}: {a[key]!r} -> {b[key]!r}"
            (harmless if key.startswith(HARMLESS) else breaking).append(text)
    return breaking, harmless


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop records after ``step``: a resumed run recomputes them (bitwise the same)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            break  # a line cut by a kill: everything after it is lost anyway
        if record.get("step", 0) > step:
            break
        keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def check_writable_run(run_dir: Path) -> None:
    """Raise unless this process can write ``run_dir`` and the files a run rewrites in place
    there (a teammate's read-only run, say). Creates nothing: it runs before any model loads."""
    fix = "use a run directory you can write in, or make this one writable (chmod -R u+w)"
    check_writable(run_dir, fix)
    rewritten = [run_dir / name for name in ("config.yaml", "summary.json", LOCK_FILE, *RUN_FILES)]
    for path in [*rewritten, checkpoint.checkpoint_root(run_dir)]:
        mode = os.W_OK | os.X_OK if path.is_dir() else os.W_OK
        if path.exists() and not os.access(path, mode):
            raise RunDirError(f"cannot write {path} (no write permission, or a read-only file "
                              f"system); {fix}")


def inspect_run(run_dir: Path, cfg: JobConfig) -> tuple[Path | None, list[str]]:
    """``(checkpoint to resume or None, harmless config changes)``; reads only, so every rank
    can call it and reach the same verdict. The checkpoint is the newest that verifies
    (:func:`checkpoint.latest_verified`), checked before anything is loaded or rewritten. Raises
    :class:`RunDirError` for breaking changes, :class:`checkpoint.CheckpointError` when no
    checkpoint verifies."""
    found = checkpoint.latest_verified(run_dir) if run_dir.exists() else None
    if found is None:
        return None, []
    step, path = found
    started = build(yaml.safe_load((path / "config.yaml").read_text()))
    breaking, harmless = config_changes(started, cfg)
    if breaking:
        raise RunDirError(
            f"{run_dir} holds a run at step {step} whose config differs in ways that change its "
            f"trajectory: {'; '.join(breaking)}. Resume with the original config (zopipe resume "
            f"{run_dir}) or start a new --run-dir"
        )
    return path, harmless


def prepare_run(run_dir: Path, cfg: JobConfig, ckpt: Path | None) -> None:
    """Make ``run_dir`` ready (global rank 0 only): a fresh start clears what a run that never
    reached its first checkpoint left; a resume drops the records after the checkpoint."""
    if ckpt is None and run_dir.exists():
        for name in (*RUN_FILES, "summary.json", "mlflow_run_id"):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(checkpoint.checkpoint_root(run_dir), ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STOPPED_FILE).unlink(missing_ok=True)
    if ckpt is not None:
        step = checkpoint.step_of(ckpt)
        for moved in checkpoint.set_aside_newer(run_dir, step):
            print(f"warning: set the corrupt {moved.name[len(checkpoint.CORRUPT_PREFIX):]} "
                  f"aside as {moved}", file=sys.stderr)
        for name in RUN_FILES:
            truncate_jsonl(run_dir / name, step)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
