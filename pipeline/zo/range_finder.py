"""Truncated SVD of a matrix held as flat slices on the ranks: a randomized range finder.

Halko, Martinsson & Tropp (2011), Algorithms 4.3/4.4 and 5.1: with a test matrix ``Ω`` (in, k),
``k = r + p`` (oversampling ``p``), ``Y = G Ω``; ``power_iters`` rounds of
``Y ← G orth(Gᵀ orth(Y))``; ``Q = orth(Y)``, ``B = Qᵀ G`` (k, in), ``B = Ũ S Vᵀ`` and
``G ≈ (Q Ũ) S Vᵀ``, truncated to rank ``r``.

Each rank holds the flat elements ``[start, start + n)`` of the (out, in) matrix ``G`` (a
ParamShard's layout). It sees the rows its slice touches, with zeros where another rank owns
the element, so ``G`` is the sum over ranks of these masked row blocks and every thin product
``G X`` / ``Gᵀ X`` is a sum of per-rank products: one all-reduce each (``reduce`` returns the
sum over ranks, the same numbers on every rank). ``Ω`` is drawn from a seed, so it is the same on
every rank; everything after the reductions (QR, the small SVD) runs on replicated inputs and
gives bitwise-identical factors on every rank. Nothing of the matrix's size is communicated:
``(2 + 2·power_iters)`` all-reduces of ``out·k`` or ``in·k`` float64 values.

The rank's rows are never held at once: ``G`` is given as a function of a row range
(:data:`RowBlocks`), asked for blocks of about ``BLOCK`` elements in each product, so the
memory of a fit is the thin products plus one block (P-GAP forms a block of ``Ĝ`` from the
probes' noise each time it is asked, rather than keeping a layer's ``Ĝ``).

The products and factorizations run in float64, so the factors at world sizes 1 and 2 differ
only by the float64 rounding of the reductions.
"""

from __future__ import annotations

from collections.abc import Callable

import scipy.linalg
import torch

from pipeline.zo.noise import BLOCK, gaussian

OVERSAMPLE = 10  # Halko et al.'s recommended p

Reduce = Callable[[torch.Tensor], torch.Tensor]


RowBlocks = Callable[[int, int], torch.Tensor]  # rows [a, b) of this rank's masked G, float64


def covered_rows(shape: tuple[int, int], start: int, numel: int) -> tuple[int, int]:
    """``[r0, r1)``: the rows of ``G`` that flat elements ``[start, start + numel)`` touch."""
    inner = shape[1]
    r0 = start // inner
    return r0, max(r0, -(-(start + numel) // inner))


def slice_rows(values: torch.Tensor, shape: tuple[int, int], start: int) -> RowBlocks:
    """:data:`RowBlocks` of a slice held in memory: flat elements ``[start, start + n)``."""
    inner, n = shape[1], values.numel()

    def rows(a: int, b: int) -> torch.Tensor:
        block = torch.zeros((b - a) * inner, dtype=torch.float64, device=values.device)
        lo, hi = max(a * inner, start), min(b * inner, start + n)
        if hi > lo:
            block[lo - a * inner : hi - a * inner] = values[lo - start : hi - start]
        return block.view(b - a, inner)

    return rows


def _orth(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``Q`` of the columns of ``y`` (tall, float64, CPU), by LAPACK's
    Householder QR. A column-major ``y`` is overwritten by ``Q`` (``geqrf`` then ``orgqr`` in
    place, through SciPy: ``torch.linalg.qr`` always allocates a second ``(out, k)`` matrix);
    any other layout is first copied to column-major. Callers must not use ``y`` afterwards."""
    if not y.T.is_contiguous():
        y = y.T.contiguous().T
    q = scipy.linalg.qr(y.numpy(), overwrite_a=True, mode="economic", check_finite=False)[0]
    return torch.from_numpy(q)


def _thin(rows: int, cols: int, device: torch.device | str) -> torch.Tensor:
    """A zeroed ``(rows, cols)`` float64 matrix laid out column-major, so :func:`_orth` can
    overwrite it in place."""
    return torch.zeros(cols, rows, dtype=torch.float64, device=device).T


def sharded_svd(rows: RowBlocks, shape: tuple[int, int], start: int, numel: int, rank: int,
                seed: int, key: int, reduce: Reduce, *, power_iters: int = 1,
                device: torch.device | str = "cpu", u_rows: tuple[int, int] | None = None,
                u_dtype: torch.dtype = torch.float64
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U (out, r), S (r,), V (in, r)``, ``r = min(rank, out, in)``, of the matrix whose flat
    elements ``[start, start + numel)`` this rank holds, given as ``rows`` (blocks on
    ``device``). ``S`` and ``V`` are float64 on the CPU; ``U`` holds only rows ``u_rows`` (all
    by default) in ``u_dtype`` on ``device``, formed from ``Q Ũ`` a row chunk at a time.

    ``Ω`` is ``gaussian(seed, key)`` over ``in·k`` elements. ``reduce(t)`` must return the sum of
    ``t`` over the ranks (identity in one process).

    Memory: one thin ``(out, k)`` float64 matrix lives at a time when ``reduce`` works in place
    (one process: ``orth`` overwrites the product, each is freed when used); the float64
    ``Q Ũ`` is never formed whole, so a caller that keeps ``U`` in 16 bits never holds it in 64.
    """
    out, inner = shape
    k = min(rank + OVERSAMPLE, out, inner)
    r = min(rank, out, inner)
    r0, r1 = covered_rows(shape, start, numel)
    step = max(1, BLOCK // inner)
    blocks = [(a, min(a + step, r1)) for a in range(r0, r1, step)]

    def times(x: torch.Tensor) -> torch.Tensor:  # G x, x (in, k) -> (out, k)
        x = x.to(device)
        y = _thin(out, x.shape[1], device)
        for a, b in blocks:
            y[a:b] = torch.mm(rows(a, b), x)
        return reduce(y).to("cpu", torch.float64)

    def times_t(q: torch.Tensor) -> torch.Tensor:  # Gᵀ q, q (out, k) -> (in, k)
        q = q.to(device)
        acc = torch.zeros(inner, q.shape[1], dtype=torch.float64, device=device)
        for a, b in blocks:
            acc.addmm_(rows(a, b).T, q[a:b])
        return reduce(acc).to("cpu", torch.float64)

    omega = gaussian(seed, key, 0, inner * k).view(inner, k).double()
    y = times(omega)
    del omega
    for _ in range(power_iters):  # y <- G orth(Gᵀ orth(y)), each thin matrix freed when used
        q = _orth(y)
        del y
        w = _orth(times_t(q))
        del q
        y = times(w)
        del w
    q = _orth(y)
    del y
    b = times_t(q).T  # Qᵀ G, (k, in)
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    ub = ub[:, :r].contiguous()
    lo, hi = u_rows or (0, out)
    u = torch.empty(hi - lo, r, dtype=u_dtype, device=device)
    chunk = max(1, BLOCK // k)
    for a in range(lo, hi, chunk):  # U = Q Ũ, rows [lo, hi), a chunk at a time
        end = min(a + chunk, hi)
        u[a - lo : end - lo] = (q[a:end] @ ub).to(device, u_dtype)
    return u, s[:r].clone(), vh[:r].T.contiguous()
