"""P-GAP: projected gradient-aligned perturbations, Mi et al., arXiv 2510.18228.

RECONSTRUCTION: the paper's body could not be read; this follows METHODS.md's reconstruction
(agreed by reviews and a re-implementation). The step labels below (R1-R3 for the refresh, P1-P4
for every step) are this docstring's, keyed to METHODS.md's sentences.

Refresh, every ``T = method.pgap_refresh_every`` steps (and at the first step, and after a resume
without factors), at the start of step ``t``:

R1. ``q = method.pgap_q`` dense two-sided probes along ``z_j`` of ``p_j = step_seed(run seed, t,
    1 + j)``: ``c_j = (L(θ + ε z_j) - L(θ - ε z_j)) / 2ε`` (``2q`` forwards, each asked for at its
    point; the stored weights are never moved and nothing is updated).
R2. Per trainable 2-D weight, one layer at a time: ``Ĝ = (1/q) Σ_j c_j z_j`` over this rank's
    slice, accumulated in fp32, formed block by block from the probes' regenerated noise each
    time the range finder reads it (never a whole layer's slice in memory).
R3. Rank-``r`` truncated SVD ``Ĝ ≈ U S Vᵀ`` (``r = min(method.pgap_rank, out, in)``) by the
    randomized range finder of :mod:`pipeline.zo.range_finder` (test matrix ``Ω`` of ``p_1`` keyed
    by ``"<name>::pgap.omega"``, ``method.pgap_power_iters`` power iterations), whose thin products
    are all-reduced per layer; the factors are bitwise the same on every rank.

Every step ``t`` (seed ``s = step_seed(run seed, t, 0)``):

P1. Per 2-D weight: core ``Ẑ ~ N(0, I)`` (r, r) of ``s`` keyed by ``"<name>::pgap.Z"``;
    ``S̃ = diag(S)`` (r, r); aligned core (:func:`aligned_core`, float64)
    ``Z = Ẑ - ((⟨S̃, Ẑ⟩ - ξ √δ ‖S̃‖) / ‖S̃‖²) S̃``, so ``⟨S̃, Z⟩ = ξ √δ ‖S̃‖``, with
    ``δ = method.pgap_delta`` and ``ξ = ±1`` from ``s`` (one sign per step, shared by all layers,
    so the aligned parts add up coherently across layers: a reconstruction choice).
P2. ``Δ = U Z Vᵀ`` on the 2-D weights; every other parameter gets MeZO's isotropic ``z`` of ``s``.
P3. Two-sided SPSA along ``Δ``: ``c = (L(θ + εΔ) - L(θ - εΔ)) / 2ε`` (2 forwards).
P4. ``θ ← θ - η (c Δ + λθ)`` (λ = ``weight_decay``, skipped for biases and norms), by stochastic
    rounding in 16-bit storage (:mod:`pipeline.zo.update`).

``‖Δ‖ = ‖Z‖ ≈ r`` on a weight against ``√(out·in)`` for MeZO's ``z``: learning rates do not
transfer from MeZO. Forwards: 2 per step, ``2 + 2q`` on refresh steps.

Sharding. A rank holding flat elements ``[a, a+n)`` of a weight forms only that slice of ``Ĝ``
(R2) and of ``Δ``: the slice of ``U Z Vᵀ`` comes from row chunks aligned to a global grid of
rows (:func:`row_pieces`), ``(U_chunk Z) Vᵀ``: ``U Z`` is formed chunk by chunk, never whole
(``r/in`` more arithmetic than from a stored ``U Z``, no ``out·r`` buffer per weight), each chunk
by matmuls of the same shapes on whichever rank computes it, so a direction element is bitwise the
same at any world size given the same factors.

Communication. Per step: one all-gather of the 2 loss scalars (``L+``, ``L-``), averaged in
float64 in rank order. Per refresh: one all-gather of the ``2q`` probe losses, then per 2-D
weight ``2 + 2·power_iters`` all-reduces of ``out·k`` or ``in·k`` float64 values
(``k = min(r + 10, out, in)``); no layer is gathered.

Memory. Per weight, ``V`` (``in·r``, the same on every rank: every row of ``Δ`` needs all of it),
``S`` (float64), the step's core ``Z`` (fp32, ``r·r``) and only the rows of ``U`` that this rank's
slice of the weight touches, rounded out to whole chunks of :func:`row_pieces` (``rows·r``):
``U`` is sharded like the weight, about ``out·r / W`` per rank. ``U`` and ``V`` are kept in the
dtype updates land in (:func:`factor_dtype`): the 16-bit storage dtype when there is no fp32
master, so the factors cost what the weights' own dtype costs (half of fp32); each chunk of
``U`` and ``V`` is upcast to fp32 where ``Δ`` is formed, so ``Δ`` is an fp32 function of the stored
factors, the same in the perturbation and the update (rounding the factors moves the direction
by about 2⁻⁸ relative in bf16, and ⟨S̃, Uᵀ Δ V⟩ = ξ√δ‖S̃‖ holds to that precision). A
refresh drops the old factors before fitting the new ones. During a refresh, one block of ``Ĝ``
(about ``BLOCK`` rows' worth) and the range finder's thin ``(out or in)·(r+10)`` float64
products of one layer: one ``(out, k)`` matrix at a time in one process (QR in place, the sum
over ranks in place, ``U``'s rows formed chunk by chunk in their storage dtype). The price:
each of the range finder's ``2 + 2·power_iters`` passes regenerates the ``q`` probes' noise
over the rank's slice (``q·(2 + 2·power_iters)`` dense regenerations per refresh instead of
``q``).

State and checkpoints. :meth:`state_dict` holds the step of the last refresh and every weight's
``S, V`` (CPU tensors; identical on all ranks, so the checkpoint's rank-0 ``method.pt`` carries
them). Each rank saves the rows of ``U`` whose first element it holds (:meth:`shard_state`, flat
slices of the ``(out, r)`` matrix at their global offset, so the ranks' rows tile ``U`` once and
reload at any world size); on resume each rank loads the rows it needs
(:meth:`shard_state_targets`). A resumed run continues bitwise. Logged per step:
``seeds = [s]`` (``[s, p_1..p_q]`` on refresh steps), ``projected_grad = [c]`` and on refresh
steps ``probe_grads = [c_1..c_q]``:
:meth:`replay` refits the factors from those (no forward), so a single-process run replays
bitwise; a sharded run's log replays to the float64 rounding of its reductions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from pipeline.heap import mapped_above
from pipeline.zo.directions import Term, f32, z_blocks
from pipeline.zo.methods.base import StepContext, StepStats
from pipeline.zo.methods.lozo import is_matrix
from pipeline.zo.noise import BLOCK, gaussian
from pipeline.zo.perturbation import Perturbation
from pipeline.zo.range_finder import sharded_svd
from pipeline.zo.rounding import ROUNDED, rounding_seed
from pipeline.zo.seeds import mix, name_key, step_seed
from pipeline.zo.shards import ParamShard
from pipeline.zo.update import update

XI_TAG = 0x5047_4150  # "PGAP": the sign ξ is a hash of the step seed and this tag
U_STATE = "pgap.U::"  # sharded state: rows of each weight's U


def aligned_core(zhat: torch.Tensor, s: torch.Tensor, xi: float, delta: float) -> torch.Tensor:
    """P1: ``Z = Ẑ - ((⟨S̃, Ẑ⟩ - ξ √δ ‖S̃‖) / ‖S̃‖²) S̃`` with ``S̃ = diag(s)``, in float64."""
    zhat, s = zhat.to(torch.float64), s.to(torch.float64)
    norm = s.norm()
    coeff = (s @ zhat.diagonal() - xi * math.sqrt(delta) * norm) / norm**2
    z = zhat.clone()
    z.diagonal().sub_(coeff * s)
    return z


def step_sign(seed: int) -> float:
    """ξ = ±1 of a step seed."""
    return 1.0 if mix(seed, XI_TAG) & 1 else -1.0


def factor_dtype(shard: ParamShard) -> torch.dtype:
    """The dtype ``U`` and ``V`` are kept in: the dtype updates land in (the 16-bit storage
    dtype without a master; fp32 with a master or fp32 weights)."""
    dtype = shard.weights.dtype
    return dtype if dtype in ROUNDED else torch.float32


def chunk_rows(inner: int) -> int:
    """Rows per chunk of :func:`row_pieces` for a weight of ``inner`` columns."""
    return max(1, BLOCK // inner)


def needed_rows(shape: tuple[int, int], start: int, numel: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``U`` a slice ``[start, start+numel)`` of a weight needs: the whole
    chunks its rows fall in."""
    out, inner = shape
    if numel <= 0:
        return 0, 0
    c = chunk_rows(inner)
    return (start // inner) // c * c, min(out, ((start + numel - 1) // inner // c + 1) * c)


def owned_rows(shape: tuple[int, int], start: int, numel: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` whose first element lies in ``[start, start+numel)``: over the ranks'
    slices these tile the rows exactly once."""
    inner = shape[1]
    return -(-start // inner), -(-(start + numel) // inner)


def row_pieces(a: torch.Tensor, b: torch.Tensor, start: int, numel: int, row0: int = 0,
               out: int | None = None, core: torch.Tensor | None = None
               ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(offset, piece)`` covering flat elements ``[start, start+numel)`` of ``a bᵀ`` (of
    ``a core bᵀ`` with a square ``core``), where ``a`` holds rows ``[row0, row0 + len(a))`` of an
    ``out``-row matrix (all of it by default).

    Rows are computed in chunks of :func:`chunk_rows` rows aligned to multiples of that size
    (``a`` must hold the whole chunks asked for: :func:`needed_rows`), each chunk by matmuls of a
    fixed shape, so an element is bitwise the same whichever slice asks for it. Pieces are fresh
    tensors the caller may modify. ``a`` and ``b`` may be 16-bit: each chunk is formed in fp32.
    """
    if numel <= 0:
        return
    inner = b.shape[0]
    out = row0 + a.shape[0] if out is None else out
    chunk = chunk_rows(inner)
    bt = b.float().T.contiguous()
    end = start + numel
    for c in range(start // inner // chunk, (end - 1) // inner // chunk + 1):
        r0, r1 = c * chunk, min((c + 1) * chunk, out)
        rows = a[r0 - row0 : r1 - row0].float()
        flat = ((rows if core is None else rows @ core) @ bt).view(-1)
        lo, hi = max(start, r0 * inner), min(end, r1 * inner)
        yield lo - start, flat[lo - r0 * inner : hi - r0 * inner]


class PGAP:
    def __init__(self, cfg: Any, shards: list[ParamShard]):
        self.cfg = cfg
        self.shards = shards
        self.q = cfg.pgap_q
        # per weight: (rows [lo, hi) of U, S, V) and lo
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.row0: dict[str, int] = {}
        self.refreshed_at: int | None = None
        self._cores: dict[str, torch.Tensor] = {}  # the aligned core Z of each weight, this step
        self._by_name = {s.name: s for s in shards}

    def refresh_due(self, step: int) -> bool:
        return self.refreshed_at is None or step - self.refreshed_at >= self.cfg.pgap_refresh_every

    # -- the refresh (R1-R3) ------------------------------------------------------------------

    def _probe(self, seeds: list[int], losses) -> list[torch.Tensor]:
        """R1: the ``2q`` probe forwards, asked for in one call."""
        eps = self.cfg.eps
        return losses([Perturbation.dense(s, a * eps) for s in seeds for a in (1, -1)])

    def estimate(self, shard: ParamShard, seeds: list[int], grads: list[float], offset: int = 0,
                 numel: int | None = None) -> torch.Tensor:
        """R2: elements ``[offset, offset + numel)`` of this rank's slice of
        ``Ĝ = (1/q) Σ_j c_j z_j`` (fp32, on the shard's device; default: the whole slice). Each
        element is accumulated in the same order whatever the range, so any part is bitwise that
        part of the whole."""
        numel = shard.numel - offset if numel is None else numel
        g = torch.zeros(numel, dtype=torch.float32, device=shard.local.device)
        for seed, c in zip(seeds, grads):
            alpha = f32(c / len(seeds))
            for off, z in z_blocks(seed, shard, offset, numel):
                g[off : off + z.numel()].add_(z.to(g.device).mul_(alpha))
        return g

    def _rows(self, shard: ParamShard, seeds: list[int], grads: list[float]):
        """Rows ``[a, b)`` of this rank's masked ``Ĝ`` (float64, zeros off the slice), formed
        from the probes' noise when asked (R2 feeding R3): no layer's ``Ĝ`` is ever held."""
        inner, first, end = shard.shape[1], shard.start, shard.start + shard.numel

        def rows(a: int, b: int) -> torch.Tensor:
            block = torch.zeros((b - a) * inner, dtype=torch.float64, device=shard.local.device)
            lo, hi = max(a * inner, first), min(b * inner, end)
            if hi > lo:
                block[lo - a * inner : hi - a * inner] = self.estimate(shard, seeds, grads,
                                                                       lo - first, hi - lo)
            return block.view(b - a, inner)

        return rows

    def fit(self, seeds: list[int], grads: list[float], reduce) -> None:
        """R2-R3 for every 2-D weight, one at a time; ``reduce`` sums over ranks. The previous
        factors are dropped first: old and new never coexist."""
        self.factors, self.row0, self._cores = {}, {}, {}
        factors, row0 = {}, {}
        for shard in self.shards:
            if not is_matrix(shard):
                continue
            device = shard.local.device
            lo, hi = needed_rows(shard.shape, shard.start, shard.numel)
            dtype = factor_dtype(shard)
            u, s, v = sharded_svd(self._rows(shard, seeds, grads), shard.shape, shard.start,
                                  shard.numel, self.cfg.pgap_rank, seeds[0],
                                  name_key(shard.name + "::pgap.omega"), reduce,
                                  power_iters=self.cfg.pgap_power_iters, device=device,
                                  u_rows=(lo, hi), u_dtype=dtype)
            factors[shard.name] = (u, s, v.to(device, dtype))
            row0[shard.name] = lo
        self.factors, self.row0 = factors, row0

    def probe_seeds(self, run_seed: int, step: int) -> list[int]:
        return [step_seed(run_seed, step, 1 + j) for j in range(self.q)]

    def refresh(self, ctx: StepContext) -> list[float] | None:
        """R1-R3 at ``ctx.step``; the probe projected gradients, or None if a loss was not
        finite (the old factors stay and the refresh stays due)."""
        backend, eps = ctx.backend, self.cfg.eps
        seeds = self.probe_seeds(ctx.run_seed, ctx.step)
        # the probes' and the fit's transients get mappings of their own and leave the resident
        # set when freed (on CPU; see pipeline.heap)
        with mapped_above():
            local = self._probe(seeds, lambda ats: backend.losses(ctx.batch, ats))
            losses = backend.all_reduce_mean(torch.stack(local)).tolist()
            if not all(math.isfinite(v) for v in losses):
                return None
            grads = [(losses[2 * j] - losses[2 * j + 1]) / (2 * eps) for j in range(self.q)]
            world = backend.world_size
            # the sum in place: a copy of the thin (out, k) product would double the fit's peak
            self.fit(seeds, grads, lambda t: backend.all_reduce_mean(t).mul_(world))
        self.refreshed_at = ctx.step
        return grads

    # -- every step (P1-P4) -------------------------------------------------------------------

    def set_cores(self, seed: int) -> None:
        """P1: the aligned core ``Z`` of every weight for the step seed."""
        xi, delta = step_sign(seed), self.cfg.pgap_delta
        self._cores = {}
        for name, (u, s, _) in self.factors.items():
            r = s.numel()
            zhat = gaussian(seed, name_key(name + "::pgap.Z"), 0, r * r).view(r, r)
            z = aligned_core(zhat, s, xi, delta)
            self._cores[name] = z.to(u.device, torch.float32)

    def direction(self, shard: ParamShard, seed: int, offset: int = 0,
                  numel: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """P2: elements ``[offset, offset + numel)`` of this shard's part of ``Δ``, ``(offset,
        piece)`` as in ``iter_blocks`` (default: the whole shard)."""
        numel = shard.numel - offset if numel is None else numel
        start = shard.start + offset
        if shard.name in self._cores:
            u, _, v = self.factors[shard.name]
            yield from row_pieces(u, v, start, numel, self.row0[shard.name], shard.shape[0],
                                  core=self._cores[shard.name])
        else:
            yield from z_blocks(seed, shard, offset, numel)

    def _pieces(self, seed: int):
        return lambda shard, offset, numel: self.direction(shard, seed, offset, numel)

    def _measure(self, seed: int, loss) -> list[torch.Tensor]:
        """P3's forwards, one at a time: a rank's factors hold only the rows of ``U`` its own
        shard needs, so the direction cannot be evaluated on a gathered weight (which a fused
        evaluation, ``backend.losses``, does)."""
        eps = self.cfg.eps
        return [loss(Perturbation.along(self._pieces(seed), eps)),
                loss(Perturbation.along(self._pieces(seed), -eps))]

    def _update(self, seed: int, grad: float, lr: float) -> None:
        """P4."""
        update(self.shards, [Term(-lr * grad, pieces=self._pieces(seed))],
               rounding=rounding_seed(seed), decay=lr * self.cfg.weight_decay)

    def step(self, ctx: StepContext) -> StepStats:
        eps = self.cfg.eps
        seed = step_seed(ctx.run_seed, ctx.step, 0)
        seeds, extra, forwards = [seed], {}, 2
        if self.refresh_due(ctx.step):
            seeds += self.probe_seeds(ctx.run_seed, ctx.step)
            forwards += 2 * self.q
            grads = self.refresh(ctx)
            if grads is None:
                return StepStats(math.nan, [math.nan], 2 * self.q, seeds, skipped=True)
            extra["probe_grads"] = grads
        self.set_cores(seed)
        local = self._measure(seed, lambda at: ctx.backend.loss(ctx.batch, at))
        losses = ctx.backend.all_reduce_mean(torch.stack(local)).tolist()
        if not all(math.isfinite(v) for v in losses):
            return StepStats(math.nan, [math.nan], forwards, seeds, skipped=True, extra=extra)
        grad = (losses[0] - losses[1]) / (2 * eps)
        self._update(seed, grad, ctx.lr)
        return StepStats(sum(losses) / 2, [grad], forwards, seeds, extra=extra)

    def replay(self, record: dict[str, Any]) -> None:
        """Re-apply a logged step (in order from step 1, no forward); a refresh is refitted from
        the logged probe gradients."""
        seed, probes = record["seeds"][0], record["seeds"][1:]
        if "probe_grads" in record:
            self.fit(probes, record["probe_grads"], lambda t: t.to(torch.float64))
            self.refreshed_at = record["step"] - 1
        elif probes:  # the refresh's losses were not finite: nothing else happened
            return
        if record.get("skipped"):
            return
        self.set_cores(seed)
        self._update(seed, record["projected_grad"][0], record["lr"])

    def state_dict(self) -> dict[str, Any]:
        """The replicated state: the step of the last refresh, and ``S, V`` of every weight
        (the rows of ``U`` are sharded: :meth:`shard_state`)."""
        return {"refreshed_at": self.refreshed_at,
                "factors": {n: {"S": s.cpu(), "V": v.cpu()}
                            for n, (_, s, v) in self.factors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.refreshed_at = state["refreshed_at"]
        self.factors, self.row0 = {}, {}
        for name, f in state["factors"].items():
            shard = self._by_name[name]
            lo, hi = needed_rows(shard.shape, shard.start, shard.numel)
            u = torch.zeros(hi - lo, f["S"].numel(), dtype=f["V"].dtype,
                            device=shard.local.device)
            self.factors[name] = (u, f["S"], f["V"].to(shard.local.device))
            self.row0[name] = lo

    def _u_shard(self, name: str, rows: tuple[int, int]) -> ParamShard:
        u, lo = self.factors[name][0], self.row0[name]
        out, r = self._by_name[name].shape[0], u.shape[1]
        key = U_STATE + name
        return ParamShard(key, (out, r), rows[0] * r, u[rows[0] - lo : rows[1] - lo].view(-1))

    def shard_state(self) -> dict[str, ParamShard]:
        """The rows of ``U`` whose first element this rank holds, as flat slices of ``U``."""
        return {U_STATE + n: self._u_shard(n, owned_rows(self._by_name[n].shape,
                                                         self._by_name[n].start,
                                                         self._by_name[n].numel))
                for n in self.factors}

    def shard_state_targets(self) -> dict[str, ParamShard]:
        """Where a checkpoint's rows of ``U`` go: all the rows this rank needs."""
        return {U_STATE + n: self._u_shard(n, (self.row0[n],
                                               self.row0[n] + self.factors[n][0].shape[0]))
                for n in self.factors}

    def load_shard_state(self, state: dict[str, torch.Tensor]) -> None:
        """The tensors were loaded in place into :meth:`shard_state_targets`' views."""
        missing = [U_STATE + n for n in self.factors if U_STATE + n not in state]
        if missing:
            raise KeyError(f"P-GAP shard state has no {missing[0]}")
