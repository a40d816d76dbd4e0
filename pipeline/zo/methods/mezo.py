"""MeZO: memory-efficient zeroth-order SGD (SPSA), Malladi et al., NeurIPS 2023, Algorithm 1.

Per step and direction ``i`` (seed ``s_i = mix(run seed, step, i)``):

- ``L+ = L(θ + ε z_i)`` and ``L- = L(θ - ε z_i)`` (Alg. 1, ZO-perturb with scale +1, then -2:
  here the step's losses are asked for at their points in one call,
  ``backend.losses(batch, [θ + ε z_1, θ - ε z_1, ...])``, and the backend shows the perturbed
  weights to its forwards without writing the stored ones, so nothing is restored and nothing
  drifts; it may run them as one forward of the repeated batch); one-sided option: ``L0 = L(θ)``
  once per step and ``g_i = (L+ - L0)/ε``;
- ``g_i = (L+ - L-) / 2ε`` (the projected gradient);
- ``θ ← θ - η (mean_i g_i z_i + λθ)``, λ skipped for biases and norms, in one pass that
  regenerates every ``z_i`` and writes the storage dtype by stochastic rounding
  (:mod:`pipeline.zo.update`). Each direction is regenerated 3 times per step (two forwards, one
  update), as in the official code's fused variant; once with ``method.cache_noise``.

Communication per step: one all-gather of this rank's losses (2 scalars per direction, plus L0
one-sided), averaged in float64 in rank order; nothing of parameter size.

:meth:`MeZO.replay` re-applies a step from its update-log record (seeds, projected gradients,
learning rate) with the same arithmetic and no forward pass: bitwise the run's weights, in every
dtype (the stored weights only ever change by updates).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from pipeline.zo.directions import Term
from pipeline.zo.methods.base import StepContext, StepStats
from pipeline.zo.perturbation import Perturbation
from pipeline.zo.rounding import rounding_seed
from pipeline.zo.seeds import step_seed
from pipeline.zo.shards import ParamShard
from pipeline.zo.update import update

Losses = Callable[[list[Perturbation | None]], list[torch.Tensor]]


class MeZO:
    def __init__(self, cfg: Any, shards: list[ParamShard]):
        self.cfg = cfg
        self.shards = shards

    def _measure(self, seeds: list[int], losses: Losses) -> list[torch.Tensor]:
        """This rank's losses: per direction ``L(θ+εz)``, ``L(θ-εz)`` (or ``L0`` first and
        ``L(θ+εz)`` one-sided), asked for in one call."""
        eps, two_sided = self.cfg.eps, self.cfg.two_sided
        ats: list[Perturbation | None] = [] if two_sided else [None]
        for seed in seeds:
            ats.append(Perturbation.dense(seed, eps))
            if two_sided:
                ats.append(Perturbation.dense(seed, -eps))
        return losses(ats)

    def _apply(self, seeds: list[int], grads: list[float], lr: float) -> None:
        n = len(seeds)
        terms = [Term(-lr * g / n, seed=s) for s, g in zip(seeds, grads)]
        update(self.shards, terms, rounding=rounding_seed(seeds[0]),
               decay=lr * self.cfg.weight_decay)

    def step(self, ctx: StepContext) -> StepStats:
        eps, n = self.cfg.eps, self.cfg.n_directions
        seeds = [step_seed(ctx.run_seed, ctx.step, i) for i in range(n)]
        local = self._measure(seeds, lambda ats: ctx.backend.losses(ctx.batch, ats))
        losses = ctx.backend.all_reduce_mean(torch.stack(local)).tolist()
        if not all(math.isfinite(v) for v in losses):
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
        """Re-apply a logged step (no forward: the measurements never moved the weights)."""
        if not record.get("skipped"):
            self._apply(record["seeds"], record["projected_grad"], record["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
