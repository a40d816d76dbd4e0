"""Directions on ParamShards: the vocabulary perturbations and updates are written in.

A ZO method combines directions ``d_i`` with coefficients: ``θ + Σ α_i d_i`` is what a forward
sees (:mod:`pipeline.zo.perturbation`), ``θ ← θ + Σ c_i d_i`` is an update
(:mod:`pipeline.zo.update`). A direction is either

- **dense**: the counter-based ``z`` of a seed (:mod:`pipeline.zo.noise`, in the shard's noise
  kind, from the step's :class:`~pipeline.zo.noise_cache.NoiseCache` when there is one), applied
  by ONE fused pass per shard; or
- **pieces**: a structured direction (low-rank ``U Vᵀ``, activation-guided ``R Aᵀ``, P-GAP's
  ``U Z Vᵀ``) given by a function ``pieces(shard, offset, numel)`` that yields ``(offset, piece)``
  fp32 tensors covering elements ``[offset, offset + numel)`` of the shard (offsets relative to
  ``offset``), fresh tensors the caller may modify.

Every elementwise operation is multiply-then-add in a fixed order, so the value of an element does
not depend on which rank holds it or where its shard starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from pipeline.zo.noise import BLOCK, iter_blocks
from pipeline.zo.shards import ParamShard

Pieces = Callable[[ParamShard, int, int], Iterable[tuple[int, torch.Tensor]]]
Coeff = float | Callable[[ParamShard], float]


def f32(x: float) -> float:
    """Round a Python scalar to fp32 once, so every kernel path multiplies by the same number."""
    return float(torch.tensor(x, dtype=torch.float32))


@dataclass(frozen=True)
class Term:
    """``coeff · d``: ``d`` the dense direction of ``seed``, or the direction ``pieces`` gives.
    ``coeff`` may depend on the shard (LOZO's ``1/r`` on matrices)."""

    coeff: Coeff
    seed: int | None = None
    pieces: Pieces | None = None

    def __post_init__(self) -> None:
        if (self.seed is None) == (self.pieces is None):
            raise ValueError("a Term has either a seed (dense z) or pieces, not both")

    def on(self, shard: ParamShard) -> float:
        return f32(self.coeff(shard) if callable(self.coeff) else self.coeff)

    def blocks(self, shard: ParamShard, offset: int, numel: int
               ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, d)`` pieces of this term's direction over ``[offset, offset + numel)`` of
        the shard, on its device, cut at multiples of ``BLOCK`` for dense ``z``."""
        if self.pieces is not None:
            for off, piece in self.pieces(shard, offset, numel):
                yield off, _on(piece, shard)
            return
        yield from z_blocks(self.seed, shard, offset, numel)


def _on(z: torch.Tensor, shard: ParamShard) -> torch.Tensor:
    """A piece on another device than the shard's receives a copy."""
    return z if z.device == shard.local.device else z.to(shard.local.device, non_blocking=True)


def z_blocks(seed: int, shard: ParamShard, offset: int = 0, numel: int | None = None
             ) -> Iterator[tuple[int, torch.Tensor]]:
    """The dense direction of ``seed`` over ``[offset, offset + numel)`` of a shard (its noise
    kind, on its device, from its cache when it has one): ``(offset, z)`` fresh fp32 pieces."""
    numel = shard.numel - offset if numel is None else numel
    if shard.cache is not None:
        z = shard.cache.get(seed, shard)
        for off in range(0, numel, BLOCK):
            yield off, z[offset + off : offset + min(off + BLOCK, numel)].clone()
        return
    yield from iter_blocks(seed, shard.key, shard.start + offset, numel, shard.total,
                           kind=shard.noise, device=shard.local.device)


def dense_pieces(seed: int) -> Pieces:
    """The dense direction of ``seed`` as a ``pieces`` function (for methods that mix kinds)."""
    return lambda shard, offset, numel: z_blocks(seed, shard, offset, numel)
