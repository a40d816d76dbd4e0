"""The training loss and the candidate scores, both in fp32 whatever the weights' dtype.

Plain functions of (model, batch): backends call them under ``torch.no_grad()``; tests call them
with autograd on to get the true gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.encoding import ChoiceBatch, SequenceBatch


def _logits(model, batch, keep: int, copies: int = 1) -> torch.Tensor:
    """fp32 logits of the last ``keep`` positions; of the batch's rows repeated ``copies``
    times along dim 0 when asked (one forward for several evaluations of the same batch)."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        return t if copies == 1 else t.repeat(copies, *([1] * (t.dim() - 1)))

    out = model(
        input_ids=rows(batch.input_ids),
        attention_mask=rows(batch.attention_mask),
        position_ids=rows(batch.position_ids),
        logits_to_keep=keep,
        use_cache=False,
    )
    return out.logits.float()


def _keep(batch: ChoiceBatch | SequenceBatch) -> int:
    return 1 if isinstance(batch, ChoiceBatch) else batch.target_ids.shape[1] + 1


def _candidate_logprobs(batch: SequenceBatch, logits: torch.Tensor) -> torch.Tensor:
    """(R,) average log-likelihood per candidate token of each row."""
    logp = F.log_softmax(logits[:, :-1], dim=-1)
    tok = logp.gather(-1, batch.target_ids.unsqueeze(-1)).squeeze(-1)
    return (tok * batch.target_mask).sum(1) / batch.target_mask.sum(1)


def _loss(batch: ChoiceBatch | SequenceBatch, logits: torch.Tensor) -> torch.Tensor:
    if isinstance(batch, ChoiceBatch):
        last = logits[:, -1]
        return F.cross_entropy(last.gather(1, batch.candidate_ids), batch.labels)
    return -_candidate_logprobs(batch, logits).mean()


def batch_loss(model, batch: ChoiceBatch | SequenceBatch) -> torch.Tensor:
    """Mean loss of the batch, an fp32 scalar tensor."""
    return _loss(batch, _logits(model, batch, _keep(batch)))


def batch_losses(model, batch: ChoiceBatch | SequenceBatch, copies: int) -> list[torch.Tensor]:
    """:func:`batch_loss` of ``copies`` evaluations of the batch in ONE forward of its rows
    repeated ``copies`` times (the backend shows each copy its own weights); each copy's loss is
    reduced from its own rows' logits exactly as :func:`batch_loss` reduces a batch's."""
    logits = _logits(model, batch, _keep(batch), copies)
    return [_loss(batch, part) for part in logits.chunk(copies)]


def example_losses(scores: torch.Tensor, labels: torch.Tensor, choice: bool) -> torch.Tensor:
    """(B,) each example's training loss, from its :func:`candidate_scores`.

    Classification mode (``choice``): the cross-entropy over the candidates' logits,
    ``-log softmax(scores)[label]`` (log-softmax is shift-invariant, so the full-vocabulary
    normalisation in the scores cancels). Otherwise: the correct candidate's mean per-token
    negative log-likelihood, ``-scores[label]``. The mean over a batch is :func:`batch_loss`.
    """
    picked = F.log_softmax(scores, dim=1) if choice else scores
    return -picked.gather(1, labels.unsqueeze(1)).squeeze(1)


def candidate_scores(model, batch: ChoiceBatch | SequenceBatch) -> torch.Tensor:
    """(B, C) average per-token log-likelihood of every candidate (-inf where none)."""
    logits = _logits(model, batch, _keep(batch))
    if isinstance(batch, ChoiceBatch):
        logp = F.log_softmax(logits[:, -1], dim=-1)
        return logp.gather(1, batch.candidate_ids)
    scores = torch.full(
        (batch.labels.shape[0], batch.num_candidates), float("-inf"), device=batch.labels.device
    )
    scores[batch.example, batch.candidate] = _candidate_logprobs(batch, logits)
    return scores
