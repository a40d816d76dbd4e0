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

    def train_batch(self, step: int, batch_size: int, seed: int):
        """The training batch of ``step``: a pure function of (seed, step)."""
        train = self.splits["train"]
        items = [train[i] for i in batch_indices(len(train), batch_size, seed, step)]
        if self.choice:
            return choice_batch(items, self.pad_id)
        return sequence_batch(items, self.pad_id, all_candidates=False)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[object, int]]:
        """``(batch, n_examples)`` over a split, for candidate scoring.

        Examples go by prompt length so that batches carry little padding; accuracy does not
        depend on the order.
        """
        items = sorted(self.splits[split], key=lambda e: len(e.prompt))
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            if self.choice:
                yield choice_batch(chunk, self.pad_id), len(chunk)
            else:
                yield sequence_batch(chunk, self.pad_id, all_candidates=True), len(chunk)


def prepare(data_cfg, tokenizer) -> TaskData:
    examples = load_examples(data_cfg)
    splits = {k: encode(tokenizer, v, data_cfg.max_length) for k, v in examples.items()}
    choice = all(single_token(s) for s in splits.values())
    return TaskData(splits, tokenizer.pad_token_id, choice)
