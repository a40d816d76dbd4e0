"""LOZO: low-rank zeroth-order SGD, Chen et al., arXiv 2410.07698 (Algorithm 1).

Per step ``t`` (0-based), for every trainable 2-D weight ``W`` of shape ``(out, in)``:

- ``U ~ N(0, I)`` of shape ``(out, r)``, fresh each step, from the step seed
  ``s_U = step_seed(run seed, t, 0)`` (Alg. 1, "sample U");
- ``V ~ N(0, I)`` of shape ``(in, r)``, redrawn every ``ν`` steps (lazy sampling): from
  ``s_V = step_seed(run seed, ν⌊t/ν⌋, 1)``, the seed of its refresh period (Alg. 1, "if t mod ν = 0:
  sample V");
- the direction is ``Δ = U Vᵀ``; every other parameter (biases, norms, any non-2-D tensor) gets
  the isotropic ``z ~ N(0, I)`` of ``s_U``, as in MeZO;
- two-sided SPSA along the direction: ``c = (L(θ + εΔ) - L(θ - εΔ)) / 2ε`` (2 forwards);
- update ``W ← W - η (c U Vᵀ / r + λW)`` with the SAME ``U`` (and ``V``) as measured (the official
  code draws a new ``U`` for the update on refresh steps; that bug is not reproduced), and
  ``θ ← θ - η (c z + λθ)`` for the other parameters. λ (pipeline addition, 0 by default) skips
  biases and norms.

``E[c U Vᵀ / r | V] = ∇W V Vᵀ / r`` (the gradient projected onto the span of ``V``'s columns,
scaled by ``VᵀV / r ≈ in``) and, over ``V``, ``E[c U Vᵀ / r] = ∇W``.

``r = method.lozo_rank``, ``ν = method.lozo_nu``. LOZO is two-sided with one direction per step:
``method.two_sided`` and ``method.n_directions`` are not used.

Sharding. ``U`` and ``V`` are small replicated tensors (``(out + in)·r`` numbers per weight)
drawn with :func:`pipeline.zo.noise.gaussian` over their ``out·r`` and ``in·r`` elements, keyed
by the parameter's name (``"<name>::lozo.U"`` / ``"::lozo.V"``), so every rank draws the same
ones. A rank owning the flat elements ``[a, a+n)`` of ``W`` forms only rows
``[a // in, ⌈(a+n) / in⌉)`` of ``U Vᵀ`` (in chunks of at most ``noise.BLOCK`` elements) and takes
the exact flat sub-range: the slices may cross row boundaries. Each element is
``Σ_k U[i,k] V[j,k]`` by elementwise multiplies and adds in the order ``k = 0..r-1`` (no matmul,
whose reduction order may depend on the matrix sizes), so it is bitwise the same whichever rank
computes it. Nothing of parameter size is stored or sent.

Communication per step: one all-gather of 2 loss scalars (``L+``, ``L-``), averaged in float64
in rank order.

State: none (``V`` is a function of the run seed and the period). Logged per step: ``seeds`` =
``[s_U, s_V]`` and ``projected_grad`` = ``[c]``, from which :meth:`replay` re-applies the step with
the same arithmetic and no forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from pipeline.zo.directions import Term, z_blocks
from pipeline.zo.methods.base import StepContext, StepStats
from pipeline.zo.noise import BLOCK, gaussian
from pipeline.zo.perturbation import Perturbation
from pipeline.zo.rounding import rounding_seed
from pipeline.zo.seeds import name_key, step_seed
from pipeline.zo.shards import ParamShard
from pipeline.zo.update import update

Factors = tuple[torch.Tensor, torch.Tensor]



def is_matrix(shard: ParamShard) -> bool:
    """The weights that get a low-rank direction: every 2-D parameter."""
    return len(shard.shape) == 2


def factors(shard: ParamShard, u_seed: int, v_seed: int, rank: int) -> Factors:
    """``U (out, r)`` of ``u_seed`` and ``V (in, r)`` of ``v_seed`` for a 2-D parameter."""
    out, inner = shard.shape
    u = gaussian(u_seed, name_key(shard.name + "::lozo.U"), 0, out * rank).view(out, rank)
    v = gaussian(v_seed, name_key(shard.name + "::lozo.V"), 0, inner * rank).view(inner, rank)
    return u, v


def low_rank_pieces(u: torch.Tensor, v: torch.Tensor, start: int, numel: int
                    ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(offset, piece)`` covering flat elements ``[start, start+numel)`` of ``U Vᵀ``.

    ``offset`` is relative to ``start``; each piece is a fresh fp32 tensor the caller may modify.
    """
    if numel <= 0:
        return
    inner, rank = v.shape
    end = start + numel
    rows = max(1, BLOCK // inner)
    vt = v.T.contiguous()  # (r, in): row k is V[:, k]
    for r0 in range(start // inner, (end - 1) // inner + 1, rows):
        r1 = min(r0 + rows, (end - 1) // inner + 1)
        block = u[r0:r1, 0:1] * vt[0]
        for k in range(1, rank):
            block.add_(u[r0:r1, k : k + 1] * vt[k])
        flat = block.view(-1)
        lo, hi = max(start, r0 * inner), min(end, r1 * inner)
        yield lo - start, flat[lo - r0 * inner : hi - r0 * inner]


class LOZO:
    def __init__(self, cfg: Any, shards: list[ParamShard]):
        self.cfg = cfg
        self.shards = shards
        self.rank = cfg.lozo_rank
        self._cache: tuple[tuple[int, int], dict[str, Factors]] | None = None

    def seeds(self, run_seed: int, step: int) -> list[int]:
        """``[s_U, s_V]`` of a step: ``U`` of the step, ``V`` of its refresh period."""
        nu = self.cfg.lozo_nu
        return [step_seed(run_seed, step, 0), step_seed(run_seed, nu * (step // nu), 1)]

    def _factors(self, shard: ParamShard, seeds: list[int]) -> Factors:
        """``U, V`` of a 2-D shard for these seeds, drawn once per step and parameter."""
        key = (seeds[0], seeds[1])
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, {})
        table = self._cache[1]
        if shard.name not in table:
            u, v = factors(shard, seeds[0], seeds[1], self.rank)
            table[shard.name] = (u.to(shard.local.device), v.to(shard.local.device))
        return table[shard.name]

    def direction(self, shard: ParamShard, seeds: list[int], offset: int = 0,
                  numel: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Elements ``[offset, offset + numel)`` of this shard's part of the step's direction,
        ``(offset, piece)`` as in ``iter_blocks`` (default: the whole shard)."""
        numel = shard.numel - offset if numel is None else numel
        if is_matrix(shard):
            u, v = self._factors(shard, seeds)
            yield from low_rank_pieces(u, v, shard.start + offset, numel)
        else:
            yield from z_blocks(seeds[0], shard, offset, numel)

    def _pieces(self, seeds: list[int]):
        return lambda shard, offset, numel: self.direction(shard, seeds, offset, numel)

    def _update(self, seeds: list[int], grad: float, lr: float) -> None:
        """``W ← (1 - ηλ) W - η c U Vᵀ / r`` (``θ ← (1 - ηλ) θ - η c z`` off the matrices)."""
        term = Term(lambda shard: -lr * grad / (self.rank if is_matrix(shard) else 1),
                    pieces=self._pieces(seeds))
        update(self.shards, [term], rounding=rounding_seed(seeds[0]),
               decay=lr * self.cfg.weight_decay)

    def _measure(self, seeds: list[int], losses) -> list[torch.Tensor]:
        """``L(θ + εΔ)``, ``L(θ - εΔ)`` (this rank's), asked for in one call."""
        eps = self.cfg.eps
        return losses([Perturbation.along(self._pieces(seeds), eps),
                       Perturbation.along(self._pieces(seeds), -eps)])

    def step(self, ctx: StepContext) -> StepStats:
        eps = self.cfg.eps
        seeds = self.seeds(ctx.run_seed, ctx.step)
        local = self._measure(seeds, lambda ats: ctx.backend.losses(ctx.batch, ats))
        losses = ctx.backend.all_reduce_mean(torch.stack(local)).tolist()
        if not all(math.isfinite(v) for v in losses):
            return StepStats(math.nan, [math.nan], 2, seeds, skipped=True)
        grad = (losses[0] - losses[1]) / (2 * eps)
        self._update(seeds, grad, ctx.lr)
        return StepStats(sum(losses) / 2, [grad], 2, seeds)

    def replay(self, record: dict[str, Any]) -> None:
        """Re-apply a logged step (no forward: the measurements never moved the weights)."""
        if not record.get("skipped"):
            self._update(record["seeds"], record["projected_grad"][0], record["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
