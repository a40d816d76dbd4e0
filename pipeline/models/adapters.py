"""Adapters that add a trainable low-rank term to a frozen ``nn.Linear``.

:class:`CoefficientAdapter` is ZO-Act's (arXiv 2607.01125, reconstruction in METHODS.md):
``y = W x + C (Vᵀ x)`` with the layer's weight ``W`` (and bias) untouched, so ``W`` may be
frozen, sharded (FSDP2, ZeRO-3: the hook sees the layer's full output on this rank's
micro-batch) or quantized. ``V`` (in, r) is a fixed basis and ``C`` (out, r) the coefficients,
both fp32 and replicated. It is a forward hook, added by :meth:`attach` and removed by
:meth:`detach`; the effective weight is ``W + C Vᵀ``.

Arithmetic: ``p = Vᵀ x`` (in the input's dtype for 16-bit inputs, so no fp32 copy of the whole
input is made; in fp32 otherwise), then ``C p`` in fp32, added to the output upcast to fp32 (in
place where the output already is fp32): the hook returns fp32. Why: cast back to a 16-bit output,
the ``μ``-sized change of a probe is rounded to the output's precision (bf16 keeps 8 bits), and
again at every 16-bit layer after it, so the loss difference measures mostly rounding: the
projected gradients on a bf16 (fp16, NF4) base were 13 % (1.2 %, 84 %) off those of the same
weights computed in fp32 (tests/test_zoact.py). A model whose adapted layers are 16-bit or 4-bit
therefore runs on in fp32 from the first adapted layer (:mod:`pipeline.models.fp32_flow`, attached
by ZO-Act with the adapters; the weights stay as stored): within 0.5 % of fp32. Lesser fixes fall
short: on the demo model in bf16 (8 probes, the same V and C, against its weights computed in fp32)
the error was 70 % before, 68 % with fp32 logits alone, 23 % with an fp32 residual stream but
16-bit matmuls, and 0.6 % with fp32 from the first adapted layer on. An fp32 model is unchanged,
and with ``C = 0`` its output is bitwise the unadapted one (for finite outputs).
"""

from __future__ import annotations

import torch


class CoefficientAdapter:
    def __init__(self, module: torch.nn.Module, basis: torch.Tensor, coef: torch.Tensor):
        weight = module.weight
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        self.module = module
        self.basis = basis.detach().to(device, torch.float32).contiguous()  # V (in, r)
        self.coef = coef.detach().to(device, torch.float32).clone()  # C (out, r), written in place
        self._handle = None

    def attach(self) -> CoefficientAdapter:
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def set(self, coef: torch.Tensor) -> None:
        """Write ``C`` (an (out, r) tensor, any device) into the adapter."""
        self.coef.copy_(coef)

    def _hook(self, module, args, output):
        del module
        x = args[0]
        if x.dtype == torch.float32:
            p = x @ self.basis
        else:
            p = (x @ self.basis.to(x.dtype)).float()
        # in place: on an fp32 output (the fp32 flow) this spares one output-sized temporary;
        # the same arithmetic as ``output.float() + p @ self.coef.T``
        return output.float().add_(p @ self.coef.T)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + C Vᵀ`` in fp32 (for export into a plain model)."""
        return weight.float() + (self.coef @ self.basis.T).to(weight.device)
