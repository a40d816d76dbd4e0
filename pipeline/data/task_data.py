"""A task's splits, tokenized once, and the batches a run asks for."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.data.encoding import Encoded, choice_batch, encode, sequence_batch, single_token
from pipeline.data.loading import load_examples
from pipeline.data.sampling import batch_indices


@dataclass
class TaskData:
    splits: dict[str, list[Encoded]]
    pad_id: int
    choice: bool  # every candidate is one token: classification mode

    def _batch(self, items: list[Encoded], *, scoring: bool):
        if self.choice:
            return choice_batch(items, self.pad_id)
        return sequence_batch(items, self.pad_id, all_candidates=scoring)

    def train_batch(self, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        """This rank's part of the global batch of ``step``: a pure function of (seed, step).

        The global batch is cut into ``world`` equal consecutive parts, so the mean of the ranks'
        losses is the loss of the same global batch at any world size.
        """
        if batch_size % world:
            raise ValueError(f"train.batch_size={batch_size} must be a multiple of the world "
                             f"size {world}")
        train = self.splits["train"]
        part = batch_size // world
        indices = batch_indices(len(train), batch_size, seed, step)[rank * part:(rank + 1) * part]
        return self._batch([train[i] for i in indices], scoring=False)

    def eval_batches(self, split: str, batch_size: int, rank: int = 0,
                     world: int = 1) -> Iterator[tuple[object, list[int]]]:
        """``(batch, indices)`` of this rank over a split, for candidate scoring.

        ``indices`` are the positions in the split of the batch's examples, so per-example
        results can be put back in split order (and paired across evaluations). Examples go by
        prompt length so that batches carry little padding. Batches are dealt round-robin to the
        ranks; every rank runs the same number of forwards (sharded forwards are collectives), a
        rank with nothing left scoring a repeat with no indices.
        """
        items = self.splits[split]
        order = sorted(range(len(items)), key=lambda i: len(items[i].prompt))
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        rounds = -(-len(chunks) // world)
        for r in range(rounds):
            index = r * world + rank
            chunk = chunks[index] if index < len(chunks) else []
            rows = chunk or chunks[0]
            yield self._batch([items[i] for i in rows], scoring=True), chunk


def prepare(data_cfg, tokenizer) -> TaskData:
    examples = load_examples(data_cfg)
    splits = {k: encode(tokenizer, v, data_cfg.max_length) for k, v in examples.items()}
    choice = all(single_token(s) for s in splits.values())
    return TaskData(splits, tokenizer.pad_token_id, choice)
