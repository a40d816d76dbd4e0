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
from pipeline.zo.seeds import mix

BLOCK = 1 << 18  # piece length of iter_blocks (pieces start on multiples of BLOCK)
KINDS = ("gaussian", "rademacher")
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


def apply(dst: torch.Tensor, src: torch.Tensor, seed: int, key: int, start: int, total: int,
          a: float, s: float = 1.0, b: float = 0.0, *, kind: str = "gaussian") -> None:
    """``dst = ((src + z·a)·s + z·b)`` in one pass, ``z`` = elements ``[start, start+n)`` of the
    direction of ``(seed, key)``. ``dst`` and ``src`` are 1-D of the same length and device
    (``dst`` may be ``src``; its dtype is the stored one). ``a, s, b`` are used as fp32."""
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
    fn = noise_math.REFERENCE[kind]
    if uses_compiled(total, kind, device):
        fn = noise_compile.kernel(kind, device)
    k = torch.tensor(key_words(seed, key), dtype=torch.int32, device=device)
    coef = torch.tensor([a, s, b], dtype=torch.float32, device=device)
    with torch.no_grad():
        if n == 1 and fn is not noise_math.REFERENCE[kind]:
            # a 1-element call would get its own (differently vectorised) graph: take the
            # element from a 2-element generation, then the same fp32 arithmetic
            z = torch.zeros(2, device=device)  # index start + 1 <= MAX_TOTAL + 1 is fine
            fn(z, z, torch.tensor(start, dtype=torch.int32, device=device), k,
               torch.tensor([1.0, 1.0, 0.0], device=device))
            z = z[:1]
            dst.copy_((src + z * coef[0]) * coef[1] + z * coef[2])
            return
        fn(dst, src, torch.tensor(start, dtype=torch.int32, device=device), k, coef)


def apply_stored(dst: torch.Tensor, src: torch.Tensor, z: torch.Tensor, total: int,
                 a: float, s: float = 1.0, b: float = 0.0) -> None:
    """:func:`apply` with a stored ``z`` (``method.cache_noise``): the same fp32 operations by the
    same path rule, so the result is bitwise that of regenerating ``z``."""
    if dst.numel() == 0:
        return
    fn = noise_math.apply_stored
    if uses_compiled(total, "stored", dst.device) and dst.numel() > 1:
        fn = noise_compile.kernel("stored", dst.device)
    coef = torch.tensor([a, s, b], dtype=torch.float32, device=dst.device)
    with torch.no_grad():
        fn(dst, src, z, coef)


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
