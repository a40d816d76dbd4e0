"""MeZO: memory-efficient zeroth-order SGD (SPSA), Malladi et al., NeurIPS 2023, Algorithm 1.

Per step and direction ``i`` (seed ``s_i = mix(run seed, step, i)``):

- ``L+ = L(θ + ε z_i)`` and ``L- = L(θ - ε z_i)`` (Alg. 1, ZO-perturb with scale +1, then -2);
  one-sided option: ``L0 = L(θ)`` once per step and ``g_i = (L+ - L0)/ε``;
- ``g_i = (L+ - L-) / 2ε`` (the projected gradient);
- ``θ ← θ - η (mean_i g_i z_i + λ θ)``, λ skipped for biases and norms.

Restore and update are fused: after the last forward the weights sit at ``θ - ε z`` and one pass
writes ``θ + (ε - η g) z``, so a one-direction step regenerates ``z`` 3 times instead of the
official code's 4 (with fp32 masters the restore is a copy and costs no regeneration).

Communication per step: one all-gather of this rank's losses (2 scalars per direction, plus L0
one-sided), averaged in float64 in rank order; nothing of parameter size.

:meth:`MeZO.replay` re-applies a step from its update-log record (seeds, projected gradients,
learning rate) with the same arithmetic and no forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from pipeline.zo import perturb
from pipeline.zo.methods.base import StepContext, StepStats
from pipeline.zo.seeds import step_seed
from pipeline.zo.shards import ParamShard


class MeZO:
    def __init__(self, cfg: Any, shards: list[ParamShard]):
        self.cfg = cfg
        self.shards = shards

    @property
    def _masters(self) -> bool:
        return any(s.master is not None for s in self.shards)

    def _measure(self, seeds: list[int], loss: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
        """Forwards of all directions; leaves the weights at the last direction's last point."""
        eps, two_sided = self.cfg.eps, self.cfg.two_sided
        local = [] if two_sided else [loss()]
        for i, seed in enumerate(seeds):
            perturb.move(self.shards, seed, 0.0, eps)
            local.append(loss())
            if two_sided:
                perturb.move(self.shards, seed, eps, -eps)
                local.append(loss())
            if i < len(seeds) - 1:
                perturb.move(self.shards, seed, self._last_at, 0.0)
        return local

    @property
    def _last_at(self) -> float:
        """Where the weights sit (in units of z) after a direction's last forward."""
        return -self.cfg.eps if self.cfg.two_sided else self.cfg.eps

    def _apply(self, seeds: list[int], grads: list[float], lr: float) -> None:
        # The last direction first: its update is fused with its restore, and weight decay is
        # applied once, to θ itself.
        n = len(seeds)
        decay = lr * self.cfg.weight_decay
        for k, i in enumerate([n - 1, *range(n - 1)]):
            perturb.update(
                self.shards,
                seeds[i],
                -lr * grads[i] / n,
                current=self._last_at if k == 0 else 0.0,
                decay=decay if k == 0 else 0.0,
            )

    def step(self, ctx: StepContext) -> StepStats:
        eps, n = self.cfg.eps, self.cfg.n_directions
        seeds = [step_seed(ctx.run_seed, ctx.step, i) for i in range(n)]
        local = self._measure(seeds, lambda: ctx.backend.loss(ctx.batch))
        losses = ctx.backend.all_reduce_mean(torch.stack(local)).tolist()
        if not all(math.isfinite(v) for v in losses):
            perturb.move(self.shards, seeds[-1], self._last_at, 0.0)
            return StepStats(math.nan, [math.nan] * n, len(local), seeds, skipped=True)
        if self.cfg.two_sided:
            grads = [(losses[2 * i] - losses[2 * i + 1]) / (2 * eps) for i in range(n)]
            loss = sum(losses) / len(losses)
        else:
            grads = [(losses[1 + i] - losses[0]) / eps for i in range(n)]
            loss = losses[0]
        self._apply(seeds, grads, ctx.lr)
        return StepStats(loss, grads, len(local), seeds)

    def replay(self, record: dict[str, Any]) -> None:
        """Re-apply a logged step. With masters the measuring moves leave the masters untouched,
        so they are skipped; without, they are redone for bitwise-equal rounding."""
        seeds = record["seeds"]
        if not self._masters:
            self._measure(seeds, lambda: torch.zeros(()))
        if record.get("skipped"):
            if not self._masters:
                perturb.move(self.shards, seeds[-1], self._last_at, 0.0)
            return
        self._apply(seeds, record["projected_grad"], record["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
