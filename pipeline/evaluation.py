"""Held-out read-outs by candidate scoring: accuracy and the mean per-example training loss.

Each example's candidates are scored by mean per-token log-likelihood; the highest wins
(accuracy). The example's loss is the training objective on it (:func:`example_losses`: the
cross-entropy over the candidates in classification mode, the correct candidate's negative
log-likelihood otherwise), a finer read-out than accuracy: it moves with every example, not only
with those that cross the decision boundary. Per-example values are kept in split order, so two
evaluations of one split can be compared example by example (:mod:`pipeline.paired`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pipeline.models.objective import example_losses
from pipeline.paired import Paired, mean_and_se, paired


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of a split: per-example losses and correctness, in split order."""

    split: str
    losses: tuple[float, ...]
    correct: tuple[bool, ...]

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / self.n if self.n else math.nan

    @property
    def stderr(self) -> float:
        """Binomial standard error of the accuracy, ``sqrt(p (1 - p) / n)``."""
        p = self.accuracy
        return math.sqrt(p * (1 - p) / self.n) if self.n else math.nan

    @property
    def loss(self) -> float:
        """Mean per-example loss."""
        return mean_and_se(self.losses)[0]

    @property
    def loss_stderr(self) -> float:
        """Standard error of the mean loss over examples (unpaired)."""
        return mean_and_se(self.losses)[1]

    def as_dict(self) -> dict:
        """The summary statistics (no per-example values); ``eval_loss``, not ``loss``, which
        names a step's training loss in ``metrics.jsonl``."""
        return {"split": self.split, "accuracy": self.accuracy, "n": self.n,
                "stderr": self.stderr, "eval_loss": self.loss,
                "eval_loss_stderr": self.loss_stderr}

    def examples(self) -> dict:
        """The per-example values, for ``examples.jsonl`` and for pairing later."""
        return {"split": self.split, "loss": list(self.losses), "correct": list(self.correct)}

    @classmethod
    def from_examples(cls, record: dict) -> Evaluation:
        return cls(record["split"], tuple(map(float, record["loss"])),
                   tuple(map(bool, record["correct"])))

    def against(self, before: Evaluation) -> Paired:
        """This evaluation minus ``before``, example by example (same split, same examples)."""
        if before.split != self.split or before.n != self.n:
            raise ValueError(f"cannot pair {self.split} (n={self.n}) with {before.split} "
                             f"(n={before.n}): not the same examples")
        return paired(before.losses, self.losses, before.correct, self.correct)

    def __str__(self) -> str:
        return (f"accuracy {self.accuracy:.3f} ± {self.stderr:.3f}, loss {self.loss:.4f} ± "
                f"{self.loss_stderr:.4f} (n={self.n}, {self.split})")


def evaluate(backend, data, split: str, batch_size: int, *, progress: bool = True) -> Evaluation:
    """Per-example loss and correctness over a split.

    Under sharding each rank scores its batches and writes its values at their split positions
    of zero vectors; one all-reduce sums them (each position has exactly one nonzero writer), so
    every rank ends with every example's values in split order.
    """
    n = len(data.splits[split])
    losses = torch.zeros(n, dtype=torch.float64)
    correct = torch.zeros(n, dtype=torch.float64)
    batches = data.eval_batches(split, batch_size, backend.rank, backend.world_size)
    with tqdm(total=n, desc=f"eval {split}", unit="ex", leave=False, disable=not progress) as bar:
        for batch, indices in batches:
            scores = backend.scores(batch)
            if not indices:
                continue
            k = len(indices)
            at = torch.tensor(indices)
            losses[at] = example_losses(scores, batch.labels, data.choice)[:k].double()
            correct[at] = (scores.argmax(1) == batch.labels)[:k].double()
            bar.update(k * backend.world_size)
    if backend.world_size > 1:
        both = backend.all_reduce_mean(torch.cat([losses, correct])) * backend.world_size
        losses, correct = both[:n], both[n:]
    return Evaluation(split, tuple(losses.float().tolist()),
                      tuple(bool(round(c)) for c in correct.tolist()))
