"""Paired statistics of two evaluations of the same examples (before/after, or method A/B).

Two evaluations of one held-out set share its examples, so their difference is measured per
example: ``d_i = after_i - before_i``. The mean of ``d`` has the standard error
``sd(d) / sqrt(n)`` (sample standard deviation, ``n - 1`` in the denominator), which removes the
example-to-example spread that dominates the unpaired standard errors of the two means. For
accuracy the per-example difference is ``correct_after - correct_before`` in {-1, 0, 1}; only the
discordant examples carry information, and McNemar's exact test asks whether ``b`` (wrong ->
right) and ``c`` (right -> wrong) differ more than a fair coin over ``b + c`` flips would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

# The fields of a paired change that evaluation records (metrics.jsonl, MLflow) carry.
RECORD_KEYS = ("delta_loss", "delta_loss_se", "delta_accuracy", "delta_accuracy_se", "mcnemar_p")


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error ``sd / sqrt(n)`` (NaN standard error for fewer than 2)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: ``min(1, 2 P[X <= min(b, c)])``, ``X ~ Bin(b + c, 1/2)``."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclass(frozen=True)
class Paired:
    """``after - before`` over the same ``n`` examples: loss and accuracy, each with its paired
    standard error; ``b``/``c`` count the examples that became right/wrong."""

    n: int
    before_loss: float
    after_loss: float
    delta_loss: float
    delta_loss_se: float
    before_accuracy: float
    after_accuracy: float
    delta_accuracy: float
    delta_accuracy_se: float
    b: int
    c: int
    mcnemar_p: float

    @property
    def loss_z(self) -> float:
        """``delta_loss`` in paired standard errors."""
        return self.delta_loss / self.delta_loss_se if self.delta_loss_se > 0 else math.nan

    def as_dict(self) -> dict:
        return {**asdict(self), "loss_z": self.loss_z}


def paired(before_loss: Sequence[float], after_loss: Sequence[float],
           before_correct: Sequence[bool], after_correct: Sequence[bool]) -> Paired:
    """Paired differences ``after - before`` of per-example losses and correctness."""
    n = len(before_loss)
    if not n == len(after_loss) == len(before_correct) == len(after_correct):
        raise ValueError("paired evaluations need the same examples: lengths "
                         f"{len(before_loss)}, {len(after_loss)}, {len(before_correct)}, "
                         f"{len(after_correct)}")
    dl, dl_se = mean_and_se([a - b for a, b in zip(after_loss, before_loss)])
    da, da_se = mean_and_se([int(a) - int(b) for a, b in zip(after_correct, before_correct)])
    b = sum(1 for x, y in zip(before_correct, after_correct) if not x and y)
    c = sum(1 for x, y in zip(before_correct, after_correct) if x and not y)
    return Paired(n, math.fsum(before_loss) / n, math.fsum(after_loss) / n, dl, dl_se,
                  sum(map(bool, before_correct)) / n, sum(map(bool, after_correct)) / n, da,
                  da_se, b, c, mcnemar_exact(b, c))


def describe(p: Paired, what: str = "held-out") -> list[str]:
    """Two lines: the paired loss change and the paired accuracy change."""
    z = f", {p.loss_z:+.1f} SE" if math.isfinite(p.loss_z) else ""
    return [
        f"{what} loss {p.before_loss:.4f} -> {p.after_loss:.4f}, "
        f"Δ {p.delta_loss:+.4f} ± {p.delta_loss_se:.4f} (paired, n={p.n}{z})",
        f"{what} accuracy {p.before_accuracy:.3f} -> {p.after_accuracy:.3f}, "
        f"Δ {p.delta_accuracy:+.3f} ± {p.delta_accuracy_se:.3f} (paired; {p.b} became right, "
        f"{p.c} wrong, McNemar p = {p.mcnemar_p:.2g})",
    ]
