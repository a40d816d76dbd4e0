"""Truncated SVD of a matrix held as flat slices on the ranks: a randomized range finder.

Halko, Martinsson & Tropp (2011), Algorithms 4.3/4.4 and 5.1: with a test matrix ``Ω`` (in, k),
``k = r + p`` (oversampling ``p``), ``Y = G Ω``; ``power_iters`` rounds of
``Y ← G orth(Gᵀ orth(Y))``; ``Q = orth(Y)``, ``B = Qᵀ G`` (k, in), ``B = Ũ S Vᵀ`` and
``G ≈ (Q Ũ) S Vᵀ``, truncated to rank ``r``.

Each rank holds the flat elements ``[start, start + n)`` of the (out, in) matrix ``G`` (a
ParamShard's layout). It forms the rows its slice touches, with zeros where another rank owns
the element, so ``G`` is the sum over ranks of these masked row blocks and every thin product
``G X`` / ``Gᵀ X`` is a sum of per-rank products: one all-reduce each (``reduce`` returns the
sum over ranks, the same numbers on every rank). ``Ω`` is drawn from a seed, so it is the same on
every rank; everything after the reductions (QR, the small SVD) runs on replicated inputs and
gives bitwise-identical factors on every rank. Nothing of the matrix's size is communicated:
``(2 + 2·power_iters)`` all-reduces of ``out·k`` or ``in·k`` float64 values.

The products and factorizations run in float64 (the slice is cast once), so the factors at world
sizes 1 and 2 differ only by the float64 rounding of the reductions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.zo.noise import gaussian

OVERSAMPLE = 10  # Halko et al.'s recommended p

Reduce = Callable[[torch.Tensor], torch.Tensor]


def covered_rows(shape: tuple[int, int], start: int, values: torch.Tensor
                 ) -> tuple[int, torch.Tensor]:
    """``(first row, rows)``: the rows of ``G`` that flat elements ``[start, start + n)`` touch,
    float64, with zeros where the slice does not reach."""
    out, inner = shape
    n = values.numel()
    r0 = start // inner
    r1 = max(r0, -(-(start + n) // inner))
    rows = torch.zeros((r1 - r0) * inner, dtype=torch.float64, device=values.device)
    rows[start - r0 * inner : start - r0 * inner + n] = values
    return r0, rows.view(r1 - r0, inner)


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y).Q


def sharded_svd(values: torch.Tensor, shape: tuple[int, int], start: int, rank: int, seed: int,
                key: int, reduce: Reduce, *, power_iters: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U (out, r), S (r,), V (in, r)`` (float64, CPU), ``r = min(rank, out, in)``, of the
    matrix whose flat elements ``[start, start + values.numel())`` this rank holds.

    ``Ω`` is ``gaussian(seed, key)`` over ``in·k`` elements. ``reduce(t)`` must return the sum of
    ``t`` over the ranks (identity in one process).
    """
    out, inner = shape
    k = min(rank + OVERSAMPLE, out, inner)
    r = min(rank, out, inner)
    r0, rows = covered_rows(shape, start, values)
    r1 = r0 + rows.shape[0]
    device = rows.device

    def times(x: torch.Tensor) -> torch.Tensor:  # G x, x (in, k) -> (out, k)
        y = torch.zeros(out, x.shape[1], dtype=torch.float64, device=device)
        y[r0:r1] = rows @ x.to(device)
        return reduce(y).to("cpu", torch.float64)

    def times_t(q: torch.Tensor) -> torch.Tensor:  # Gᵀ q, q (out, k) -> (in, k)
        return reduce(rows.T @ q[r0:r1].to(device)).to("cpu", torch.float64)

    omega = gaussian(seed, key, 0, inner * k).view(inner, k).double()
    y = times(omega)
    for _ in range(power_iters):
        y = times(_orth(times_t(_orth(y))))
    q = _orth(y)
    b = times_t(q).T  # Qᵀ G, (k, in)
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    return q @ ub[:, :r], s[:r].clone(), vh[:r].T.contiguous()
