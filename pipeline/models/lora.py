"""LoRA adapters for ZO (MeZO's LoRA setting): peft ``LoraConfig`` on a frozen base.

``W x + (α/r) B A x`` on ``method.lora_targets`` (MeZO: q_proj and v_proj, r 8, α 16), no
dropout, ``B = 0`` at the start so the adapted model is the base model. peft keeps the adapters
in fp32 when the base is 16-bit or quantized, so their ZO updates are not rounded away. The base
stays frozen; ZO methods perturb A and B like any other weight (their ParamShards).

A's random initialisation is drawn from a generator seeded by the run seed (inside a forked RNG),
so every rank and every resumed run builds the same adapter.
"""

from __future__ import annotations

import torch

# peft imports bitsandbytes, whose import warns about a CPU kernel we never use: filter it first
import pipeline.models.quantization  # noqa: F401

LORA_INIT_SEED = 0x10_7A


def wrap_lora(model: torch.nn.Module, method_cfg, seed: int) -> torch.nn.Module:
    """The peft model with LoRA adapters on the targeted modules; no parameter needs grad."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=method_cfg.lora_r, lora_alpha=method_cfg.lora_alpha,
                        target_modules=list(method_cfg.lora_targets), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng():
        torch.manual_seed(LORA_INIT_SEED + seed)
        try:
            model = get_peft_model(model, config)
        except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
            from pipeline.models.loading import ModelError

            raise ModelError(f"method.lora_targets={list(method_cfg.lora_targets)}: {exc}") \
                from None
    model.requires_grad_(False)
    return model.eval()


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model with ``W + (α/r) B A`` folded into the weights."""
    return model.merge_and_unload()
