"""``zopipe export``: a run's latest checkpoint as a standard Hugging Face model directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline import checkpoint
from pipeline.config import load_config
from pipeline.models.loading import load_tokenizer
from pipeline.run_dir import RunDirError


def save_hf(model, name_or_path: str, out: Path) -> None:
    """safetensors weights, config and tokenizer that ``from_pretrained(out)`` loads."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(name_or_path).save_pretrained(out)


def unsharded(cfg):
    """The run's config on the single-process backend: sharded checkpoints reload unsharded, and
    ``save_pretrained`` needs whole parameters (a ZeRO-3 module holds empty placeholders)."""
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, backend="single"))


def export_run(run_dir: Path, out: Path) -> int:
    """Write the fine-tuned model of ``run_dir`` to ``out``; returns the checkpoint's step."""
    from pipeline.train import build_model

    found = checkpoint.latest(run_dir)
    if found is None:
        raise RunDirError(f"{run_dir} has no complete checkpoint to export")
    step, path = found
    cfg = unsharded(load_config(path / "config.yaml"))
    backend, method = build_model(cfg)
    checkpoint.load(path, backend.shards(), method)
    save_hf(backend.model, cfg.model.name_or_path, out)
    return step
