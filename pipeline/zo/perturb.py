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

from collections.abc import Iterable

import torch

from pipeline.zo.noise import iter_blocks
from pipeline.zo.shards import ParamShard


def _on(z, shard: ParamShard):
    """Noise is generated on the CPU (the same numbers whatever the device); a shard on a GPU
    receives a copy."""
    return z if z.device == shard.local.device else z.to(shard.local.device, non_blocking=True)


def _f32(x: float) -> float:
    """Round a Python scalar to fp32 once, so every kernel path multiplies by the same number."""
    return float(torch.tensor(x, dtype=torch.float32))


def move(shards: Iterable[ParamShard], seed: int, current: float, new: float) -> None:
    """Stored weights from ``θ + current·z`` to ``θ + new·z`` (``z`` of ``seed``)."""
    for shard in shards:
        if shard.master is not None:
            if new == 0.0:
                shard.local.copy_(shard.master)
                continue
            alpha = _f32(new)
            for off, z in iter_blocks(seed, shard.key, shard.start, shard.numel, shard.total):
                z, n = _on(z, shard), z.numel()
                shard.local[off : off + n].copy_(z.mul_(alpha).add_(shard.master[off : off + n]))
        else:
            alpha = _f32(new - current)
            for off, z in iter_blocks(seed, shard.key, shard.start, shard.numel, shard.total):
                z = _on(z, shard)
                shard.local[off : off + z.numel()].add_(z.mul_(alpha))


def update(
    shards: Iterable[ParamShard],
    seed: int,
    coeff: float,
    *,
    current: float = 0.0,
    decay: float = 0.0,
) -> None:
    """``θ ← (1 - decay)·θ + coeff·z`` for the stored weights at ``θ + current·z``.

    Restore and update are fused into one regeneration of ``z``. ``decay`` (= η·λ) applies only to
    shards with ``decay=True`` (not biases or norms). With masters the update goes to the master
    and the stored weights become ``cast(master)``.
    """
    for shard in shards:
        d = decay if shard.decay else 0.0
        target = shard.weights
        if shard.master is None and d == 0.0:
            alpha = _f32(coeff - current)
            for off, z in iter_blocks(seed, shard.key, shard.start, shard.numel, shard.total):
                z = _on(z, shard)
                target[off : off + z.numel()].add_(z.mul_(alpha))
            continue
        restore = _f32(-current) if shard.master is None else 0.0
        scale, step = _f32(1.0 - d), _f32(coeff)
        for off, z in iter_blocks(seed, shard.key, shard.start, shard.numel, shard.total):
            z = _on(z, shard)
            piece = target[off : off + z.numel()]
            if restore != 0.0:
                piece.add_(z * restore)
            if d != 0.0:
                piece.mul_(scale)
            piece.add_(z.mul_(step))
        if shard.master is not None:
            shard.local.copy_(shard.master)
