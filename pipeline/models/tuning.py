"""What trains (``method.tuning``), and which combinations with the base model make sense.

- ``full``: the model weights that ``model.trainable`` selects, perturbed in place;
- ``lora``: the peft LoRA adapters' A and B (:mod:`pipeline.models.lora`), any weight-space
  method (MeZO, BSZO, ...); the base is frozen and may be quantized;
- ``coefficients``: ZO-Act's coefficients ``C`` (:mod:`pipeline.zo.methods.zoact`), which live
  in the method, not the model: the backend hands out no weight shards at all.
"""

from __future__ import annotations

import torch

from pipeline.models.selection import select_trainable


def combination_errors(cfg) -> list[str]:
    """Config errors that involve more than one key, each with its fix."""
    errors = []
    tuning, quant = cfg.method.tuning, cfg.model.quantization
    if quant != "none" and tuning == "full":
        errors.append(
            f"method.tuning=full: a model.quantization={quant} base is frozen low-bit storage and "
            "cannot be tuned in full; set method.tuning=lora (with a weight-space method such as "
            "mezo or bszo) or method.tuning=coefficients (with method.name=zoact)"
        )
    if quant != "none" and cfg.parallel.backend != "single":
        errors.append(
            f"model.quantization={quant} runs on parallel.backend=single only (bitsandbytes "
            "weights are not sharded by fsdp/zero3); set parallel.backend=single or "
            "model.quantization=none"
        )
    if tuning == "coefficients" and cfg.method.name != "zoact":
        errors.append(
            f"method.tuning=coefficients trains ZO-Act's coefficients, not {cfg.method.name}'s "
            "weights; set method.name=zoact, or method.tuning=lora / full"
        )
    if tuning == "lora" and cfg.method.name == "zoact":
        errors.append("method.name=zoact trains coefficients, not LoRA adapters; set "
                      "method.tuning=coefficients")
    if tuning == "lora" and cfg.parallel.backend == "zero3":
        errors.append("method.tuning=lora runs on parallel.backend=single or fsdp (peft adapters "
                      "are added after ZeRO-3 has partitioned the model); choose one of those")
    if tuning == "full" and not cfg.model.trainable:
        errors.append("model.trainable is empty: give fnmatch patterns of the weights to train, "
                      "or set method.tuning=coefficients (method.name=zoact) or lora")
    return errors


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def tuned_names(model: torch.nn.Module, cfg) -> list[str]:
    """Names of the parameters the backend hands out as ParamShards, in the model's order."""
    if cfg.method.tuning == "coefficients":
        return []
    if cfg.method.tuning == "lora":
        return [n for n, _ in model.named_parameters() if is_adapter_param(n)]
    return [n for n, _ in select_trainable(model, cfg.model.trainable)]


def load_tuned_model(cfg, device: torch.device) -> torch.nn.Module:
    """The configured base model (maybe quantized), wrapped with LoRA for ``tuning=lora``."""
    from pipeline.models.loading import load_model

    model = load_model(cfg.model, device)
    if cfg.method.tuning == "lora":
        from pipeline.models.lora import wrap_lora

        model = wrap_lora(model, cfg.method, cfg.train.seed)
    return model
