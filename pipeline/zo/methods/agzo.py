"""AGZO: activation-guided zeroth-order optimization, Lin et al., arXiv 2601.17261.

RECONSTRUCTION: the paper's body could not be read; this follows its abstract and the
reconstruction in METHODS.md (a summary and the first author's prototype). The step numbers
below are METHODS.md's.

Per step ``t`` (seeds ``s = step_seed(run seed, t, 0)`` for the direction and
``s_A = step_seed(run seed, t, 1)`` for the basis's row sampling and initial ``Q``):

1. (Step 1) The unperturbed forward ``L0 = L(θ)`` runs with forward pre-hooks on every
   ``nn.Linear`` whose weight is trainable (:class:`pipeline.zo.activations.RowCapture`): each
   distinct layer input ``X`` keeps its non-padding rows (the batch's ``attention_mask``), at
   most ``⌈agzo_max_rows / world size⌉`` per rank, sampled with ``s_A``. After the forward, per
   distinct input, ``K = agzo_iters`` steps of subspace iteration ``Q ← qr(Xᵀ(X Q))`` (never
   ``XᵀX``) from ``Q0`` of ``s_A`` give ``A`` (in, r), ``r = agzo_rank``, the top-r right singular
   vectors of ``X``; layers fed the same tensor (q/k/v, gate/up) share it. The rows are freed
   right after. :func:`pipeline.zo.activations.subspace_bases` all-reduces ``Xᵀ(XQ)`` of all
   layers together once per iteration, so ``A`` is the basis of the global batch and bitwise the
   same on every rank (QR in float64 of identical numbers).
2. (Step 2) Direction per trainable weight of a hooked layer: ``Δ = R Aᵀ`` with ``R ~ N(0, I)``
   (out, r) drawn from ``s`` keyed by ``"<name>::agzo.R"`` (the same on every rank); a rank owning
   flat elements ``[a, a+n)`` forms exactly that slice of ``R Aᵀ``
   (:func:`pipeline.zo.methods.lozo.low_rank_pieces`: elementwise in the order ``k = 0..r-1``, so
   bitwise the same whichever rank computes it). With ``match_mezo_norm`` ``R`` is scaled by
   ``√(in / r)`` (``‖R Aᵀ‖² = ‖R‖² ≈ out·r`` against MeZO's ``out·in``). Every other trainable
   parameter (biases, norms, embeddings, a tied LM head, a layer whose input was not seen) gets
   MeZO's isotropic ``z`` of ``s``.
3. (Step 3) ``L+ = L(θ + εΔ)``; ``g = (L+ - L0)/ε`` (one-sided, 2 forwards) or, with
   ``method.two_sided``, ``L- = L(θ - εΔ)`` and ``g = (L+ - L-)/2ε`` (3 forwards; ``L0`` is still
   needed for the basis). NOTE: ``method.two_sided`` defaults to true for every method, so
   AGZO's recommended one-sided mode is set in ``jobs/agzo.yaml`` (``two_sided: false``).
4. (Step 4) ``θ ← θ - η (g Δ + λθ)`` (λ = ``weight_decay``, skipped for biases and norms, 0 by
   default), written by stochastic rounding in 16-bit storage (:mod:`pipeline.zo.update`). The
   forwards of step 3 are asked for at their points in one call (``backend.losses(batch,
   [θ + εΔ, θ - εΔ])``): the stored weights are never moved, so there is nothing to restore.

Given ``A``, ``E[g Δ] = G A Aᵀ`` (to O(ε)) for a weight with gradient ``G``: the gradient
projected on the activation subspace (rows of ``G = Eᵀ X`` lie in the row space of ``X``).

Communication per step: per distinct layer input ``g``, ``K`` all-reduces (``all_reduce_mean``)
of ``in_g · r`` float64 values, inside the ``L0`` forward; then one all-gather of the 2 (3) loss
scalars.

Memory: the row sample of one layer input at a time, ``cap · in_g`` elements of the activations'
dtype (see :mod:`pipeline.zo.activations`); the bases ``Σ_g in_g · r`` fp32 values and the ``R``
of each matrix (``out · r``).

State: none; the bases are recomputed each step from the current weights and batch, so resume is
exact. REPLAY is not supported: ``A`` depends on the activations, and logging it would cost
``Σ_g in_g · r`` floats per step (≈200k floats for Qwen3-0.6B at r = 1, ~30 GB of JSON over 20k
steps, more than a checkpoint); recomputing it would need the forward on the step's batch, which
a replay from the log alone does not have. :meth:`AGZO.replay` raises and says so.

For tests, ``fixed_bases`` (``{module name: A}``) replaces the hooks' bases.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from pipeline.zo.activations import RowCapture, linear_modules, per_rank_cap, subspace_bases
from pipeline.zo.directions import Term, f32, z_blocks
from pipeline.zo.methods.base import ReplayUnsupported, StepContext, StepStats
from pipeline.zo.methods.lozo import low_rank_pieces
from pipeline.zo.noise import gaussian
from pipeline.zo.perturbation import Perturbation
from pipeline.zo.rounding import rounding_seed
from pipeline.zo.seeds import name_key, step_seed
from pipeline.zo.shards import ParamShard
from pipeline.zo.update import update

WEIGHT = ".weight"



class AGZO:
    def __init__(self, cfg: Any, shards: list[ParamShard]):
        self.cfg = cfg
        self.shards = shards
        self.rank = cfg.agzo_rank
        self.fixed_bases: dict[str, torch.Tensor] | None = None
        self.last_bases: dict[str, torch.Tensor] = {}  # of the latest step (for inspection)
        self._modules: dict[str, torch.nn.Module] | None = None
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _hooked(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """The ``nn.Linear`` modules whose (2-D) weight is one of this method's shards."""
        if self._modules is None:
            names = {s.name[: -len(WEIGHT)] for s in self.shards
                     if s.name.endswith(WEIGHT) and len(s.shape) == 2}
            self._modules = linear_modules(model, names=names)
        return self._modules

    # -- step 1: the bases ------------------------------------------------------------------

    def bases(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``L0`` (this rank's) and ``{module name: A}`` of the step (step 1)."""
        backend = ctx.backend
        if self.fixed_bases is not None:
            return backend.loss(ctx.batch), dict(self.fixed_bases)
        seed = step_seed(ctx.run_seed, ctx.step, 1)
        found: list[torch.Tensor] = []

        def basis(first: str, rows: torch.Tensor) -> None:  # one group at a time, rows freed
            found.extend(subspace_bases([(first, [rows])], self.rank, self.cfg.agzo_iters, seed,
                                        backend.all_reduce_mean))

        capture = RowCapture(self._hooked(backend.model),
                             per_rank_cap(self.cfg.agzo_max_rows, backend.world_size), seed,
                             stream=basis)
        with capture.record(getattr(ctx.batch, "attention_mask", None)):
            l0 = backend.loss(ctx.batch)
        return l0, {name: found[g] for name, g in capture.group_of.items()}

    # -- step 2: the directions -------------------------------------------------------------

    def _set_factors(self, seed: int, bases: dict[str, torch.Tensor]) -> None:
        self._factors = {}
        for shard in self.shards:
            module = shard.name[: -len(WEIGHT)] if shard.name.endswith(WEIGHT) else None
            if len(shard.shape) != 2 or module not in bases:
                continue
            a = bases[module]
            out, inner = shard.shape
            r = a.shape[1]
            rr = gaussian(seed, name_key(shard.name + "::agzo.R"), 0, out * r).view(out, r)
            if self.cfg.match_mezo_norm:
                rr.mul_(f32(math.sqrt(inner / r)))
            device = shard.local.device
            self._factors[shard.name] = (rr.to(device), a.to(device, torch.float32))

    def direction(self, shard: ParamShard, seed: int, offset: int = 0,
                  numel: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Elements ``[offset, offset + numel)`` of this shard's part of ``Δ``, ``(offset,
        piece)`` as in ``iter_blocks`` (default: the whole shard)."""
        numel = shard.numel - offset if numel is None else numel
        if shard.name in self._factors:
            r, a = self._factors[shard.name]
            yield from low_rank_pieces(r, a, shard.start + offset, numel)
        else:
            yield from z_blocks(seed, shard, offset, numel)

    def _at(self, seed: int, alpha: float) -> Perturbation:
        return Perturbation.along(lambda sh, off, n: self.direction(sh, seed, off, n), alpha)

    def _update(self, seed: int, grad: float, lr: float) -> None:
        """Step 4: ``θ ← (1 - ηλ) θ - η g Δ``."""
        term = Term(-lr * grad, pieces=lambda sh, off, n: self.direction(sh, seed, off, n))
        update(self.shards, [term], rounding=rounding_seed(seed),
               decay=lr * self.cfg.weight_decay)

    # -- the step ---------------------------------------------------------------------------

    def step(self, ctx: StepContext) -> StepStats:
        eps, two = self.cfg.eps, self.cfg.two_sided
        seed = step_seed(ctx.run_seed, ctx.step, 0)
        seeds = [seed, step_seed(ctx.run_seed, ctx.step, 1)]
        l0, bases = self.bases(ctx)
        self.last_bases = bases
        forwards = 3 if two else 2
        if not all(bool(torch.isfinite(a).all()) for a in bases.values()):
            # identical on every rank (the bases are), so all ranks skip together
            ctx.backend.all_reduce_mean(l0.reshape(1))
            return StepStats(math.nan, [math.nan], 1, seeds, skipped=True)
        self._set_factors(seed, bases)
        ats = [self._at(seed, eps), self._at(seed, -eps)] if two else [self._at(seed, eps)]
        local = [l0, *ctx.backend.losses(ctx.batch, ats)]
        losses = ctx.backend.all_reduce_mean(torch.stack(local)).tolist()
        if not all(math.isfinite(v) for v in losses):
            self._factors = {}
            return StepStats(math.nan, [math.nan], forwards, seeds, skipped=True)
        grad = (losses[1] - losses[2]) / (2 * eps) if two else (losses[1] - losses[0]) / eps
        self._update(seed, grad, ctx.lr)
        self._factors = {}
        return StepStats(losses[0], [grad], forwards, seeds)

    def replay(self, record: dict[str, Any]) -> None:
        raise ReplayUnsupported(
            "AGZO cannot be replayed from its update log: each step's direction depends on the "
            "activation bases of that step's batch, which the log does not carry (too large: "
            "Σ in·r floats per step). Resume from a checkpoint instead."
        )

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
