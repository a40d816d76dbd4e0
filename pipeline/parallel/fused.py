"""A step's perturbed forwards in one pass: the batch repeated, each slice its own weights.

``backend.losses(batch, [at_1, ..., at_S])`` with ``train.fused_evaluations`` runs ONE forward on
the batch repeated ``S`` times along dim 0. Every module that owns trainable parameters directly
gets its ``forward`` wrapped (an instance attribute, like :mod:`pipeline.parallel.piecewise`):
called on the repeated rows, it runs its own forward once per slice ``i``, on rows
``[i B, (i+1) B)``, with transient weights ``cast(θ + α_i d)`` swapped in (``param.data =
buffer``) and the stored values swapped back, and concatenates the outputs. A slice with
``at = None`` reads the stored weights. Modules without trainable parameters (attention kernels,
activations, rotary embeddings, frozen layers) see the whole repeated batch once.

The wrapper runs inside the module's ``__call__``, after every forward pre-hook: after
DeepSpeed's gather of the module's parameters (ZeRO-3) and inside the unit whose pre-forward
FSDP2 has unsharded. So a sharded backend gathers the UNPERTURBED weights once, as inference
does (its own pre-gather delivery stays off), and every rank computes each slice's perturbed
full weights itself: the direction is keyed by global element index, so a rank can regenerate it
for every element of a gathered parameter (a shard with ``start = 0`` and all the elements), and
``cast(θ_j + α z_j)`` is a function of the element alone, bitwise what the sequential sharded
path delivers. Nothing more is communicated; each rank regenerates the whole model's direction
instead of its ``1/W`` share. The value comes from the stored weight: with fp32 masters (which
only the owning rank has) the sharded backends evaluate sequentially.

Per module and fused forward, a dense direction shared by several slices (MeZO's ``±εz``) is
generated once and each slice's weights derived from it (:func:`pipeline.zo.noise.apply_stored`,
bitwise :func:`~pipeline.zo.noise.apply`). A large embedding or linear layer on the single
backend computes each slice in pieces of its weight (:mod:`pipeline.parallel.piecewise`), as the
sequential path does. Memory beyond a sequential forward: the activations of ``S`` slices, and
one module's transient weights (and its ``z`` in fp32) at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch

from pipeline.parallel import piecewise
from pipeline.parallel.delivery import check_delivered
from pipeline.zo.noise_cache import NoiseCache
from pipeline.zo.perturbation import Perturbation
from pipeline.zo.shards import ParamShard


class _Slice:
    """One slice's perturbation, written into a module's transient weights (the ``delivery``
    that :mod:`piecewise` writes through); records the shards it reached."""

    def __init__(self, at: Perturbation):
        self.active = at
        self.delivered: set[str] = set()

    def write(self, shard: ParamShard, dst: torch.Tensor, offset: int = 0) -> None:
        self.active.write(shard, dst, offset)
        self.delivered.add(shard.name)


class FusedEvaluation:
    """The wrappers, and the perturbations of the fused forward in progress."""

    def __init__(self, model: torch.nn.Module, shards: list[ParamShard],
                 params: dict[str, torch.nn.Parameter], *, piecewise_large: bool = False):
        self.shards = shards
        self.slices: list[_Slice | None] | None = None
        self.rows = 0
        by_id = {id(params[s.name]): s for s in shards}
        for name, module in model.named_modules():
            named = {n: by_id[id(p)] for n, p in module.named_parameters(recurse=False)
                     if id(p) in by_id}
            if not named:
                continue
            pieces = piecewise_large and piecewise.qualifies(module, named.get("weight"))
            # the module's forward as it is now (piecewise's, if installed): with no delivery
            # active it is the module's own computation
            inner = module.forward
            module.forward = partial(_forward, self, name, module, inner, named, pieces)

    @contextmanager
    def evaluating(self, ats: Sequence[Perturbation | None], rows: int) -> Iterator[None]:
        """Run a forward of the batch (``rows`` rows) repeated ``len(ats)`` times, slice ``i``
        perturbed by ``ats[i]``; raises if a perturbed slice missed a trainable weight."""
        self.slices = [None if at is None else _Slice(at) for at in ats]
        self.rows = rows
        slices = self.slices
        try:
            yield
        finally:
            self.slices = None
        for s in slices:
            if s is not None:
                check_delivered(self.shards, s.delivered, "fused")


def _full(shard: ParamShard, param: torch.Tensor) -> ParamShard:
    """The shard over the whole (gathered) parameter the forward reads: the backend's own when
    it holds every element, else one with ``start = 0`` over the gathered values."""
    if shard.numel == shard.total:
        return shard
    return ParamShard(shard.name, shard.shape, 0, param.data.view(-1), decay=shard.decay,
                      noise=shard.noise)


def _once(shards: dict[str, ParamShard], slices: list[_Slice | None]) -> dict[str, ParamShard]:
    """The shards with a fresh one-module noise cache when a dense direction serves several
    slices (it is then generated once for this module), else unchanged."""
    seeds = [t.seed for s in slices if s is not None and len(s.active.terms) == 1
             for t in s.active.terms if t.seed is not None]
    if len(seeds) == len(set(seeds)):
        return shards
    cache = NoiseCache(len(set(seeds)))
    return {n: s if s.cache is not None else
            ParamShard(s.name, s.shape, s.start, s.local, s.master, s.decay, s.noise, cache)
            for n, s in shards.items()}


def _split(value, rows: int, parts: int):
    """``value``'s ``parts`` slices if it is a tensor of the repeated batch's rows (any multiple
    of them: a flattened (rows x positions) input splits the same way), else ``None``."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] % (rows * parts) == 0 \
            and value.shape[0]:
        return value.chunk(parts)
    return None


def _cat(outputs: list):
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, tuple | list) and first:
        return type(first)(_cat([o[j] for o in outputs]) if isinstance(first[j], torch.Tensor)
                           else first[j] for j in range(len(first)))
    raise TypeError(f"a fused forward cannot join outputs of type {type(first).__name__}")


def _forward(fused: FusedEvaluation, name: str, module: torch.nn.Module, inner, named, pieces,
             *args, **kwargs):
    slices = fused.slices
    if slices is None:
        return inner(*args, **kwargs)
    parts = len(slices)
    split_args = [_split(a, fused.rows, parts) for a in args]
    split_kwargs = {k: _split(v, fused.rows, parts) for k, v in kwargs.items()}
    if not any(s is not None for s in [*split_args, *split_kwargs.values()]):
        raise RuntimeError(f"{name}: no input of the fused forward has the repeated batch's "
                           f"{parts} x {fused.rows} rows; set train.fused_evaluations=false")
    params = dict(module.named_parameters(recurse=False))
    full = {n: _full(s, params[n]) for n, s in named.items()}
    if not pieces:
        full = _once(full, slices)
    outputs = []
    for i, s in enumerate(slices):
        a = [v if p is None else p[i] for v, p in zip(args, split_args)]
        kw = {k: v if split_kwargs[k] is None else split_kwargs[k][i] for k, v in kwargs.items()}
        if s is None:
            outputs.append(inner(*a, **kw))
        elif pieces:
            fn = piecewise.embedding if isinstance(module, torch.nn.Embedding) else \
                piecewise.linear
            outputs.append(fn(s, module, full, *a, **kw))
        else:
            outputs.append(_perturbed(s, params, full, inner, a, kw))
    return _cat(outputs)


def _perturbed(s: _Slice, params, full: dict[str, ParamShard], inner, args, kwargs):
    """The module's forward on one slice with ``cast(θ + α d)`` in place of its trainable
    weights (transient buffers; the stored tensors are swapped back)."""
    swapped = []
    try:
        for n, shard in full.items():
            param = params[n]
            buffer = torch.empty_like(param.data)
            s.write(shard, buffer.view(-1))
            swapped.append((param, param.data))
            param.data = buffer
        return inner(*args, **kwargs)
    finally:
        for param, stored in reversed(swapped):
            param.data = stored
