"""Tokenizing examples and collating them into left-padded batches.

Left padding puts every prompt's last token (or every candidate's last token) at the final
position, so the model computes logits for only the last few positions (``logits_to_keep``)
instead of the whole sequence; explicit ``position_ids`` keep padded rows numerically the same
as unpadded ones.

Two batch kinds:

- :class:`ChoiceBatch` when every candidate of the task is one token: one forward on the prompts;
  the candidates' logits at the last position give both the training loss (cross-entropy over the
  candidates, MeZO's classification mode) and the prediction.
- :class:`SequenceBatch` otherwise: rows are prompt + candidate; the loss is the mean negative
  log-likelihood of the correct candidate's tokens (teacher forcing) and the score of a
  candidate its average per-token log-likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from pipeline.data.tasks import Example


@dataclass(frozen=True)
class Encoded:
    prompt: tuple[int, ...]
    candidates: tuple[tuple[int, ...], ...]
    label: int


def encode(tokenizer, examples: list[Example], max_length: int) -> list[Encoded]:
    """Token ids of prompts (cut from the left to ``max_length``) and candidates."""
    cache: dict[str, tuple[int, ...]] = {}

    def cand_ids(text: str) -> tuple[int, ...]:
        if text not in cache:
            ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
            if not ids:
                raise ValueError(f"candidate {text!r} tokenizes to nothing")
            cache[text] = ids
        return cache[text]

    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
    return [
        Encoded(tuple(p[-max_length:]), tuple(cand_ids(c) for c in e.candidates), e.label)
        for p, e in zip(prompts, examples)
    ]


def single_token(encoded: list[Encoded]) -> bool:
    """Whether every candidate is one token (classification mode)."""
    return all(len(c) == 1 for e in encoded for c in e.candidates)


class _Movable:
    def parts(self, n: int) -> list:
        """The batch cut into at most ``n`` batches of consecutive examples (an example's rows
        stay together), each keeping the whole batch's padded width, so every row is computed
        as in the whole batch. Fewer examples than ``n`` give one part per example."""
        count = self.labels.shape[0]
        n = min(n, count)
        if n <= 1:
            return [self]
        bounds = [round(i * count / n) for i in range(n + 1)]
        return [self._examples(a, b) for a, b in zip(bounds, bounds[1:])]

    def to(self, device: torch.device | str):
        return type(self)(
            **{
                f.name: getattr(self, f.name).to(device)
                if isinstance(getattr(self, f.name), torch.Tensor)
                else getattr(self, f.name)
                for f in fields(self)
            }
        )


@dataclass
class ChoiceBatch(_Movable):
    input_ids: torch.Tensor  # (B, T) left-padded prompts
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    candidate_ids: torch.Tensor  # (B, C) the candidates' token ids
    labels: torch.Tensor  # (B,)

    def _examples(self, a: int, b: int) -> ChoiceBatch:
        return ChoiceBatch(self.input_ids[a:b], self.attention_mask[a:b],
                           self.position_ids[a:b], self.candidate_ids[a:b], self.labels[a:b])


@dataclass
class SequenceBatch(_Movable):
    input_ids: torch.Tensor  # (R, T) left-padded prompt + candidate rows
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    target_ids: torch.Tensor  # (R, K) candidate tokens, right-aligned
    target_mask: torch.Tensor  # (R, K)
    example: torch.Tensor  # (R,) row -> example index in the batch
    candidate: torch.Tensor  # (R,) row -> candidate index
    labels: torch.Tensor  # (B,)
    num_candidates: int

    def _examples(self, a: int, b: int) -> SequenceBatch:
        r0, r1 = torch.searchsorted(self.example, torch.tensor([a, b])).tolist()
        rows = slice(r0, r1)
        return SequenceBatch(
            self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows],
            self.target_ids[rows], self.target_mask[rows], self.example[rows] - a,
            self.candidate[rows], self.labels[a:b], self.num_candidates)


def _left_pad(rows: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, ...]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, positions


def choice_batch(items: list[Encoded], pad_id: int) -> ChoiceBatch:
    ids, mask, pos = _left_pad([e.prompt for e in items], pad_id)
    cands = torch.tensor([[c[0] for c in e.candidates] for e in items], dtype=torch.long)
    labels = torch.tensor([e.label for e in items], dtype=torch.long)
    return ChoiceBatch(ids, mask, pos, cands, labels)


def sequence_batch(items: list[Encoded], pad_id: int, *, all_candidates: bool) -> SequenceBatch:
    """Rows for every candidate (scoring) or only the correct one (teacher-forced training)."""
    rows, targets, example, candidate = [], [], [], []
    for i, e in enumerate(items):
        chosen = range(len(e.candidates)) if all_candidates else [e.label]
        for c in chosen:
            rows.append(e.prompt + e.candidates[c])
            targets.append(e.candidates[c])
            example.append(i)
            candidate.append(c)
    ids, mask, pos = _left_pad(rows, pad_id)
    k = max(len(t) for t in targets)
    target_ids = torch.full((len(rows), k), pad_id, dtype=torch.long)
    target_mask = torch.zeros((len(rows), k), dtype=torch.float32)
    for r, t in enumerate(targets):
        target_ids[r, k - len(t) :] = torch.tensor(t, dtype=torch.long)
        target_mask[r, k - len(t) :] = 1.0
    return SequenceBatch(
        ids,
        mask,
        pos,
        target_ids,
        target_mask,
        torch.tensor(example),
        torch.tensor(candidate),
        torch.tensor([e.label for e in items], dtype=torch.long),
        max(len(e.candidates) for e in items),
    )
