"""``zopipe export``: a run's latest checkpoint as a standard Hugging Face model directory.

A LoRA run on a full-precision base is exported merged (``W + (α/r) B A``, a plain model); on a
quantized base the peft adapter alone is saved (``adapter_config.json`` and
``adapter_model.safetensors``, loadable with ``peft.PeftModel.from_pretrained`` over the base),
since merging into 4-bit weights would round the update away.
"""

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
    model = backend.model
    if cfg.method.tuning == "lora" and cfg.model.quantization == "none":
        from pipeline.models.lora import merged

        model = merged(model)  # a plain model; on a quantized base peft saves the adapter only
    save_hf(model, cfg.model.name_or_path, out)
    return step
