"""Accuracy by candidate scoring: the candidate with the highest mean token log-likelihood wins."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tqdm import tqdm


@dataclass(frozen=True)
class Accuracy:
    split: str
    accuracy: float
    n: int

    @property
    def stderr(self) -> float:
        """Binomial standard error of the accuracy."""
        p = self.accuracy
        return math.sqrt(p * (1 - p) / self.n) if self.n else math.nan

    def as_dict(self) -> dict:
        return {**asdict(self), "stderr": self.stderr}

    def __str__(self) -> str:
        return f"{self.accuracy:.3f} ± {self.stderr:.3f} (n={self.n}, {self.split})"


def evaluate(backend, data, split: str, batch_size: int, *, progress: bool = True) -> Accuracy:
    """Accuracy over a split; under sharding each rank scores its batches and counts are summed."""
    import torch

    correct = total = 0
    batches = data.eval_batches(split, batch_size, backend.rank, backend.world_size)
    n = len(data.splits[split])
    with tqdm(total=n, desc=f"eval {split}", unit="ex", leave=False, disable=not progress) as bar:
        for batch, counted in batches:
            pred = backend.scores(batch).argmax(1)
            correct += int((pred == batch.labels)[:counted].sum())
            total += counted
            bar.update(counted * backend.world_size)
    if backend.world_size > 1:
        mean = backend.all_reduce_mean(torch.tensor([correct, total], dtype=torch.float64))
        correct, total = (round(v * backend.world_size) for v in mean.tolist())
    return Accuracy(split, correct / total, total)
