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
"""

from __future__ import annotations

import math
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

    def step(self, ctx: StepContext) -> StepStats:
        eps, n = self.cfg.eps, self.cfg.n_directions
        two_sided = self.cfg.two_sided
        backend, batch = ctx.backend, ctx.batch
        seeds = [step_seed(ctx.run_seed, ctx.step, i) for i in range(n)]
        low = -eps if two_sided else 0.0  # where the weights sit after a direction's last forward

        local: list[torch.Tensor] = []
        if not two_sided:
            local.append(backend.loss(batch))
        for i, seed in enumerate(seeds):
            perturb.move(self.shards, seed, 0.0, eps)
            local.append(backend.loss(batch))
            if two_sided:
                perturb.move(self.shards, seed, eps, -eps)
                local.append(backend.loss(batch))
            if i < n - 1:
                perturb.move(self.shards, seed, low if two_sided else eps, 0.0)
        losses = backend.all_reduce_mean(torch.stack(local)).tolist()
        forwards = len(local)
        last_at = low if two_sided else eps

        if not all(math.isfinite(v) for v in losses):
            perturb.move(self.shards, seeds[-1], last_at, 0.0)
            return StepStats(math.nan, [math.nan] * n, forwards, seeds, skipped=True)

        if two_sided:
            grads = [(losses[2 * i] - losses[2 * i + 1]) / (2 * eps) for i in range(n)]
            loss = sum(losses) / len(losses)
        else:
            grads = [(losses[1 + i] - losses[0]) / eps for i in range(n)]
            loss = losses[0]

        # The last direction first: its update is fused with its restore, and weight decay is
        # applied once, to θ itself.
        decay = ctx.lr * self.cfg.weight_decay
        for k, i in enumerate([n - 1, *range(n - 1)]):
            perturb.update(
                self.shards,
                seeds[i],
                -ctx.lr * grads[i] / n,
                current=last_at if k == 0 else 0.0,
                decay=decay if k == 0 else 0.0,
            )
        return StepStats(loss, grads, forwards, seeds)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
