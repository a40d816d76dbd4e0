"""Moving the stored weights along a regenerated direction, with or without fp32 masters.

A method says where the stored weights should be (``θ + α z`` for the direction of ``seed``) and
this module gets them there by regenerating ``z`` (no buffer of model size):

- without a master, the stored tensor is moved in place: ``w += (new - current) · z``. This is
  MeZO's arithmetic; in floating point ``θ + εz - 2εz + εz`` is not exactly ``θ``, so weights drift
  by about an ulp per step (measured in bench/restore_drift.py).
- with an fp32 master, the stored weights are written as ``cast(master + α z)`` and restored as
  ``cast(master)`` without regenerating anything, so a step with learning rate 0 is bitwise exact.

For the dense direction of a seed each shard costs ONE fused pass ``dst = ((src + z·a)·s + z·b)``
that computes ``z`` from the element indices (:func:`pipeline.zo.noise.apply`, in the shard's
noise kind), or reads it from the step's :class:`~pipeline.zo.noise_cache.NoiseCache` with the
same fp32 operations. ``pieces`` directions (low-rank, activation-guided methods) go block by
block.

Every elementwise operation is multiply-then-add in a fixed order, so the result of an element does
not depend on which rank holds it or where its shard starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from pipeline.zo import noise
from pipeline.zo.noise import BLOCK, iter_blocks
from pipeline.zo.shards import ParamShard


def _on(z, shard: ParamShard):
    """A piece on another device than the shard's receives a copy."""
    return z if z.device == shard.local.device else z.to(shard.local.device, non_blocking=True)


def f32(x: float) -> float:
    """Round a Python scalar to fp32 once, so every kernel path multiplies by the same number."""
    return float(torch.tensor(x, dtype=torch.float32))


Pieces = Callable[[ParamShard], Iterable[tuple[int, torch.Tensor]]]


def z_blocks(seed: int, shard: ParamShard) -> Iterable[tuple[int, torch.Tensor]]:
    """The dense direction of ``seed`` on a shard (its noise kind, on its device, from its cache
    when it has one): ``(offset, z)`` pieces as fresh fp32 tensors the caller may modify."""
    if shard.cache is not None:
        z = shard.cache.get(seed, shard)
        return ((off, z[off : off + BLOCK].clone()) for off in range(0, shard.numel, BLOCK))
    return iter_blocks(seed, shard.key, shard.start, shard.numel, shard.total, kind=shard.noise,
                       device=shard.local.device)


def estimate_blocks(shard: ParamShard, seeds: list[int], coeffs: list[float],
                    restore: float) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """``(slice, weights, ĝ)`` block by block over a shard, for methods that feed MeZO's estimate
    ``ĝ = Σ_i coeffs[i]·z_i`` to another rule (ZO-Adam, ZO-SGD): each ``z_i`` is regenerated
    once (or read from the cache) and, when ``restore`` is not 0 (no master), the stored weights
    at ``θ + ε z_last`` are first moved back by ``restore·z_last``. ``weights`` is the slice of
    the tensor to update (the master, or the stored weights), ``ĝ`` a fresh fp32 tensor."""
    target = shard.weights
    gens = [z_blocks(s, shard) for s in seeds]
    for pieces in zip(*gens):
        off = pieces[0][0]
        zs = [z.to(target.device) for _, z in pieces]
        sl = slice(off, off + zs[0].numel())
        w = target[sl]
        if restore != 0.0:
            w.add_(zs[-1] * restore)
        grad = zs[0].mul_(coeffs[0])
        for c, z in zip(coeffs[1:], zs[1:]):
            grad.add_(z.mul_(c))
        yield sl, w, grad


def gaussian_pieces(seed: int) -> Pieces:
    """The dense direction of ``seed`` (Gaussian unless the shard's ``noise`` says otherwise)."""
    return lambda shard: z_blocks(seed, shard)


def fused(shard: ParamShard, seed: int, dst: torch.Tensor, src: torch.Tensor,
          a: float, s: float = 1.0, b: float = 0.0) -> None:
    """``dst = ((src + z·a)·s + z·b)`` over the shard, ``z`` its dense direction of ``seed``."""
    if shard.cache is None:
        noise.apply(dst, src, seed, shard.key, shard.start, shard.total, a, s, b,
                    kind=shard.noise)
        return
    z = shard.cache.get(seed, shard)
    noise.apply_stored(dst, src, z, shard.total, a, s, b)


def move(shards: Iterable[ParamShard], seed: int | None, current: float, new: float, *,
         pieces: Pieces | None = None) -> None:
    """Stored weights from ``θ + current·z`` to ``θ + new·z``.

    ``z`` is the dense direction of ``seed`` (one fused pass per shard), or the direction
    ``pieces`` yields for a shard (low-rank and activation-guided methods), as fresh tensors this
    function may modify.
    """
    for shard in shards:
        if shard.master is not None and new == 0.0:
            shard.local.copy_(shard.master)
        elif pieces is None:
            if shard.master is None:
                fused(shard, seed, shard.local, shard.local, f32(new - current))
            else:
                fused(shard, seed, shard.local, shard.master, f32(new))
        elif shard.master is not None:
            alpha = f32(new)
            for off, z in pieces(shard):
                z, n = _on(z, shard), z.numel()
                shard.local[off : off + n].copy_(z.mul_(alpha).add_(shard.master[off : off + n]))
        else:
            alpha = f32(new - current)
            for off, z in pieces(shard):
                z = _on(z, shard)
                shard.local[off : off + z.numel()].add_(z.mul_(alpha))


def update(
    shards: Iterable[ParamShard],
    seed: int | None,
    coeff: float | Callable[[ParamShard], float],
    *,
    current: float = 0.0,
    decay: float = 0.0,
    pieces: Pieces | None = None,
) -> None:
    """``θ ← (1 - decay)·θ + coeff·z`` for the stored weights at ``θ + current·z``.

    Restore and update are fused into one regeneration of ``z`` (``seed`` or ``pieces`` as in
    :func:`move`). ``coeff`` may depend on the shard (LOZO's 1/r on matrices). ``decay`` (= η·λ)
    applies only to shards with ``decay=True`` (not biases or norms). With masters the update
    goes to the master and the stored weights become ``cast(master)``.
    """
    for shard in shards:
        c = coeff(shard) if callable(coeff) else coeff
        d = decay if shard.decay else 0.0
        target = shard.weights
        restore = f32(-current) if shard.master is None else 0.0
        scale, step = f32(1.0 - d), f32(c)
        if pieces is None:
            if shard.master is None and d == 0.0:
                fused(shard, seed, target, target, f32(c - current))
            else:
                fused(shard, seed, target, target, restore, scale, step)
        elif shard.master is None and d == 0.0:
            alpha = f32(c - current)
            for off, z in pieces(shard):
                z = _on(z, shard)
                target[off : off + z.numel()].add_(z.mul_(alpha))
        else:
            for off, z in pieces(shard):
                z = _on(z, shard)
                piece = target[off : off + z.numel()]
                if restore != 0.0:
                    piece.add_(z * restore)
                if d != 0.0:
                    piece.mul_(scale)
                piece.add_(z.mul_(step))
        if shard.master is not None:
            shard.local.copy_(shard.master)
