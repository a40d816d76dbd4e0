"""``zopipe export``: a run's latest checkpoint as a standard Hugging Face model directory.

A LoRA run on a full-precision base is exported merged (``W + (α/r) B A``, a plain model); on a
quantized base the peft adapter alone is saved (``adapter_config.json`` and
``adapter_model.safetensors``, loadable with ``peft.PeftModel.from_pretrained`` over the base),
since merging into 4-bit weights would round the update away.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline import checkpoint
from pipeline.config import load_config
from pipeline.file_modes import follow_umask
from pipeline.models.loading import load_tokenizer
from pipeline.out_dirs import check_new
from pipeline.run_dir import RunDirError

NEW_OUT = "give --out a new (or empty) directory you can write in"


def save_hf(model, name_or_path: str, out: Path) -> None:
    """safetensors weights, config and tokenizer that ``from_pretrained(out)`` loads."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(name_or_path).save_pretrained(out)
    follow_umask(out)  # safetensors writes 0600


def unsharded(cfg):
    """The run's config on the single-process backend: sharded checkpoints reload unsharded, and
    ``save_pretrained`` needs whole parameters (a ZeRO-3 module holds empty placeholders)."""
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, backend="single"))


def save_adapter(method, name_or_path: str, out: Path) -> None:
    """An adapter-only export: ``adapter.safetensors`` and ``adapter_config.json`` (the method,
    the base model, the layers and the rank), for a base that stays as published."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(method.adapter_tensors(), out / "adapter.safetensors")
    follow_umask(out / "adapter.safetensors")
    meta = {"method": "zoact", "base_model": name_or_path, "layers": list(method.names),
            "rank": method.rank, "forward": "y = W x + C (V^T x)"}
    (out / "adapter_config.json").write_text(json.dumps(meta, indent=2) + "\n")


def export_run(run_dir: Path, out: Path, adapter_only: bool = False) -> int:
    """Write the fine-tuned model of ``run_dir`` to ``out``; returns the checkpoint's step.

    ZO-Act runs train coefficients beside frozen weights: by default ``W + C Vᵀ`` is merged into
    the exported model; ``adapter_only`` writes the coefficients and bases alone."""
    from pipeline.train import build_model

    found = checkpoint.latest_verified(run_dir)
    if found is None:
        raise RunDirError(f"{run_dir} has no complete checkpoint to export")
    step, path = found
    cfg = unsharded(load_config(path / "config.yaml"))
    check_new(out, NEW_OUT)
    if adapter_only and cfg.method.name != "zoact" and cfg.method.tuning != "lora":
        raise RunDirError(f"method {cfg.method.name} trains the model's own weights: it has no "
                          "adapter to export alone (drop --adapter-only)")
    backend, method = build_model(cfg)
    checkpoint.load(path, backend.shards(), method)
    model = backend.model
    if hasattr(method, "adapter_tensors"):
        if not method.calibrated:
            raise RunDirError(f"{path} was taken during ZO-Act's calibration steps: there are no "
                              "coefficients to export yet; train past method.zoact_calib_batches")
        if adapter_only or cfg.model.quantization != "none":  # C Vᵀ cannot go into 4-bit W
            save_adapter(method, cfg.model.name_or_path, out)
            return step
        method.merge_into(model)
    elif cfg.method.tuning == "lora":
        if cfg.model.quantization == "none" and not adapter_only:
            from pipeline.models.lora import merged

            model = merged(model)  # a plain model
        # otherwise peft's save_pretrained writes the LoRA adapter alone
    save_hf(model, cfg.model.name_or_path, out)
    return step
