"""fp32 activations through a 16-bit or 4-bit model, without an fp32 copy of its weights.

ZO-Act's probe changes a layer's output by ``μ C' Vᵀ x``: added to a bf16 output, a change that
small is rounded to the output's precision and, further on, at every bf16 layer it passes, so the
loss difference that measures it is mostly rounding (:mod:`pipeline.models.adapters`). The
adapter therefore returns its output in fp32, and :class:`Fp32Flow`, attached to the model's
root, lets fp32 activations run on through the model's 16-bit (and 4-bit) layers in fp32:

- a function where a parameter meets an activation (``linear``, the norms, ``matmul``,
  attention) and that gets fp32 and 16-bit floating tensors together computes in fp32: the 16-bit
  ones are upcast for that call only (a transient fp32 copy of at most one weight, a linear
  layer's cut into row chunks of :data:`CHUNK_BYTES`); elementwise ops already promote;
- a bitsandbytes 4-bit layer computes in fp32 (its ``compute_dtype``), so it does not round its
  input back to 16 bits; it then also keeps its bias (if any) in fp32, bitsandbytes' own cast.

Layers before the first fp32 activation run as before. Costs: activations from the first adapted
layer on are fp32 (2x their 16-bit size, one block's at a time without autograd) and the matmuls
there are fp32 (on a GPU they forgo the 16-bit tensor cores: slower). An ``int8`` base rounds each
layer's input to fp16 inside bitsandbytes' int8 matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pipeline.models.chunked_linear import chunk_rows, linear_in_chunks

CHUNK_BYTES = 4 * 2**20  # the largest transient fp32 weight piece (and output part)
LOW = (torch.bfloat16, torch.float16)
MEET = {F.linear, F.layer_norm, F.group_norm, F.rms_norm, F.scaled_dot_product_attention,
        torch.matmul, torch.bmm, torch.baddbmm, torch.addmm, torch.Tensor.__matmul__}


def _dtypes(values) -> set[torch.dtype]:
    return {v.dtype for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _up(value):
    if isinstance(value, torch.Tensor) and value.dtype in LOW:
        return value.float()
    return value


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` in fp32 with the weight upcast in row chunks
    (:mod:`pipeline.models.chunked_linear`): each chunk's fp32 weight and its part of the
    output stay under ``CHUNK_BYTES``, written into one output tensor."""
    out_features, in_features = weight.shape[0], weight.shape[-1]
    rows = chunk_rows(x, in_features, 4, 4, CHUNK_BYTES)
    if rows >= out_features:
        return F.linear(x, _up(weight), _up(bias))
    return linear_in_chunks(x, out_features, rows, lambda a, b: (
        _up(weight[a:b]), None if bias is None else _up(bias[a:b])))


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MEET:
            dtypes = _dtypes([*args, *kwargs.values()])
            if torch.float32 in dtypes and dtypes & set(LOW):
                if func is F.linear:
                    bias = args[2] if len(args) > 2 else kwargs.get("bias")
                    return _linear(args[0], args[1], bias)
                args = tuple(_up(a) for a in args)
                kwargs = {k: _up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


class Fp32Flow:
    """Root hooks that run every forward of ``model`` under the fp32 rules above; 4-bit layers
    compute in fp32 while attached."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._four_bit = {m: m.compute_dtype for m in model.modules()
                          if hasattr(m, "compute_dtype") and hasattr(m.weight, "quant_state")}
        self._modes: list[_Mode] = []
        self._handles = []

    def attach(self) -> Fp32Flow:
        if not self._handles:
            for layer in self._four_bit:
                layer.compute_dtype = torch.float32
            self._handles = [
                self.model.register_forward_pre_hook(self._enter),
                self.model.register_forward_hook(self._exit, always_call=True),
            ]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer, dtype in self._four_bit.items():
            layer.compute_dtype = dtype

    def _enter(self, module, args):
        del module, args
        mode = _Mode()
        mode.__enter__()
        self._modes.append(mode)

    def _exit(self, module, args, output):
        del module, args
        self._modes.pop().__exit__(None, None, None)
        return output
