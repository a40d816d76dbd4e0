"""What trains (``method.tuning``), and which parameters it hands out
(the combinations with the base model that make sense: :mod:`pipeline.combinations`).

- ``full``: the model weights that ``model.trainable`` selects, perturbed in place;
- ``lora``: the peft LoRA adapters' A and B (:mod:`pipeline.models.lora`), any weight-space
  method (MeZO, BSZO, ...); the base is frozen and may be quantized;
- ``coefficients``: ZO-Act's coefficients ``C`` (:mod:`pipeline.zo.methods.zoact`), which live
  in the method, not the model: the backend hands out no weight shards at all.
"""

from __future__ import annotations

import torch

from pipeline.models.selection import select_trainable


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
