"""A large embedding or linear layer's perturbed forward, computed in pieces of its weight.

Swapping a transient perturbed copy in for a module's forward (:mod:`swap_delivery`) costs one
copy of that module's weights. For most modules that is small, but the largest one (a
vocabulary embedding, an LM head, a 13B model's MLP matrix) is then what training holds beyond
inference: on the demo model the tied embedding is 21% of the weights. A plain ``nn.Embedding``
or ``nn.Linear`` (exactly those types: a subclass may compute more in its own forward) whose
trainable weight is larger than :data:`PIECE_BYTES` therefore computes its perturbed forward
from pieces of the perturbed weight, each written by the delivery from the stored values
(:meth:`Delivery.write`) and dropped after use:

- embedding: only the rows the batch looks up, so its output is bitwise that of the whole
  perturbed weight;
- linear: row chunks of the weight, each giving its columns of the output (the products are the
  same dot products; a BLAS may block them differently than one big product, so the outputs agree
  to rounding, deterministically). A chunk is sized so that both the weight piece and its part of
  the output stay under :data:`PIECE_BYTES`: an LM head's output part is the batch's tokens times
  the chunk's vocabulary rows, and with 16 MiB weight pieces that part (26 MiB on the fp16 demo
  batch) plus the piece was 45 MiB beyond inference (``bench/memory.py``).

With no perturbation active the module runs its own forward unchanged.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from pipeline.zo.shards import ParamShard

PIECE_BYTES = 4 * 2**20  # a weight larger than this is perturbed in pieces of at most this size


def qualifies(module: torch.nn.Module, weight_shard: ParamShard | None) -> bool:
    """Whether ``module``'s perturbed forward runs in pieces (its weight trainable and large)."""
    if weight_shard is None or type(module) not in (torch.nn.Embedding, torch.nn.Linear):
        return False
    if isinstance(module, torch.nn.Embedding) and module.max_norm is not None:
        return False  # max_norm renormalises the looked-up rows in place
    weight = module.weight
    return weight.numel() * weight.element_size() > PIECE_BYTES


def install(module: torch.nn.Module, delivery, shards: dict[str, ParamShard]) -> None:
    """Make ``module`` compute its forward in pieces while ``delivery`` has a perturbation.
    ``shards`` maps the module's own parameter names (``weight``, ``bias``) to its trainable
    shards."""
    own = type(module).forward
    fn = embedding if isinstance(module, torch.nn.Embedding) else linear
    # an instance attribute (a partial of module-level functions: the model still pickles)
    module.forward = partial(_forward, delivery, module, own, fn, shards)


def _forward(delivery, module, own, fn, shards, *args, **kwargs):
    if delivery.active is None:
        return own(module, *args, **kwargs)
    return fn(delivery, module, shards, *args, **kwargs)


def embedding(delivery, module: torch.nn.Embedding, shards, ids: torch.Tensor):
    weight, shard = module.weight, shards["weight"]
    dim = weight.shape[1]
    rows, where = torch.unique(ids.reshape(-1), return_inverse=True)
    table = torch.empty(rows.numel(), dim, dtype=weight.dtype, device=weight.device)
    for j, row in enumerate(rows.tolist()):
        delivery.write(shard, table[j], offset=row * dim)
    return F.embedding(where.view(ids.shape), table)


def linear(delivery, module: torch.nn.Linear, shards, x: torch.Tensor):
    weight, shard = module.weight, shards["weight"]
    out_features, in_features = weight.shape
    bias = module.bias
    if bias is not None and "bias" in shards:
        bias = torch.empty_like(bias)
        delivery.write(shards["bias"], bias)
    tokens = x.numel() // in_features
    step = max(1, min(PIECE_BYTES // (in_features * weight.element_size()),
                      PIECE_BYTES // max(1, tokens * x.element_size())))
    out = None
    for a in range(0, out_features, step):
        b = min(a + step, out_features)
        piece = torch.empty(b - a, in_features, dtype=weight.dtype, device=weight.device)
        delivery.write(shard, piece.view(-1), offset=a * in_features)
        part = F.linear(x, piece, None if bias is None else bias[a:b])
        if out is None:
            out = part.new_empty(*part.shape[:-1], out_features)
        out[..., a:b] = part
    return out
