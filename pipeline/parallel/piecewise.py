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
- linear: row chunks of the weight (:mod:`pipeline.models.chunked_linear`), each chunk's weight
  piece and its part of the output under :data:`PIECE_BYTES` (with 16 MiB pieces MeZO's fp16
  training peak on the demo model was 46 MiB above inference, with 4 MiB pieces 1 MiB below,
  ``bench/memory.py``; the head sees only the kept positions, ``logits_to_keep``, so on a
  classification batch its output parts are small and the weight pieces are what counts).

With no perturbation active the module runs its own forward unchanged.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from pipeline.models.chunked_linear import chunk_rows, linear_in_chunks
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
    rows = chunk_rows(x, in_features, weight.element_size(), x.element_size(), PIECE_BYTES)

    def chunk(a: int, b: int):
        piece = torch.empty(b - a, in_features, dtype=weight.dtype, device=weight.device)
        delivery.write(shard, piece.view(-1), offset=a * in_features)
        return piece, None if bias is None else bias[a:b]

    return linear_in_chunks(x, out_features, rows, chunk)
