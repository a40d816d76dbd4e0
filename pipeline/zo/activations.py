"""Activation bases: capture the inputs of ``nn.Linear`` layers, then their top row space.

Shared by AGZO (a basis per step) and ZO-Act (a basis once). Notation of METHODS.md: ``X``
(N, in) is a layer's input over the N (non-padding) tokens of the global batch; the basis is an
orthonormal ``A`` (in, r) of the top-r right singular vectors of ``X`` (the top-r eigenvectors of
``XᵀX``), found by subspace iteration ``Q ← qr(Xᵀ(X Q))`` without ever forming ``XᵀX``.

Capture (:class:`RowCapture`). Forward pre-hooks on the chosen modules, registered only for the
forwards being recorded and removed afterwards, copy each layer's input rows:

- padding tokens are dropped with the batch's ``attention_mask`` (set on the capture by the
  method before it calls ``backend.loss``; a layer that sees only the last positions, such as an
  LM head under ``logits_to_keep``, gets the mask's last columns);
- at most ``cap`` rows per distinct input and forward are kept, a sample drawn without
  replacement from a generator seeded by ``(seed, group)``, so it is reproducible;
- consecutive hooked layers fed the same data (q/k/v, gate/up) share one row set. "The same
  data" is the same storage, offset, shape and stride as the previous hooked input, not the same
  tensor object: DeepSpeed ZeRO-3's module hooks hand each layer a fresh ``detach()`` of its
  input, so object identity would split q/k/v into three groups there and nowhere else (the
  bases, their seeds and the row samples would then depend on the backend). The previous input
  is held (a strong reference, one activation) until the next hooked layer runs, so its memory
  cannot be reused by a different tensor with the same address;
- rows are kept in the activations' own dtype on their device (no fp32 upcast of a layer's whole
  input); products upcast chunks of :data:`CHUNK` rows at a time.

Memory: kept rows (ZO-Act's calibration, over several forwards) cost ``cap · Σ_g in_g`` elements
of the storage dtype for the distinct inputs ``g`` of the hooked layers (e.g. a Llama block has
4: attention input, o_proj input, MLP input, down_proj input), held until the bases are computed,
plus a transient ``CHUNK · in`` fp32 chunk. E.g. Qwen3-0.6B with cap 2048 in bf16: 2048 · 28 ·
(1024 + 2048 + 1024 + 3072) · 2 B ≈ 0.8 GB; a 7B Llama: 2048 · 32 · 23296 · 2 B ≈ 3 GB. A
streaming capture (``stream=``, AGZO's basis of one forward) instead hands each group's rows to
a callback as soon as they are taken and keeps none: one group's rows at a time.

Distributed subspace iteration (:func:`subspace_bases`). Every rank runs the same iterations on
its own rows; per iteration the local products ``X_rᵀ(X_r Q)`` of all layers are concatenated
and averaged over ranks in ONE ``all_reduce_mean`` (float64, rank order: bitwise the same on
every rank), which is ``(1/W) XᵀX Q`` for the global ``X``; the QR (float64, on the CPU) of the
same numbers then gives the same ``Q`` on every rank, and the scale ``1/W`` does not change the
span. Communication: ``iters`` (+1 with Rayleigh–Ritz) collectives of ``Σ_g in_g · b`` float64
values for the groups given together (the bases of groups reduced alone or together are bitwise
the same: the reductions are elementwise). The initial ``Q`` comes from the seed
(:func:`pipeline.zo.noise.gaussian` keyed by the group's first module name), the same on every
rank. A streaming capture runs these collectives inside the forward, in the layer's pre-hook,
one group at a time: every rank runs the same hooks in the same order, and the sharded
backends have finished gathering the layer's weights before its hooks run (FSDP2 unshards the
whole block first; ZeRO-3's fetch hook runs before the capture's and prefetching is off).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase

import torch

from pipeline.zo.noise import gaussian
from pipeline.zo.seeds import mix, name_key

CHUNK = 1024


def linear_modules(model: torch.nn.Module, names: set[str] | None = None,
                   patterns: list[str] | None = None) -> dict[str, torch.nn.Linear]:
    """``{module name: nn.Linear}`` in the model's order, selected by exact module names
    (``names``) or fnmatch ``patterns``."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if names is not None and name not in names:
            continue
        if patterns is not None and not any(fnmatchcase(name, p) for p in patterns):
            continue
        out[name] = module
    return out


class RowCapture:
    """Masked, capped input rows of some ``nn.Linear`` layers, grouped by distinct input."""

    def __init__(self, modules: dict[str, torch.nn.Module], cap: int, seed: int, *,
                 stream: Callable[[str, torch.Tensor], None] | None = None):
        self.modules = modules
        self.cap = cap
        self.seed = seed
        self.stream = stream  # called with (group's first module, rows) instead of keeping them
        self.rows: list[list[torch.Tensor]] = []  # per group, the row blocks of each forward
        self.group_of: dict[str, int] = {}  # module name -> group
        self.first: list[str] = []  # per group, its first module (the group's stable name)
        self.mask: torch.Tensor | None = None
        self._last: tuple[tuple, torch.Tensor, int] | None = None  # (data key, input, group)
        self._forward = 0

    @contextmanager
    def record(self, mask: torch.Tensor | None) -> Iterator[RowCapture]:
        """Hooks on for the forwards inside the block; ``mask`` (B, T) marks real tokens."""
        self.mask = None if mask is None else mask.detach().to("cpu", torch.bool)
        self._last = None
        handles = [m.register_forward_pre_hook(self._hook_for(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._last = None
            self._forward += 1

    def _hook_for(self, name: str) -> Callable:
        def hook(module, args):
            del module
            if args and isinstance(args[0], torch.Tensor):
                self._take(name, args[0])

        return hook

    def _take(self, name: str, x: torch.Tensor) -> None:
        key = (x.device, x.dtype, x.data_ptr(), tuple(x.shape), x.stride())
        if self._last is not None and self._last[0] == key:  # the previous layer's data: share
            self.group_of.setdefault(name, self._last[2])
            return
        group = self.group_of.get(name)
        if group is None:
            group = len(self.rows)
            self.rows.append([])
            self.first.append(name)
            self.group_of[name] = group
        self._last = (key, x, group)
        rows = self._sample(x.detach(), group)
        if self.stream is not None:
            self.stream(self.first[group], rows)
        else:
            self.rows[group].append(rows)

    def _row_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        m = self.mask
        if m is None or m.dim() != 2:
            return None
        b, t = m.shape
        if x.dim() == 3 and x.shape[0] == b and x.shape[1] <= t:
            return m[:, t - x.shape[1]:].reshape(-1)  # left padding: the last positions
        if x.dim() == 2 and x.shape[0] == b * t:
            return m.reshape(-1)
        return None

    def _sample(self, x: torch.Tensor, group: int) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        keep = self._row_mask(x)
        index = (torch.arange(flat.shape[0]) if keep is None
                 else keep.nonzero().squeeze(1))
        if index.numel() > self.cap:
            gen = torch.Generator().manual_seed(mix(self.seed, group, self._forward))
            pick = torch.randperm(index.numel(), generator=gen)[: self.cap]
            index = index[pick.sort().values]
        return flat.index_select(0, index.to(flat.device))  # a copy: the activation can go

    def groups(self) -> list[tuple[str, list[torch.Tensor]]]:
        """``(first module name, row blocks)`` per distinct input, in first-seen order."""
        return list(zip(self.first, self.rows))

    def clear(self) -> None:
        self.rows = [[] for _ in self.rows]


def gram_product(blocks: list[torch.Tensor], q: torch.Tensor) -> torch.Tensor:
    """``Xᵀ(X Q)`` in fp32 for ``X`` the row blocks stacked, ``CHUNK`` rows upcast at a time.

    ``q`` is (in, b) on any device; returns an (in, b) fp32 CPU tensor.
    """
    inner, b = q.shape
    if not blocks:
        return torch.zeros(inner, b)
    device = blocks[0].device
    q32 = q.to(device, torch.float32)
    out = torch.zeros(inner, b, dtype=torch.float32, device=device)
    for block in blocks:
        for c in block.split(CHUNK):
            c = c.float()
            out.addmm_(c.T, c @ q32)
    return out.cpu()


def _orthonormal(y: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR of ``y`` (float64, CPU), or ``fallback`` if ``y`` is zero (no rows)."""
    if not torch.any(y != 0):
        return fallback
    return torch.linalg.qr(y).Q


def subspace_bases(groups: list[tuple[str, list[torch.Tensor]]], rank: int, iters: int,
                   seed: int, all_reduce_mean: Callable[[torch.Tensor], torch.Tensor], *,
                   oversample: int = 0, ritz: bool = False) -> list[torch.Tensor]:
    """An orthonormal basis (in, r) fp32 CPU per group: the top-r right singular vectors of the
    global ``X`` (all ranks' rows), by ``iters`` steps of block subspace iteration.

    ``oversample`` extra columns speed convergence; ``ritz`` adds a Rayleigh–Ritz step (one more
    product) so the columns are ordered eigenvectors, not just a basis of the subspace. Every
    rank must call this with the same groups in the same order (true for the same model).
    """
    if not groups:
        return []
    shapes = []
    qs = []
    for first, blocks in groups:
        inner = blocks[0].shape[1]
        b = min(rank + oversample, inner)
        r = min(rank, inner)
        init = gaussian(seed, name_key(first + "::basis.Q0"), 0, inner * b).view(inner, b)
        qs.append(torch.linalg.qr(init.double()).Q)
        shapes.append((inner, b, r))

    def products() -> list[torch.Tensor]:
        local = torch.cat([gram_product(blocks, q).reshape(-1)
                           for (_, blocks), q in zip(groups, qs)])
        total = all_reduce_mean(local).to(torch.float64)
        out, at = [], 0
        for inner, b, _ in shapes:
            out.append(total[at : at + inner * b].view(inner, b))
            at += inner * b
        return out

    for _ in range(iters):
        qs = [_orthonormal(y, q) for y, q in zip(products(), qs)]
    if ritz:
        bases = []
        for y, q, (_, _, r) in zip(products(), qs, shapes):
            small = q.T @ y
            vals, vecs = torch.linalg.eigh((small + small.T) / 2)
            order = torch.argsort(vals, descending=True)[:r]
            bases.append(_signed(q @ vecs[:, order]).float())
        return bases
    return [_signed(q[:, : r]).float().contiguous() for q, (_, _, r) in zip(qs, shapes)]


def _signed(basis: torch.Tensor) -> torch.Tensor:
    """Each column flipped so that its largest-magnitude entry is positive.

    A basis vector is defined up to sign, and which sign ``qr``/``eigh`` return can flip under
    rounding-level changes of their input (e.g. the rank-order sums of 1 vs 2 ranks). The sign
    matters to the methods: ZO-Act's perturbation ``Z Vᵀ`` and AGZO's ``R Aᵀ`` use the columns
    as they are, so a flipped column would send a run at another world size along the opposite
    direction for the same seed."""
    top = basis.abs().argmax(dim=0)
    signs = torch.sign(basis.gather(0, top.unsqueeze(0)))
    return basis * torch.where(signs == 0, torch.ones_like(signs), signs)


def per_rank_cap(total: int, world_size: int) -> int:
    """Rows each rank keeps so that all ranks together keep at most ``total``."""
    return max(1, math.ceil(total / world_size))
