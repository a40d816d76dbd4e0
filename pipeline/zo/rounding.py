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
``h`` is the round-to-nearest value; its neighbour ``n`` towards ``v`` is one 16-bit ulp away
from zero, or towards it (from ±0: the smallest subnormal of ``v``'s sign). ``d = v - h`` and
``n - h`` are exact in fp32 (Sterbenz), ``0 <= p <= 1/2``. Overflow stays round-to-nearest: next
to the largest finite value the neighbour is ``inf`` and ``p = 0``.

The neighbour is found in fp32's own bit pattern (int32 arithmetic on ``h.float()``), never by
viewing the 16-bit value as int16: inductor's CPU code generator does not vectorise 16-bit
bitcasts, and a kernel with one ran scalar, 13x slower than the same kernel without rounding
(6 vs 80 M elements/s, which made a bf16 update cost 22 s on the demo model). bf16 is fp32's top
half, so one bf16 ulp is ``1 << 16`` of the fp32 pattern; fp16's ulp is ``2^(max(e, -14) - 10)``
for ``|h|`` in ``[2^e, 2^(e+1))``, halved towards zero from a power of two above the subnormals.
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
    ``bits`` (one per element; their top 24 bits are the uniform draw), as fp32 values (exactly
    representable in ``dtype``)."""
    hf = v.to(dtype).float()  # compiled with emulate_precision_casts, or inductor folds this to v
    d = v - hf
    hb = hf.view(torch.int32)
    mag = hb & 0x7FFFFFFF
    away = (mag == 0) | ((d > 0) == (hb >= 0))
    if dtype == torch.bfloat16:
        step = torch.where(away, hb + 0x10000, hb - 0x10000)
        # from ±0: the smallest subnormal of d's sign
        n = torch.where(mag == 0, (d < 0).to(torch.int32) * (-(1 << 31)) + 0x10000, step)
        n = n.view(torch.float32)
    else:
        e = torch.clamp_min(mag >> 23, 113)  # biased fp32 exponent, fp16's subnormals at 2^-14
        halve = ~away & ((mag & 0x7FFFFF) == 0) & (e > 113)  # below a power of two: half the ulp
        ulp = ((e - 10 - halve.to(torch.int32)) << 23).view(torch.float32)
        n = hf + torch.where(d < 0, -ulp, ulp)
        n = torch.where(n == 0, hf * 0.0, n)  # towards zero from ±2^-24: a zero of h's sign
    p = torch.where(n.abs() > torch.finfo(dtype).max, 0.0, d / (n - hf))
    u = ((bits >> 8) & 0xFFFFFF).float() * INV_24
    return torch.where(u < p, n, hf)
