"""ZO-SGD with momentum and ZO-SignSGD: MeZO's estimate through two other first-order rules
(the ZO-SGD-MMT and ZO-SGD-Sign baselines of ZO-Bench, Zhang et al., arXiv 2402.11592).

Measurement is MeZO's (:class:`pipeline.zo.methods.mezo.MeZO`, unchanged): per direction ``i``
``g_i = (L(θ+εz_i) - L(θ-εz_i)) / 2ε`` (or one-sided), and ``ĝ = (1/n) Σ_i g_i z_i``, formed block
by block from the regenerated ``z_i`` (no buffer of model size besides the momentum). Then:

- ``zo_sgd_mmt``: ``m ← β m + ĝ``, ``θ ← θ - η (m + λθ)`` (PyTorch SGD's momentum, no dampening;
  ``β = method.sgd_momentum``). ``m`` is an fp32 tensor of each shard's LOCAL size, sharded like
  the parameters (+4 bytes per trainable element), saved per rank through :meth:`shard_state`
  (``"momentum::<name>"``, laid out like the shard) as ZO-Adam's moments are.
- ``zo_sgd_sign``: ``θ ← θ - η (sign(ĝ) + λθ)``; no state.

λ (``weight_decay``) skips biases and norms. Communication per step: MeZO's, one all-gather of
2 loss scalars per direction. Replay: from the log's seeds and ``g`` in order from step 1 (the
momentum is recomputed), with the run's fp32 arithmetic, so bitwise.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from pipeline.zo.directions import f32
from pipeline.zo.methods.mezo import MeZO
from pipeline.zo.rounding import rounding_seed
from pipeline.zo.shards import ParamShard
from pipeline.zo.update import estimate_blocks, write_back

MOMENTUM = "momentum::"


class _EstimateRule(MeZO, abc.ABC):
    """MeZO's measurement, then ``θ ← (1 - ηλ) θ - η rule(ĝ)`` block by block."""

    @abc.abstractmethod
    def _rule(self, shard: ParamShard, sl: slice, grad: torch.Tensor) -> torch.Tensor:
        """The step direction of the elements ``sl`` of ``shard`` from their ``ĝ``."""

    def _apply(self, seeds: list[int], grads: list[float], lr: float) -> None:
        n = len(seeds)
        coeffs = [f32(g / n) for g in grads]
        step, rounding = f32(-lr), rounding_seed(seeds[0])
        for shard in self.shards:
            scale = f32(1 - lr * self.cfg.weight_decay) if shard.decay else 1.0
            for off, w, grad in estimate_blocks(shard, seeds, coeffs):
                if scale != 1.0:
                    w.mul_(scale)
                sl = slice(off, off + w.numel())
                write_back(shard, off, w.add_(self._rule(shard, sl, grad).mul_(step)), rounding)
            if shard.master is not None:
                shard.local.copy_(shard.master)


class ZOSGDSign(_EstimateRule):
    def _rule(self, shard: ParamShard, sl: slice, grad: torch.Tensor) -> torch.Tensor:
        return grad.sign_()


class ZOSGDMomentum(_EstimateRule):
    def __init__(self, cfg: Any, shards: list[ParamShard]):
        super().__init__(cfg, shards)
        if not 0.0 <= cfg.sgd_momentum < 1.0:
            raise ValueError(f"method.sgd_momentum={cfg.sgd_momentum} must be in [0, 1)")
        self.beta = f32(cfg.sgd_momentum)
        self.momentum = {s.name: torch.zeros(s.numel, dtype=torch.float32,
                                             device=s.local.device) for s in shards}
        self.t = 0
        self._buffer_loaded = False
        self._awaiting_buffer = False  # t restored without the buffer: refuse to step

    def _check(self) -> None:
        if self._awaiting_buffer:
            raise RuntimeError(
                f"ZO-SGD momentum was restored at step count {self.t} without its buffer: the "
                "checkpoint must also save shard_state() per rank and restore it with "
                "load_shard_state()"
            )

    def step(self, ctx):
        self._check()  # before any forward: a refused step costs no forward
        return super().step(ctx)

    def _apply(self, seeds: list[int], grads: list[float], lr: float) -> None:
        self._check()
        super()._apply(seeds, grads, lr)
        self.t += 1

    def _rule(self, shard: ParamShard, sl: slice, grad: torch.Tensor) -> torch.Tensor:
        m = self.momentum[shard.name][sl]
        m.mul_(self.beta).add_(grad)
        return m.clone()

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self._awaiting_buffer = self.t > 0 and not self._buffer_loaded

    def shard_state(self) -> dict[str, torch.Tensor]:
        return {MOMENTUM + s.name: self.momentum[s.name].detach().cpu().clone()
                for s in self.shards}

    def load_shard_state(self, state: dict[str, torch.Tensor]) -> None:
        for s in self.shards:
            key = MOMENTUM + s.name
            if key not in state:
                raise KeyError(f"ZO-SGD momentum shard state has no {key}")
            saved = state[key].reshape(-1)
            if saved.numel() != s.numel:
                raise ValueError(f"{key}: {saved.numel()} elements, the shard has {s.numel}")
            self.momentum[s.name].copy_(saved.to(torch.float32))
        self._buffer_loaded = True
        self._awaiting_buffer = False
