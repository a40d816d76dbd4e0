"""How updates land in the stored weights: ``θ ← SR((1 - ηλ)·θ + Σ_i c_i d_i)``.

The stored weights are never perturbed (:mod:`pipeline.zo.perturbation`), so an update starts
from ``θ`` itself, regenerates its directions once (one fused pass per shard for a dense ``z``)
and writes the new value in the storage dtype:

- fp32 storage: the fp32 value, as computed;
- bf16/fp16 storage without masters (the default): by **stochastic rounding**
  (:mod:`pipeline.zo.rounding`) with the bits of :func:`~pipeline.zo.rounding.rounding_seed` of
  the step's first direction seed, keyed by the parameter and the element's global index: an
  update of a tenth of an ulp moves a tenth of the elements by one ulp, so it is kept in
  expectation instead of being rounded away; deterministic, world-size invariant, replayable;
- with fp32 masters (``precision.master_weights=fp32``): the master takes the fp32 value and the
  stored weights become its round-to-nearest cast.

The fp32 arithmetic of an element is ``(θ·s) + c_1 d_1 + c_2 d_2 + ...`` in the terms' order
(``s = 1 - ηλ`` on decaying shards, skipped when 1), a function of the element alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from pipeline.zo import noise
from pipeline.zo.directions import Term, f32, z_blocks
from pipeline.zo.noise import BLOCK
from pipeline.zo.shards import ParamShard


def write_back(shard: ParamShard, offset: int, values: torch.Tensor, rounding: int | None) -> None:
    """Elements ``[offset, offset + len(values))`` of the shard's weights (master, or stored) take
    the fp32 ``values``: exactly in fp32, by stochastic rounding with the bits of ``rounding`` in
    bf16/fp16."""
    target = shard.weights[offset : offset + values.numel()]
    noise.round_into(target, values, rounding, shard.key, shard.start + offset, shard.total)


def _scale(shard: ParamShard, decay: float) -> float:
    return f32(1.0 - decay) if decay and shard.decay else 1.0


def update(shards: Iterable[ParamShard], terms: Sequence[Term], *, rounding: int | None,
           decay: float = 0.0) -> None:
    """``θ ← (1 - decay)·θ + Σ_i c_i d_i`` on every shard (``decay`` = η·λ applies only to shards
    with ``decay=True``, not biases or norms); ``rounding`` is the stochastic-rounding seed."""
    for shard in shards:
        s = _scale(shard, decay)
        target = shard.weights
        with torch.no_grad():
            if len(terms) == 1 and terms[0].seed is not None:
                _dense(shard, terms[0], s, target, rounding)
            elif len(terms) == 1:
                term, c = terms[0], terms[0].on(shard)
                for off, d in term.blocks(shard, 0, shard.numel):
                    v = target[off : off + d.numel()].to(torch.float32, copy=True)
                    if s != 1.0:
                        v.mul_(s)
                    write_back(shard, off, v.add_(d.mul_(c)), rounding)
            else:
                _sum(shard, terms, s, target, rounding)
            if shard.master is not None:
                shard.local.copy_(shard.master)


def _dense(shard: ParamShard, term: Term, s: float, target, rounding: int | None) -> None:
    """One fused pass: ``target = SR((target + z·0)·s + z·c)``."""
    c = term.on(shard)
    if shard.cache is None:
        noise.apply(target, target, term.seed, shard.key, shard.start, shard.total, 0.0, s, c,
                    kind=shard.noise, rounding=rounding)
    else:
        noise.apply_stored(target, target, shard.cache.get(term.seed, shard), shard.total, 0.0,
                           s, c, start=shard.start, key=shard.key, rounding=rounding)


def _sum(shard: ParamShard, terms: Sequence[Term], s: float, target, rounding) -> None:
    """Several directions, block by block: one rounding of the whole sum."""
    coeffs = [t.on(shard) for t in terms]
    for w0 in range(0, shard.numel, BLOCK):
        wl = min(BLOCK, shard.numel - w0)
        v = target[w0 : w0 + wl].to(torch.float32, copy=True)
        if s != 1.0:
            v.mul_(s)
        for term, c in zip(terms, coeffs):
            for off, d in term.blocks(shard, w0, wl):
                v[off : off + d.numel()].add_(d.mul_(c))
        write_back(shard, w0, v, rounding)


def estimate_blocks(shard: ParamShard, seeds: list[int], coeffs: list[float]
                    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(offset, θ, ĝ)`` block by block over a shard, for methods that feed MeZO's estimate
    ``ĝ = Σ_i coeffs[i]·z_i`` to another rule (ZO-Adam, ZO-SGD): each ``z_i`` is regenerated once
    (or read from the cache); ``θ`` is an fp32 copy of the block's weights (the master, or the
    stored values) and ``ĝ`` a fresh fp32 tensor. The caller writes the new ``θ`` with
    :func:`write_back`."""
    target = shard.weights
    gens = [z_blocks(s, shard) for s in seeds]
    for pieces in zip(*gens):
        off = pieces[0][0]
        zs = [z for _, z in pieces]
        w = target[off : off + zs[0].numel()].to(torch.float32, copy=True)
        grad = zs[0].mul_(coeffs[0])
        for c, z in zip(coeffs[1:], zs[1:]):
            grad.add_(z.mul_(c))
        yield off, w, grad
