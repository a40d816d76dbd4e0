"""A frozen low-bit base (``model.quantization``): bitsandbytes through transformers.

``nf4`` / ``fp4`` load every ``nn.Linear`` but the LM head as ``bnb.nn.Linear4bit`` (double
quantization, compute in ``model.dtype``), ``int8`` as ``bnb.nn.Linear8bitLt``; embeddings and
norms stay in ``model.dtype``. bitsandbytes 0.50 runs 4-bit on CPU as well as CUDA.

CPU kernels on machines with AVX512-BF16: ``Linear4bit`` then takes a fused path that, on the
first forward in eval mode, repacks ``weight.data`` in place into a blocked layout (another shape
and byte order) and asserts ``out_features % 32 == 0``. Rather than rely on either, the
documented per-layer flag ``support_avx512bf16_for_cpu = False`` is cleared on every 4-bit layer
(:func:`keep_layout`): the generic dequantize-then-matmul path runs, the stored 4-bit weight
keeps its layout for good, and any width works. On the demo model this path was also the faster
one (0.58 s vs 0.67 s per forward, 4 x 64 tokens, one thread).
"""

from __future__ import annotations

import logging

import torch

QUANTIZED = ("nf4", "fp4", "int8")
FUSED_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward"


def _drop_fused_kernel_warning(record: logging.LogRecord) -> bool:
    """bitsandbytes warns at import on AVX512-BF16 CPUs that the optional ``kernels`` package
    (its fused 4-bit kernel) is missing. We never take that path (:func:`keep_layout`), so the
    warning only alarms; every other bitsandbytes message passes."""
    return not str(record.msg).startswith(FUSED_KERNEL_WARNING)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_fused_kernel_warning)


def bnb_config(kind: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def keep_layout(model: torch.nn.Module) -> int:
    """Turn off the AVX512-BF16 in-place repack on every 4-bit layer; returns how many."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_quantized(path: str, kind: str, dtype: torch.dtype, device: torch.device):
    """The model with a ``kind`` base on ``device``, every weight frozen."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=bnb_config(kind, dtype),
        device_map={"": str(device)},
    )
    keep_layout(model)
    return model
