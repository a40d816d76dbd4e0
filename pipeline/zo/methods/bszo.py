"""BSZO: Bayesian subspace zeroth-order optimisation, Feng & Huang, arXiv 2601.01452.

``k`` dense Gaussian directions ``z_1..z_k`` (seeds ``s_i = step_seed(run seed, step, i)``, the
noise of :mod:`pipeline.zo.noise`) span a subspace; the latent is the projected gradient
``g̃ ∈ R^k`` with prior ``N(0, σp² I)``. An observation along ``d ∈ R^k`` is
``y = (L(θ + ε Σ_i d_i z_i) - L0) / ε = dᵀ g̃ + ν``, ``ν ~ N(0, σe² ‖d‖²)``.

Per step (Algorithm 1, ``variant=bszo``):

- ``μ = 0``, ``Σ = σp² I``, ``L0 = L(θ)`` (Alg. 1 init; one forward);
- ``τ = 1..k``: ``d = e_τ``, one forward at ``θ + ε z_τ``, ``y_τ = (L_τ - L0)/ε`` (Alg. 1 loop 1);
- ``τ = k+1..m``: ``d = e_j`` with ``j = argmax diag(Σ)`` (first index on ties), the cached
  ``y_j`` is observed again, no forward (Alg. 1 loop 2);
- every observation (Alg. 1 filter step, float64): residual ``r = (y - dᵀμ)/‖d‖``; noise EMA
  ``s ← (1-α) s + α r²``; ``σe = max(0.1 σe0, √s)``; gain ``K = Σd / (dᵀΣd + σe² ‖d‖²)``;
  ``μ ← μ + K (y - dᵀμ)``; ``Σ ← Σ - K (dᵀΣ)``, then symmetrised;
- update ``θ ← θ - η (Σ_i μ_i z_i + λθ)`` (Alg. 1 last line; the ``λθ`` weight decay, skipped for
  biases and norms, is this pipeline's addition and 0 by default).

``variant=bszo_b`` (Algorithm 2) replaces the second loop: each extra observation is a NEW forward
along the top eigenvector ``d`` of the current ``Σ`` (unit norm, sign fixed so its largest
component is positive), i.e. at ``θ + ε Σ_i d_i z_i``, and ``y = (L_d - L0)/ε``. (With unit-vector
observations ``Σ`` stays diagonal, so ``d`` is in practice ``e_j``; the code handles any ``d``.)

Reconstruction choices (METHODS.md does not settle them): the EMA state ``s`` itself is not
floored, only the ``σe`` it gives (as the authors' reference implementation does); ``s`` starts at
``σe0²`` and PERSISTS across steps (method state, :meth:`state_dict`); a skipped step leaves it
unchanged. ``σp = σe0 = method.bszo_sigma``, or ``√(n / 1e6)`` with ``n`` the global trainable
parameter count (from the shards' global shapes, so every rank agrees). ``method.eps`` is the
single ε knob: the BSZO recipe sets ``eps=1e-4`` (the pipeline default 1e-3 is MeZO's). BSZO is
one-sided by construction: ``method.two_sided`` and ``method.n_directions`` are not used; ``k`` is
``method.bszo_k``.

Forwards per step: ``1 + k`` (bszo), ``1 + m`` (bszo_b). The first ``1 + k`` are asked for in
one call at their points (``backend.losses(batch, [θ, θ + ε z_1, ...])``, which may run them as
one forward of the repeated batch), each extra bszo_b one at its point
(``backend.loss(batch, at=θ + ε Σ_i d_i z_i)``); the stored weights are never moved, so each
``z_i`` is regenerated twice per step: once for its forward, once in the update, which sums all
``k`` directions in one pass and writes the storage dtype by stochastic rounding
(:mod:`pipeline.zo.update`).

Communication per step: bszo, ONE all-gather of ``k + 1`` loss scalars (``L0, L_1..L_k``),
averaged in float64 in rank order; bszo_b, that call plus one call of 1 scalar per extra
observation (``m - k``): the extra direction is a function of the posterior after the first ``k``
observations, i.e. of the all-reduced losses, so it cannot be folded into the first call. Every
rank runs the (k-dimensional, float64) filter itself on the same scalars; nothing of parameter
size is sent.

Logged per step (``StepStats``): ``projected_grad`` = the observations ``y``; ``extra`` =
``mu`` (the posterior mean the update used), ``sigma_e`` (the last ``σe``), ``noise_ema`` (``s``
after the step) and, for bszo_b, ``directions`` (the extra observations' ``d``). :meth:`replay`
re-applies a logged step from these with the same arithmetic and no forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipeline.zo.directions import Term
from pipeline.zo.methods.base import StepContext, StepStats
from pipeline.zo.perturbation import Perturbation
from pipeline.zo.rounding import rounding_seed
from pipeline.zo.seeds import step_seed
from pipeline.zo.shards import ParamShard
from pipeline.zo.update import update


class Posterior:
    """The Kalman filter over ``g̃ ∈ R^k`` (float64), one per step; ``noise_ema`` carries over."""

    def __init__(self, k: int, sigma_p: float, sigma_e0: float, alpha: float, noise_ema: float):
        self.mu = torch.zeros(k, dtype=torch.float64)
        self.cov = torch.eye(k, dtype=torch.float64) * sigma_p**2
        self.sigma_e0 = sigma_e0
        self.alpha = alpha
        self.noise_ema = noise_ema
        self.sigma_e = max(0.1 * sigma_e0, math.sqrt(noise_ema))

    def observe(self, d: torch.Tensor, y: float) -> None:
        """One filter step for the observation ``y = dᵀ g̃ + ν``, ``ν ~ N(0, σe² ‖d‖²)``."""
        d = d.to(torch.float64)
        norm2 = float(d @ d)
        innovation = y - float(d @ self.mu)
        if self.alpha > 0:
            residual = innovation / math.sqrt(norm2)
            self.noise_ema = (1 - self.alpha) * self.noise_ema + self.alpha * residual**2
        self.sigma_e = max(0.1 * self.sigma_e0, math.sqrt(self.noise_ema))
        cov_d = self.cov @ d
        gain = cov_d / (float(d @ cov_d) + self.sigma_e**2 * norm2)
        self.mu = self.mu + gain * innovation
        self.cov = self.cov - torch.outer(gain, d @ self.cov)
        self.cov = (self.cov + self.cov.T) / 2

    def most_uncertain_axis(self) -> int:
        """``argmax diag(Σ)``, the first index on ties."""
        diag = self.cov.diagonal().tolist()
        return max(range(len(diag)), key=diag.__getitem__)

    def top_eigenvector(self) -> torch.Tensor:
        """Unit eigenvector of the largest eigenvalue of ``Σ``, largest component positive."""
        _, vectors = torch.linalg.eigh(self.cov)
        v = vectors[:, -1].clone()
        if v[int(v.abs().argmax())] < 0:
            v = -v
        return v


class BSZO:
    def __init__(self, cfg: Any, shards: list[ParamShard]):
        self.cfg = cfg
        self.shards = shards
        self.k = cfg.bszo_k
        self.m = cfg.bszo_m or self.k + 1
        if self.m < self.k:
            raise ValueError(f"method.bszo_m={cfg.bszo_m} must be >= method.bszo_k={self.k} "
                             "(or 0 for k+1)")
        if not 0.0 <= cfg.bszo_alpha <= 1.0:
            raise ValueError(f"method.bszo_alpha={cfg.bszo_alpha} must be in [0, 1]")
        self.variant = cfg.bszo_variant
        n = sum(s.total for s in shards)  # global sizes: the same number on every rank
        self.sigma_p = cfg.bszo_sigma or math.sqrt(n / 1e6)
        self.sigma_e0 = self.sigma_p
        self.noise_ema = self.sigma_e0**2  # Alg. 1's adaptive σe² state, kept across steps
        self.posterior: Posterior | None = None  # the last step's, for inspection

    # -- measuring and updating ------------------------------------------------------------------

    def _measure_axes(self, seeds: list[int],
                      losses: Callable[[list[Perturbation | None]], list[torch.Tensor]]
                      ) -> list[torch.Tensor]:
        """``L0`` and the k forwards along ``e_τ`` (this rank's losses), in one call."""
        eps = self.cfg.eps
        return losses([None] + [Perturbation.dense(seed, eps) for seed in seeds])

    def _apply(self, seeds: list[int], mu: Sequence[float], lr: float) -> None:
        """``θ ← θ - η (Σ_i μ_i z_i + λθ)`` in one pass over every shard."""
        terms = [Term(-lr * m, seed=s) for s, m in zip(seeds, mu)]
        update(self.shards, terms, rounding=rounding_seed(seeds[0]),
               decay=lr * self.cfg.weight_decay)

    # -- the step --------------------------------------------------------------------------------

    def step(self, ctx: StepContext) -> StepStats:
        eps, k = self.cfg.eps, self.k
        seeds = [step_seed(ctx.run_seed, ctx.step, i) for i in range(k)]

        def loss(at: Perturbation | None) -> torch.Tensor:
            return ctx.backend.loss(ctx.batch, at)

        local = self._measure_axes(seeds, lambda ats: ctx.backend.losses(ctx.batch, ats))
        forwards = len(local)
        values = ctx.backend.all_reduce_mean(torch.stack(local)).tolist()

        def skip(extra: dict[str, Any]) -> StepStats:
            return StepStats(math.nan, [math.nan] * k, forwards, seeds, skipped=True,
                             extra=extra)

        if not all(math.isfinite(v) for v in values):
            return skip({})
        l0 = values[0]
        ys = [(v - l0) / eps for v in values[1:]]
        post = Posterior(k, self.sigma_p, self.sigma_e0, self.cfg.bszo_alpha, self.noise_ema)
        for i in range(k):
            post.observe(torch.eye(k, dtype=torch.float64)[i], ys[i])
        directions: list[list[float]] = []
        for _ in range(self.m - k):
            if self.variant == "bszo":
                j = post.most_uncertain_axis()
                post.observe(torch.eye(k, dtype=torch.float64)[j], ys[j])
                continue
            d = post.top_eigenvector()
            directions.append(d.tolist())
            at = Perturbation([Term(eps * c, seed=s) for s, c in zip(seeds, directions[-1])])
            value = ctx.backend.all_reduce_mean(loss(at).reshape(1)).item()
            forwards += 1
            if not math.isfinite(value):
                return skip({"directions": directions})
            ys.append((value - l0) / eps)
            post.observe(d, ys[-1])
        mu = post.mu.tolist()
        self._apply(seeds, mu, ctx.lr)
        self.noise_ema = post.noise_ema
        self.posterior = post
        extra: dict[str, Any] = {"mu": mu, "sigma_e": post.sigma_e, "noise_ema": post.noise_ema}
        if self.variant == "bszo_b":
            extra["directions"] = directions
        return StepStats(l0, ys, forwards, seeds, extra=extra)

    def replay(self, record: dict[str, Any]) -> None:
        """Re-apply a logged step (from step 1, in order; no forward: the measurements never
        moved the weights). The noise state is set to the logged one, so training can go on."""
        if record.get("skipped"):
            return
        self._apply(record["seeds"], record["mu"], record["lr"])
        if "noise_ema" in record:
            self.noise_ema = record["noise_ema"]

    def state_dict(self) -> dict[str, Any]:
        return {"noise_ema": self.noise_ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise_ema = float(state["noise_ema"])
