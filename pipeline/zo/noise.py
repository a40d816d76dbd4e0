"""Counter-based, sharding-invariant noise: Gaussian (default) or Rademacher.

Contract (DESIGN.md): ``gaussian(s, k, a, n, total) == gaussian(s, k, 0, total)[a:a+n]`` bitwise,
for every slice, so a rank that owns elements ``[a, a+n)`` of a parameter regenerates exactly its
part of the perturbation, whatever the world size.

Construction (:mod:`pipeline.zo.noise_math`): element ``i`` of the direction of ``(seed, key)`` is
a hash of ``(mix(seed, key), i)`` turned into N(0, 1) by Box-Muller (or ±1), computed from its
own index alone. :func:`apply` adds it to weights in one fused pass with no noise buffer
(:mod:`pipeline.zo.noise_compile`); :func:`gaussian` and :func:`iter_blocks` return the values.

Kernel path: parameters of at least ``COMPILE_MIN`` elements (global size, the same on every
rank) use the compiled kernel, smaller ones the eager reference (not worth a compile). The two
agree to ~1 ulp, not bitwise, so the rule depends only on the parameter, never on the shard.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from pipeline.zo import noise_compile, noise_math
from pipeline.zo.rounding import ROUNDED
from pipeline.zo.seeds import mix

BLOCK = 1 << 18  # piece length of iter_blocks (pieces start on multiples of BLOCK)
KINDS = ("gaussian", "rademacher")  # the distributions of z (kernels: also "_sr", stored, round)
COMPILE_MIN = int(os.environ.get("ZO_NOISE_COMPILE_MIN", 1 << 16))
MAX_TOTAL = (1 << 31) - 2  # int32 element indices


def _signed(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def key_words(seed: int, key: int) -> tuple[int, int]:
    """The two int32 hash key words of ``(seed, key)``."""
    m = mix(seed, key)
    return _signed(m & 0xFFFFFFFF), _signed(m >> 32)


def uses_compiled(total: int, kind: str = "gaussian", device: str | torch.device = "cpu") -> bool:
    """Whether elements of a parameter of ``total`` values come from the compiled kernel."""
    if total < COMPILE_MIN:
        return False
    return noise_compile.kernel(kind, torch.device(device)) is not None


def _sr_words(rounding: int | None, key: int, dst: torch.Tensor) -> torch.Tensor | None:
    """Rounding key words for a 16-bit ``dst`` when an update rounds stochastically, else None."""
    if rounding is None or dst.dtype not in ROUNDED:
        return None
    return torch.tensor(key_words(rounding, key), dtype=torch.int32, device=dst.device)


def _path(kind: str, total: int, device: torch.device):
    """The kernel of ``kind`` for a parameter of ``total`` values: compiled or the reference."""
    if uses_compiled(total, kind, device):
        return noise_compile.kernel(kind, device)
    return noise_math.REFERENCE[kind]


def apply(dst: torch.Tensor, src: torch.Tensor, seed: int, key: int, start: int, total: int,
          a: float, s: float = 1.0, b: float = 0.0, *, kind: str = "gaussian",
          rounding: int | None = None) -> None:
    """``dst = ((src + z·a)·s + z·b)`` in one pass, ``z`` = elements ``[start, start+n)`` of the
    direction of ``(seed, key)``. ``dst`` and ``src`` are 1-D of the same length and device
    (``dst`` may be ``src``; its dtype is the stored one). ``a, s, b`` are used as fp32.

    ``rounding`` (a seed, :func:`pipeline.zo.rounding.rounding_seed`): a bf16/fp16 ``dst`` gets
    the fp32 value by stochastic rounding with that seed's bits; otherwise round-to-nearest."""
    n = dst.numel()
    if n == 0:
        return
    if kind not in KINDS:
        raise ValueError(f"noise kind {kind!r}: expected one of {', '.join(KINDS)}")
    if start < 0 or start + n > total:
        raise ValueError(f"range [{start}, {start + n}) outside a parameter of {total} values")
    if total > MAX_TOTAL:
        raise ValueError(f"a parameter of {total} values is beyond the noise's int32 index range")
    device = dst.device
    kr = _sr_words(rounding, key, dst)
    k = torch.tensor(key_words(seed, key), dtype=torch.int32, device=device)
    coef = torch.tensor([a, s, b], dtype=torch.float32, device=device)
    base = torch.tensor(start, dtype=torch.int32, device=device)
    fn = _path(kind, total, device)
    with torch.no_grad():
        if n == 1 and fn is not noise_math.REFERENCE[kind]:
            # a 1-element call would get its own (differently vectorised) graph: take the
            # element from a 2-element generation, then the same fp32 arithmetic
            z = torch.zeros(2, device=device)  # index start + 1 <= MAX_TOTAL + 1 is fine
            fn(z, z, base, k, torch.tensor([1.0, 1.0, 0.0], device=device))
            v = (src + z[:1] * coef[0]) * coef[1] + z[:1] * coef[2]
            if kr is None:
                dst.copy_(v)
            else:
                noise_math.round_into(dst, v, base, kr)
            return
        if kr is None:
            fn(dst, src, base, k, coef)
        else:
            _path(kind + "_sr", total, device)(dst, src, base, k, kr, coef)


def apply_stored(dst: torch.Tensor, src: torch.Tensor, z: torch.Tensor, total: int,
                 a: float, s: float = 1.0, b: float = 0.0, *, start: int = 0, key: int = 0,
                 rounding: int | None = None) -> None:
    """:func:`apply` with a stored ``z`` (``method.cache_noise``): the same fp32 operations by the
    same path rule, so the result is bitwise that of regenerating ``z`` (``start`` and ``key``
    locate the elements for the rounding bits)."""
    if dst.numel() == 0:
        return
    kr = _sr_words(rounding, key, dst)
    coef = torch.tensor([a, s, b], dtype=torch.float32, device=dst.device)
    single = dst.numel() == 1
    with torch.no_grad():
        if kr is None:
            fn = noise_math.apply_stored if single else _path("stored", total, dst.device)
            fn(dst, src, z, coef)
            return
        base = torch.tensor(start, dtype=torch.int32, device=dst.device)
        fn = noise_math.apply_stored_sr if single else _path("stored_sr", total, dst.device)
        fn(dst, src, z, base, kr, coef)


def round_into(dst: torch.Tensor, values: torch.Tensor, rounding: int | None, key: int,
               start: int, total: int) -> None:
    """``dst = values`` (fp32) in ``dst``'s dtype: stochastically rounded with the bits of
    ``rounding`` for elements ``[start, start + n)`` when ``dst`` is bf16/fp16 and ``rounding``
    is given, else round-to-nearest."""
    kr = _sr_words(rounding, key, dst)
    with torch.no_grad():
        if kr is None:
            dst.copy_(values)
            return
        base = torch.tensor(start, dtype=torch.int32, device=dst.device)
        fn = noise_math.round_into if dst.numel() == 1 else _path("round", total, dst.device)
        fn(dst, values, base, kr)


def noise(seed: int, key: int, start: int, numel: int, total: int | None = None, *,
          kind: str = "gaussian", device: str | torch.device = "cpu") -> torch.Tensor:
    """Elements ``[start, start+numel)`` of the ``kind`` direction of ``(seed, key)``, fp32, 1-D."""
    total = start + numel if total is None else total
    out = torch.zeros(numel, dtype=torch.float32, device=device)
    apply(out, out, seed, key, start, total, 1.0, 1.0, 0.0, kind=kind)
    return out


def gaussian(seed: int, key: int, start: int, numel: int, total: int | None = None, *,
             device: str | torch.device = "cpu") -> torch.Tensor:
    """Elements ``[start, start+numel)`` of the N(0, 1) vector of ``(seed, key)``, fp32, 1-D.

    ``total`` is the parameter's global element count; it defaults to ``start + numel`` (the
    whole parameter), and must be the same for every call that should agree.
    """
    return noise(seed, key, start, numel, total, kind="gaussian", device=device)


def iter_blocks(
    seed: int, key: int, start: int, numel: int, total: int, *, kind: str = "gaussian",
    device: str | torch.device = "cpu",
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(offset, noise)`` pieces covering elements ``[start, start+numel)``.

    ``offset`` is relative to ``start``; each piece is a fresh fp32 tensor on ``device`` the
    caller may modify; pieces end on multiples of ``BLOCK`` (global), so two ranges with the same
    ``start`` and ``numel`` are cut alike.
    """
    if numel <= 0:
        return
    if start < 0 or start + numel > total:
        raise ValueError(f"range [{start}, {start + numel}) outside a parameter of {total} values")
    end = start + numel
    lo = start
    while lo < end:
        hi = min(end, (lo // BLOCK + 1) * BLOCK)
        yield lo - start, noise(seed, key, lo, hi - lo, total, kind=kind, device=device)
        lo = hi
