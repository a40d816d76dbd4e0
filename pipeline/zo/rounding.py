"""Stochastic rounding of fp32 values into bf16/fp16 storage, with counter-hash bits.

A 16-bit weight cannot hold a MeZO-sized update: ``η g z`` is below half an ulp of most weights,
so round-to-nearest drops it (measured: most bf16 elements unchanged after a step). Stochastic
rounding (SR) keeps it in expectation: a value ``v`` between two neighbours ``h`` (the nearest)
and ``n`` (the other one, towards ``v``) becomes ``n`` with probability ``p = (v - h) / (n - h)``
and ``h`` otherwise, so ``E[SR(v)] = h + p (n - h) = v``.

The uniform draw of element ``i`` is the top 24 bits of the counter hash of its global index
(:func:`pipeline.zo.noise_math.hash32`) under key words that the update's seed and the
parameter's name give through :func:`rounding_key` (a stream separate from the noise's ``z``):
deterministic, the same at any world size and on every replay, and independent of ``z``.

Everything is integer and fp32 arithmetic on the element alone (no ``nextafter``: inductor does
not compile it correctly for 16-bit types), so a slice of a tensor rounds exactly as the whole.
``h`` is the round-to-nearest value; its neighbour towards ``v`` is one step of the sign-magnitude
bit pattern (away from zero, or towards it; from ±0 to the smallest subnormal of ``v``'s sign).
``d = v - h`` and ``n - h`` are exact in fp32 (Sterbenz), ``0 <= p <= 1/2``. Overflow stays
round-to-nearest: next to the largest finite value the neighbour is ``inf`` and ``p = 0``.
"""

from __future__ import annotations

import torch

from pipeline.zo.seeds import mix

SR_TAG = 0x5352_4E44  # "SRND": the rounding stream of a seed is mix(seed, SR_TAG)
INV_24 = 1.0 / (1 << 24)
ROUNDED = (torch.bfloat16, torch.float16)  # storage dtypes that round stochastically


def rounding_seed(seed: int) -> int:
    """The seed of the rounding stream of an update whose direction seed is ``seed``."""
    return mix(seed, SR_TAG)


def stochastic_round(v: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v`` (fp32) rounded stochastically to ``dtype`` (bf16 or fp16) with the int32 hash words
    ``bits`` (one per element; their top 24 bits are the uniform draw)."""
    h = v.to(dtype)
    hf = h.float()  # compiled with emulate_precision_casts, or inductor folds this to v
    d = v - hf
    hb = h.view(torch.int16).to(torch.int32) & 0xFFFF
    sign, mag = hb & 0x8000, hb & 0x7FFF
    away = (mag == 0) | ((d > 0) == (sign == 0))
    n_mag = torch.where(away, mag + 1, mag - 1)
    n_sign = torch.where(mag == 0, torch.where(d < 0, 0x8000, 0), sign)
    nb = n_sign | n_mag
    nb = torch.where(nb >= 0x8000, nb - 0x10000, nb).to(torch.int16)
    n = nb.view(dtype)
    p = d / (n.float() - hf)
    u = ((bits >> 8) & 0xFFFFFF).float() * INV_24
    return torch.where(u < p, n, h)
