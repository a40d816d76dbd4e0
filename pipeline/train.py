"""Entry point: config -> backend, method, data -> Trainer.train()."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.config import JobConfig
from pipeline.data.task_data import prepare
from pipeline.models.loading import load_model, load_tokenizer, resolve_device
from pipeline.models.selection import select_trainable
from pipeline.parallel import build_backend
from pipeline.trainer import Trainer
from pipeline.zo.methods import build_method


class RunDirError(ValueError):
    """The run directory cannot take this run."""


def default_run_dir(cfg: JobConfig, root: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / f"{stamp}-{cfg.method.name}-{cfg.data.task}"


def prepare_run_dir(run_dir: Path, cfg: JobConfig) -> None:
    if (run_dir / "metrics.jsonl").exists():
        raise RunDirError(
            f"{run_dir} already holds a run (metrics.jsonl); pass a new --run-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())


def build(cfg: JobConfig):
    """Model, backend, method and data of a run, before any step."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.model.device)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    model = load_model(cfg.model, device)
    trainable = select_trainable(model, cfg.model.trainable)
    backend = build_backend(cfg, model, trainable, device)
    method = build_method(cfg, backend.shards())
    data = prepare(cfg.data, tokenizer)
    return backend, method, data


def run(cfg: JobConfig, run_dir: Path, *, progress: bool = True) -> dict:
    prepare_run_dir(run_dir, cfg)
    backend, method, data = build(cfg)
    return Trainer(cfg, run_dir, backend, method, data, progress=progress).train()
