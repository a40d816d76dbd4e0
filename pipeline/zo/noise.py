"""Counter-based, sharding-invariant Gaussian noise.

Contract (DESIGN.md): ``gaussian(s, k, a, n, total) == gaussian(s, k, 0, total)[a:a+n]`` bitwise,
for every slice, so a rank that owns elements ``[a, a+n)`` of a parameter regenerates exactly its
part of the perturbation, whatever the world size.

Construction: the flat parameter is cut into fixed blocks of ``BLOCK`` elements. Block ``b`` is
drawn at full length by ``torch.randn`` from a generator seeded with ``mix(seed, key, b)`` and then
sliced (a shorter ``randn`` draw is not a prefix of a longer one, so a block is never drawn short).
The last block of a parameter is ``total - b*BLOCK`` long, so a 576-element norm weight costs 576
draws, not 2^18; ``total`` is the parameter's global element count, which every shard knows.
2^18-element blocks stay in cache and ran faster here than longer draws (bench/noise_throughput.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipeline.zo.seeds import mix

BLOCK = 1 << 18


def _block(seed: int, key: int, index: int, total: int) -> torch.Tensor:
    length = min(BLOCK, total - index * BLOCK)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(mix(seed, key, index))
    return torch.randn(length, generator=gen, dtype=torch.float32)


def iter_blocks(
    seed: int, key: int, start: int, numel: int, total: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(offset, noise)`` pieces covering elements ``[start, start+numel)``.

    ``offset`` is relative to ``start``; each piece is an fp32 CPU tensor the caller may modify.
    Only the blocks the range overlaps are generated.
    """
    if numel <= 0:
        return
    if start < 0 or start + numel > total:
        raise ValueError(f"range [{start}, {start + numel}) outside a parameter of {total} values")
    end = start + numel
    for index in range(start // BLOCK, (end - 1) // BLOCK + 1):
        b0 = index * BLOCK
        lo, hi = max(start, b0), min(end, b0 + BLOCK)
        noise = _block(seed, key, index, total)
        yield lo - start, noise[lo - b0 : hi - b0]


def gaussian(seed: int, key: int, start: int, numel: int, total: int | None = None) -> torch.Tensor:
    """Elements ``[start, start+numel)`` of the N(0, 1) vector of ``(seed, key)``, fp32, 1-D.

    ``total`` is the parameter's global element count; it defaults to ``start + numel`` (the
    whole parameter), and must be the same for every call that should agree.
    """
    total = start + numel if total is None else total
    out = torch.empty(numel, dtype=torch.float32)
    for offset, piece in iter_blocks(seed, key, start, numel, total):
        out[offset : offset + piece.numel()] = piece
    return out
