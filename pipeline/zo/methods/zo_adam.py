"""ZO-Adam: MeZO's SPSA estimate fed to Adam (ZO-Bench, Zhang et al., arXiv 2402.11592).

Measurement is MeZO's (:class:`pipeline.zo.methods.mezo.MeZO`, reused unchanged): per direction
``i`` (seed ``s_i = step_seed(run seed, step, i)``) ``g_i = (L(θ+εz_i) - L(θ-εz_i)) / 2ε`` (or
one-sided ``(L(θ+εz_i) - L0)/ε``). The gradient estimate ``ĝ = (1/n) Σ_i g_i z_i`` then goes
through Adam (Kingma & Ba, Algorithm 1), elementwise in fp32, with ``t`` the count of applied
steps:

- ``m ← β1 m + (1-β1) ĝ``, ``v ← β2 v + (1-β2) ĝ²`` (Adam's moment updates);
- ``m̂ = m / (1-β1^t)``, ``v̂ = v / (1-β2^t)`` (bias correction);
- ``θ ← θ - η (m̂ / (√v̂ + eps) + λθ)``; the ``λθ`` weight decay is decoupled (AdamW-style), skipped
  for biases and norms, 0 by default (a pipeline choice: ZO-Bench does not fix one).

``β1, β2, eps`` are ``method.adam_beta1``, ``method.adam_beta2``, ``method.adam_eps``.

The moments ``m`` and ``v`` are fp32 tensors of each ParamShard's LOCAL size, on the shard's
device: they are sharded exactly like the parameters, and cost 2x the trainable parameters in
memory (8 bytes per trainable element) on top of MeZO's inference-level footprint. ``z`` is
regenerated block by block (no buffer of model size); one pass per shard regenerates every
direction once and applies Adam, writing the storage dtype by stochastic rounding
(:func:`pipeline.zo.update.write_back`).

Communication per step: MeZO's, one all-gather of 2 loss scalars per direction (plus L0
one-sided), averaged in float64 in rank order. The Adam state is never communicated.

State and checkpoints. :meth:`state_dict` holds only the replicated scalar ``t`` (the count of
applied steps): the checkpoint code saves it from global rank 0. The moments are per-rank:
:meth:`shard_state` returns ``{"exp_avg::<shard name>": m, "exp_avg_sq::<shard name>": v}``, each
a 1-D fp32 CPU tensor holding elements ``[shard.start, shard.start + shard.numel)`` of the
parameter's flat moment, i.e. laid out exactly like the shard itself, and
:meth:`load_shard_state` takes the same keys for this rank's shards. The checkpoint must save them
in each rank's own file with the shards' layout (global shape and start) and, on resume at another
world size, re-slice them as it re-slices the weights. A method whose ``t > 0`` was restored
without its moments refuses to step (it would silently restart Adam).

Replay: the update log holds only seeds, ``g`` and ``η``; :meth:`replay` recomputes the moments
from them, so a log must be replayed in order from step 1 on a fresh method. It is
deterministic: the same fp32 operations in the same order as the run, so the replayed weights
(and moments) equal the run's bitwise.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.zo.directions import f32
from pipeline.zo.methods.base import StepContext, StepStats
from pipeline.zo.methods.mezo import MeZO
from pipeline.zo.rounding import rounding_seed
from pipeline.zo.shards import ParamShard
from pipeline.zo.update import estimate_blocks, write_back

EXP_AVG = "exp_avg::"
EXP_AVG_SQ = "exp_avg_sq::"



class ZOAdam(MeZO):
    def __init__(self, cfg: Any, shards: list[ParamShard]):
        super().__init__(cfg, shards)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(cfg, name) < 1.0:
                raise ValueError(f"method.{name}={getattr(cfg, name)} must be in [0, 1)")
        self.t = 0
        self.exp_avg = {s.name: self._zeros(s) for s in shards}
        self.exp_avg_sq = {s.name: self._zeros(s) for s in shards}
        self._moments_loaded = False
        self._awaiting_moments = False

    @staticmethod
    def _zeros(shard: ParamShard) -> torch.Tensor:
        return torch.zeros(shard.numel, dtype=torch.float32, device=shard.local.device)

    def _check_moments(self) -> None:
        if self._awaiting_moments:
            raise RuntimeError(
                f"ZO-Adam was restored at step count {self.t} without its moments: the "
                "checkpoint must also save shard_state() per rank and restore it with "
                "load_shard_state()"
            )

    def step(self, ctx: StepContext) -> StepStats:
        self._check_moments()  # before any forward: a refused step costs no forward
        return super().step(ctx)

    def _apply(self, seeds: list[int], grads: list[float], lr: float) -> None:
        """``ĝ`` and Adam: one regeneration of each ``z_i``."""
        self._check_moments()
        self.t += 1
        b1, b2, n = self.cfg.adam_beta1, self.cfg.adam_beta2, len(seeds)
        coeffs = [f32(g / n) for g in grads]
        step_size = f32(lr / (1 - b1**self.t))
        bc2_sqrt = f32(math.sqrt(1 - b2**self.t))
        eps = f32(self.cfg.adam_eps)
        one_b1, one_b2 = f32(1 - b1), f32(1 - b2)
        b1, b2 = f32(b1), f32(b2)
        rounding = rounding_seed(seeds[0])
        for shard in self.shards:
            scale = f32(1 - lr * self.cfg.weight_decay) if shard.decay else 1.0
            m, v = self.exp_avg[shard.name], self.exp_avg_sq[shard.name]
            for off, w, grad in estimate_blocks(shard, seeds, coeffs):
                sl = slice(off, off + w.numel())
                m[sl].mul_(b1).add_(grad * one_b1)
                v[sl].mul_(b2).add_(grad.mul_(grad).mul_(one_b2))
                denom = v[sl].sqrt().div_(bc2_sqrt).add_(eps)
                if scale != 1.0:
                    w.mul_(scale)
                write_back(shard, off, w.add_(m[sl].div(denom).mul_(-step_size)), rounding)
            if shard.master is not None:
                shard.local.copy_(shard.master)

    # MeZO.step and MeZO.replay call _apply only for finite, non-skipped steps, so t counts the
    # applied Adam steps in both.

    def state_dict(self) -> dict[str, Any]:
        """The replicated scalars (saved once, from rank 0). The moments: :meth:`shard_state`."""
        return {"t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self._awaiting_moments = self.t > 0 and not self._moments_loaded

    def shard_state(self) -> dict[str, torch.Tensor]:
        """This rank's moments, laid out like its shards (see the module docstring)."""
        out: dict[str, torch.Tensor] = {}
        for s in self.shards:
            out[EXP_AVG + s.name] = self.exp_avg[s.name].detach().cpu().clone()
            out[EXP_AVG_SQ + s.name] = self.exp_avg_sq[s.name].detach().cpu().clone()
        return out

    def load_shard_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore this rank's moments from tensors holding exactly its shards' elements."""
        for s in self.shards:
            for prefix, store in ((EXP_AVG, self.exp_avg), (EXP_AVG_SQ, self.exp_avg_sq)):
                key = prefix + s.name
                if key not in state:
                    raise KeyError(f"ZO-Adam shard state has no {key}")
                saved = state[key].reshape(-1)
                if saved.numel() != s.numel:
                    raise ValueError(f"{key}: {saved.numel()} elements, the shard has {s.numel}")
                store[s.name].copy_(saved.to(torch.float32))
        self._moments_loaded = True
        self._awaiting_moments = False
