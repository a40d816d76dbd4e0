"""What a perturbed forward sees: ``θ + Σ_i α_i d_i``, written where the backend gathers or runs.

A method never moves the stored weights to measure a loss. It asks its backend for
``loss(batch, at=Perturbation(...))`` and the backend decides how the perturbation reaches the
weights the forward reads (DESIGN.md, Precision): the single backend swaps a transient perturbed
copy of one module's weights in for that module's forward, FSDP2 writes it into its all-gather
input, ZeRO-3 swaps a transient perturbed partition in for the gather. In every case
:meth:`Perturbation.write` fills a buffer for one shard's elements from the shard's own stored
values (its fp32 master when it has one) and the stored weights are never written, so the
restore is exact by construction in every dtype and nothing needs to be taken back.

The value of element ``j`` is ``cast(θ_j + Σ_i α_i d_ij)``: the sum in fp32 in the terms' order,
then round-to-nearest into the buffer's dtype (the storage dtype). It is a function of the element
alone, so it is bitwise the same whichever rank or buffer computes it. One dense term is one fused
pass (:func:`pipeline.zo.noise.apply`); pieces and several terms go block by block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.zo import noise
from pipeline.zo.directions import Pieces, Term
from pipeline.zo.noise import BLOCK
from pipeline.zo.shards import ParamShard


class Perturbation:
    """``θ + Σ_i α_i d_i`` (the terms' ``coeff`` are the ``α_i``)."""

    def __init__(self, terms: Sequence[Term]):
        if not terms:
            raise ValueError("a Perturbation needs at least one term")
        self.terms = tuple(terms)

    @classmethod
    def dense(cls, seed: int, alpha: float) -> Perturbation:
        """``θ + α z`` with ``z`` the dense direction of ``seed``."""
        return cls([Term(alpha, seed=seed)])

    @classmethod
    def along(cls, pieces: Pieces, alpha: float) -> Perturbation:
        """``θ + α d`` with ``d`` given by ``pieces``."""
        return cls([Term(alpha, pieces=pieces)])

    def write(self, shard: ParamShard, dst: torch.Tensor, offset: int = 0) -> None:
        """``dst`` (1-D) = the perturbed values of elements ``[offset, offset + len(dst))`` of
        ``shard``, in ``dst``'s dtype. ``dst`` must not alias the shard's stored values."""
        n = dst.numel()
        if n == 0:
            return
        src = (shard.master if shard.master is not None else shard.local)[offset : offset + n]
        with torch.no_grad():
            if len(self.terms) == 1:
                self._write_one(self.terms[0], shard, dst, src, offset)
            else:
                self._write_sum(shard, dst, src, offset)

    @staticmethod
    def _write_one(term: Term, shard: ParamShard, dst, src, offset: int) -> None:
        alpha, n = term.on(shard), dst.numel()
        if term.seed is not None and shard.cache is None:
            noise.apply(dst, src, term.seed, shard.key, shard.start + offset, shard.total, alpha,
                        kind=shard.noise)
        elif term.seed is not None:
            z = shard.cache.get(term.seed, shard)[offset : offset + n]
            noise.apply_stored(dst, src, z, shard.total, alpha)
        else:
            for off, d in term.blocks(shard, offset, n):
                m = d.numel()
                dst[off : off + m].copy_(d.mul_(alpha).add_(src[off : off + m]))

    def _write_sum(self, shard: ParamShard, dst, src, offset: int) -> None:
        alphas = [t.on(shard) for t in self.terms]
        for w0 in range(0, dst.numel(), BLOCK):
            wl = min(BLOCK, dst.numel() - w0)
            acc = src[w0 : w0 + wl].to(torch.float32, copy=True)
            for term, alpha in zip(self.terms, alphas):
                for off, d in term.blocks(shard, offset + w0, wl):
                    acc[off : off + d.numel()].add_(d.mul_(alpha))
            dst[w0 : w0 + wl].copy_(acc)
