"""Entry point: config -> run directory -> backend, method, data -> Trainer.train()."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.config import JobConfig
from pipeline.data.task_data import prepare
from pipeline.heap import pin_mmap_threshold
from pipeline.models.loading import load_tokenizer
from pipeline.parallel import build_backend
from pipeline.run_dir import inspect_run, prepare_run
from pipeline.run_lock import run_lock
from pipeline.stopping import StopRequest
from pipeline.tracking import Tracker
from pipeline.trainer import Stopped, Trainer, TrainerState
from pipeline.zo.methods import build_method


def default_run_dir(cfg: JobConfig, root: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / f"{stamp}-{cfg.method.name}-{cfg.data.task}"


def build_model(cfg: JobConfig):
    """Backend (which loads and shards the model) and method, before any step. On CPU, the
    loaded process's large allocations are then served from their own mappings
    (:func:`pipeline.heap.pin_mmap_threshold`), so what a step frees leaves the resident set."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    backend = build_backend(cfg)
    if backend.device.type == "cpu":
        pin_mmap_threshold()
    return backend, build_method(cfg, backend.shards())


def build(cfg: JobConfig):
    """Model, backend, method and data of a run. The data comes first: it needs only the
    tokenizer, so a missing data set is reported before the model loads."""
    data = prepare(cfg.data, load_tokenizer(cfg.model.name_or_path))
    backend, method = build_model(cfg)
    return backend, method, data


def _finished(run_dir: Path, cfg: JobConfig, ckpt: Path | None) -> dict | None:
    """The summary of a run whose latest checkpoint already reached ``train.steps``."""
    summary = run_dir / "summary.json"
    if ckpt is None or not summary.exists():
        return None
    done = json.loads(summary.read_text())
    step = json.loads((ckpt / "trainer.json").read_text())["step"]
    return done if step == done.get("steps") and step >= cfg.train.steps else None


def run(cfg: JobConfig, run_dir: Path, *, progress: bool = True) -> dict:
    """Train (or resume, or report a finished run) in ``run_dir``; every rank calls this.

    Raises :class:`Stopped` when a stop request was honoured (the run is resumable).
    """
    with run_lock(run_dir):  # one process per run directory, released when it dies
        return _run(cfg, run_dir, progress)


def _run(cfg: JobConfig, run_dir: Path, progress: bool) -> dict:
    ckpt, changes = inspect_run(run_dir, cfg)
    done = _finished(run_dir, cfg, ckpt)
    if done is not None:
        tqdm.write(f"{run_dir} already finished {done['steps']} steps; nothing to do")
        return done
    backend, method, data = build(cfg)
    lead = backend.rank == 0
    if lead:
        prepare_run(run_dir, cfg, ckpt)
    backend.barrier()
    state = TrainerState()
    if ckpt is not None:
        state = TrainerState(**checkpoint.load(ckpt, backend.shards(), method))
        if lead:
            tqdm.write(f"resuming {run_dir} from {ckpt.name}")
            for change in changes:
                tqdm.write(f"  config change allowed on resume: {change}")
    try:
        with StopRequest(run_dir) as stop, Tracker.start(
            cfg, run_dir, rank=backend.rank, resume=ckpt is not None
        ) as tracker:
            trainer = Trainer(cfg, run_dir, backend, method, data, tracker=tracker, stop=stop,
                              state=state, progress=progress)
            try:
                return trainer.train()
            except Stopped:
                tracker.finish("KILLED")
                raise
            finally:
                trainer.close()
    finally:
        backend.close()
