"""Config checks that involve more than one key (tuning, quantization, backend, method), each
with its fix. Pure config: it imports nothing from the model code, so ``pipeline.config`` can run
it while validating without an import circle.
"""

from __future__ import annotations


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
