"""The counter-based noise as plain PyTorch ops: the reference, and what torch.compile fuses.

Element ``i`` (the global flat index in its parameter) of the direction of ``(seed, key)`` is a
pure function of ``i`` and two 32-bit words ``k = (k0, k1)`` derived from ``mix(seed, key)``:

- hash: ``H(x) = f(f(x ^ k0) ^ k1)`` with ``f`` the "lowbias32" integer finaliser (xor-shift,
  multiply, xor-shift, multiply, xor-shift; a bijection of 32-bit words), in int32 arithmetic
  (multiplication wraps; right shifts are made logical with a mask);
- Gaussian: elements ``2j`` and ``2j+1`` are the two outputs of one Box-Muller pair,
  ``u1 = (H(2j) >> 8 + 1) / 2^24`` in ``(0, 1]``, ``θ = 2π (H(2j+1) >> 8) / 2^24``,
  ``z_{2j} = √(-2 ln u1) cos θ`` and ``z_{2j+1} = √(-2 ln u1) cos(θ - π/2)`` (= its sine), so
  both outputs of a pair are used and every element is computed from its own index alone
  (|z| ≤ √(2 ln 2^24) ≈ 5.77);
- Rademacher: ``±1`` from the top bit of ``H(i)``.

:func:`apply` writes ``dst = ((src + z·a)·s + z·b)`` in the storage dtype of ``dst`` (``dst`` may
be ``src``): one pass, no noise buffer once compiled. The ``_sr`` kernels write the same fp32 value
into a bf16/fp16 ``dst`` by stochastic rounding (:mod:`pipeline.zo.rounding`), the uniform draw of
element ``i`` being ``H(i)`` under the rounding key words ``kr``. Every operation is elementwise on
the element's own index, so a slice of a parameter gets exactly the slice of the whole.
"""

from __future__ import annotations

import math

import torch

from pipeline.zo.rounding import stochastic_round

M1 = 0x7FEB352D
M2 = 0x846CA68B - (1 << 32)  # the same 32-bit pattern as a signed int32 constant
TWO_PI_24 = 2 * math.pi / (1 << 24)
INV_24 = 1.0 / (1 << 24)
HALF_PI = math.pi / 2


def _f(x: torch.Tensor) -> torch.Tensor:
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * M2
    return x ^ ((x >> 16) & 0xFFFF)


def hash32(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``H(x)`` for int32 counters ``x`` and the int32 key words ``k[0], k[1]``."""
    return _f(_f(x ^ k[0]) ^ k[1])


def gaussian_at(i: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """N(0, 1) fp32 values of the int32 global indices ``i``."""
    c = i & -2
    u1 = (((hash32(c, k) >> 8) & 0xFFFFFF) + 1).float() * INV_24
    theta = ((hash32(c + 1, k) >> 8) & 0xFFFFFF).float() * TWO_PI_24 - (i & 1).float() * HALF_PI
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)


def rademacher_at(i: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """±1 fp32 values of the int32 global indices ``i``."""
    return (1 - 2 * ((hash32(i, k) >> 31) & 1)).float()


def _index(dst: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return base + torch.arange(dst.shape[0], dtype=torch.int32, device=dst.device)


def _apply(at, dst: torch.Tensor, src: torch.Tensor, base: torch.Tensor, k: torch.Tensor,
           coef: torch.Tensor) -> None:
    z = at(_index(dst, base), k)
    dst.copy_((src + z * coef[0]) * coef[1] + z * coef[2])


def _apply_sr(at, dst, src, base, k, kr, coef) -> None:
    i = _index(dst, base)
    z = at(i, k)
    v = (src + z * coef[0]) * coef[1] + z * coef[2]
    dst.copy_(stochastic_round(v, hash32(i, kr), dst.dtype))


def apply_gaussian(dst, src, base, k, coef) -> None:
    """``dst = ((src + z·coef[0])·coef[1] + z·coef[2])``, ``z`` Gaussian at ``base + arange``."""
    _apply(gaussian_at, dst, src, base, k, coef)


def apply_rademacher(dst, src, base, k, coef) -> None:
    """As :func:`apply_gaussian` with Rademacher ``z``."""
    _apply(rademacher_at, dst, src, base, k, coef)


def apply_stored(dst, src, z, coef) -> None:
    """As :func:`apply_gaussian` with a given (cached) ``z``: the same fp32 operations."""
    dst.copy_((src + z * coef[0]) * coef[1] + z * coef[2])


def apply_gaussian_sr(dst, src, base, k, kr, coef) -> None:
    """:func:`apply_gaussian` into a 16-bit ``dst`` by stochastic rounding with key words ``kr``."""
    _apply_sr(gaussian_at, dst, src, base, k, kr, coef)


def apply_rademacher_sr(dst, src, base, k, kr, coef) -> None:
    """:func:`apply_rademacher` into a 16-bit ``dst`` by stochastic rounding."""
    _apply_sr(rademacher_at, dst, src, base, k, kr, coef)


def apply_stored_sr(dst, src, z, base, kr, coef) -> None:
    """:func:`apply_stored` into a 16-bit ``dst`` by stochastic rounding."""
    v = (src + z * coef[0]) * coef[1] + z * coef[2]
    dst.copy_(stochastic_round(v, hash32(_index(dst, base), kr), dst.dtype))


def round_into(dst, v, base, kr) -> None:
    """``dst = SR(v)``: fp32 values ``v`` into a 16-bit ``dst`` (elements ``base + arange``)."""
    dst.copy_(stochastic_round(v, hash32(_index(dst, base), kr), dst.dtype))


REFERENCE = {"gaussian": apply_gaussian, "rademacher": apply_rademacher, "stored": apply_stored,
             "gaussian_sr": apply_gaussian_sr, "rademacher_sr": apply_rademacher_sr,
             "stored_sr": apply_stored_sr, "round": round_into}
