"""Moving the stored weights along a regenerated direction, with or without fp32 masters.

A method says where the stored weights should be (``θ + α z`` for the direction of ``seed``) and
this module gets them there by regenerating ``z`` block by block (no buffer of model size):

- without a master, the stored tensor is moved in place: ``w += (new - current) · z``. This is
  MeZO's arithmetic; in floating point ``θ + εz - 2εz + εz`` is not exactly ``θ``, so weights drift
  by about an ulp per step (measured in bench/restore_drift.py).
- with an fp32 master, the stored weights are written as ``cast(master + α z)`` and restored as
  ``cast(master)`` without regenerating anything, so a step with learning rate 0 is bitwise exact.

Every elementwise operation is multiply-then-add in a fixed order, so the result of an element does
not depend on which rank holds it or where its shard starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from pipeline.zo.noise import iter_blocks
from pipeline.zo.shards import ParamShard


def _on(z, shard: ParamShard):
    """Noise is generated on the CPU (the same numbers whatever the device); a shard on a GPU
    receives a copy."""
    return z if z.device == shard.local.device else z.to(shard.local.device, non_blocking=True)


def f32(x: float) -> float:
    """Round a Python scalar to fp32 once, so every kernel path multiplies by the same number."""
    return float(torch.tensor(x, dtype=torch.float32))


Pieces = Callable[[ParamShard], Iterable[tuple[int, torch.Tensor]]]


def gaussian_pieces(seed: int) -> Pieces:
    """The isotropic Gaussian direction of ``seed``: ``(offset, z)`` blocks of a shard."""
    return lambda shard: iter_blocks(seed, shard.key, shard.start, shard.numel, shard.total)


def move(shards: Iterable[ParamShard], seed: int | None, current: float, new: float, *,
         pieces: Pieces | None = None) -> None:
    """Stored weights from ``θ + current·z`` to ``θ + new·z``.

    ``z`` is the Gaussian of ``seed``, or the direction ``pieces`` yields for a shard (low-rank
    and activation-guided methods), as fresh tensors this function may modify.
    """
    pieces = pieces or gaussian_pieces(seed)
    for shard in shards:
        if shard.master is not None:
            if new == 0.0:
                shard.local.copy_(shard.master)
                continue
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
    pieces = pieces or gaussian_pieces(seed)
    for shard in shards:
        c = coeff(shard) if callable(coeff) else coeff
        d = decay if shard.decay else 0.0
        target = shard.weights
        if shard.master is None and d == 0.0:
            alpha = f32(c - current)
            for off, z in pieces(shard):
                z = _on(z, shard)
                target[off : off + z.numel()].add_(z.mul_(alpha))
            continue
        restore = f32(-current) if shard.master is None else 0.0
        scale, step = f32(1.0 - d), f32(c)
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
