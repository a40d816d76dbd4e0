"""A linear layer's product computed in row chunks of its weight, written into one output.

Used where a layer's weight must be materialised piece by piece (a perturbed or upcast copy):
each chunk of ``rows`` weight rows gives its columns of the output, so at any time one chunk's
weight and one chunk's output part exist beside the output itself. An LM head's output part is
the kept tokens (``logits_to_keep``: one per row on a classification batch, the candidate's
tokens otherwise) times the chunk's vocabulary rows, so :func:`chunk_rows` bounds both.
The products are the same dot products as one big product; a BLAS may block them differently,
so the outputs agree to rounding, deterministically.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def chunk_rows(x: torch.Tensor, in_features: int, weight_bytes: int, out_bytes: int,
               limit: int) -> int:
    """Rows per chunk such that a chunk's weight (``weight_bytes`` per element) and its part of
    the output (``out_bytes`` per element, one column per row for each of ``x``'s tokens) each
    stay under ``limit`` bytes (at least one row)."""
    tokens = x.numel() // in_features
    return max(1, min(limit // (in_features * weight_bytes), limit // max(1, tokens * out_bytes)))


def linear_in_chunks(x: torch.Tensor, out_features: int, rows: int,
                     chunk: Callable[[int, int], tuple[torch.Tensor, torch.Tensor | None]]
                     ) -> torch.Tensor:
    """``F.linear`` of ``x`` with the weight whose rows ``[a, b)`` (and bias entries) ``chunk(a,
    b)`` returns, ``rows`` rows at a time, into one output tensor."""
    out = None
    for a in range(0, out_features, rows):
        b = min(a + rows, out_features)
        weight, bias = chunk(a, b)
        part = F.linear(x, weight, bias)
        if out is None:
            out = part.new_empty(*part.shape[:-1], out_features)
        out[..., a:b] = part
    return out
