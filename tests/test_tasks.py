import pytest
import torch

from pipeline.data.encoding import Encoded, choice_batch, sequence_batch
from pipeline.data.sampling import batch_indices
from pipeline.data.tasks import TASKS, get_task


def test_rotten_tomatoes_template():
    ex = get_task("rotten_tomatoes").example({"text": "A delight.", "label": 1})
    assert ex.prompt == "Review: A delight.\nSentiment:"
    assert ex.candidates == (" negative", " positive") and ex.label == 1


def test_mezo_protocol_templates():
    sst2 = TASKS["sst2"].example({"sentence": "a gem ", "label": 0})
    assert (sst2.prompt, sst2.label) == ("a gem It was", 0)
    assert sst2.candidates == (" terrible", " great")
    rte = TASKS["rte"].example({"premise": "P.", "hypothesis": "H.", "label": 1})
    assert rte.prompt == 'P.\nDoes this mean that "H." is true? Yes or No?\n'
    assert rte.candidates[rte.label] == "No"
    boolq = TASKS["boolq"].example({"passage": "P.", "question": "is it", "label": 1})
    assert boolq.prompt == "P. is it?\n" and boolq.candidates[boolq.label] == "Yes"
    cb = TASKS["cb"].example({"premise": "P.", "hypothesis": "H.", "label": 2})
    assert cb.candidates[cb.label] == "Maybe"
    copa = TASKS["copa"].example(
        {"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He ran.",
         "question": "cause", "label": 0}
    )
    assert copa.prompt == "The man fell because "
    assert copa.candidates == ("he slipped.", "he ran.")
    wsc = TASKS["wsc"].example({"text": "T", "span1_text": "Bob", "span2_text": "he", "label": 1})
    assert wsc.prompt.endswith('does the pronoun "he" refer to Bob? Yes or No?\n')


def test_unknown_task_names_the_choices():
    with pytest.raises(KeyError, match="rotten_tomatoes"):
        get_task("nope")


def test_batch_order_is_a_pure_function_covering_each_epoch_once():
    n, bs = 10, 4
    stream = [i for step in range(5) for i in batch_indices(n, bs, 3, step)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert batch_indices(n, bs, 3, 2) == stream[8:12]
    assert batch_indices(n, bs, 4, 0) != batch_indices(n, bs, 3, 0)


def test_left_padding_and_candidate_alignment():
    items = [Encoded((1, 2, 3), ((7,), (8,)), 1), Encoded((4,), ((7,), (8,)), 0)]
    b = choice_batch(items, pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert b.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert b.candidate_ids.tolist() == [[7, 8], [7, 8]] and b.labels.tolist() == [1, 0]
    seq = sequence_batch(
        [Encoded((1, 2), ((5, 6), (7,)), 0)], pad_id=0, all_candidates=True
    )
    assert seq.input_ids.tolist() == [[1, 2, 5, 6], [0, 1, 2, 7]]
    assert seq.target_ids.tolist() == [[5, 6], [0, 7]]
    assert torch.equal(seq.target_mask, torch.tensor([[1.0, 1.0], [0.0, 1.0]]))


def test_padded_batches_score_like_single_examples(tiny_model, tiny_batch):
    from pipeline.models.objective import candidate_scores

    with torch.no_grad():
        together = candidate_scores(tiny_model, tiny_batch)
        for i in range(tiny_batch.labels.shape[0]):
            keep = tiny_batch.attention_mask[i].bool()
            ids = tiny_batch.input_ids[i, keep].unsqueeze(0)
            out = tiny_model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
            torch.testing.assert_close(together[i], out[tiny_batch.candidate_ids[i]],
                                       rtol=1e-4, atol=1e-5)


def _scoring_batch(n: int = 5):
    gen = torch.Generator().manual_seed(3)
    items = [Encoded(tuple(torch.randint(2, 64, (2 + i % 4,), generator=gen).tolist()),
                     ((5, 6), (9,), (11, 12, 13)), i % 3) for i in range(n)]
    return sequence_batch(items, 0, all_candidates=True)


@pytest.mark.parametrize("kind", ["choice", "sequence"])
def test_batch_parts_keep_examples_whole_and_score_as_the_whole_batch(kind, tiny_model,
                                                                         tiny_batch):
    """Parts of consecutive examples (an example's candidate rows together, its indices
    renumbered), padded as the whole batch: their scores, stacked, are the whole batch's, and
    the row-weighted mean of their losses is its loss."""
    from pipeline.models.objective import batch_loss, candidate_scores

    batch = tiny_batch if kind == "choice" else _scoring_batch()
    n = batch.labels.shape[0]
    parts = batch.parts(3)
    assert [p.labels.shape[0] for p in parts] == [round((i + 1) * n / 3) - round(i * n / 3)
                                                 for i in range(3)]
    assert torch.equal(torch.cat([p.labels for p in parts]), batch.labels)
    assert torch.equal(torch.cat([p.input_ids for p in parts]), batch.input_ids)
    assert all(p.input_ids.shape[1] == batch.input_ids.shape[1] for p in parts)
    if kind == "sequence":
        assert [p.input_ids.shape[0] for p in parts] == [3 * p.labels.shape[0] for p in parts]
        assert all(p.example.tolist() == sorted(p.example.tolist()) and p.example[0] == 0
                   for p in parts)
    with torch.no_grad():
        whole = candidate_scores(tiny_model, batch)
        torch.testing.assert_close(torch.cat([candidate_scores(tiny_model, p) for p in parts]),
                                   whole, rtol=1e-5, atol=1e-6)
        mean = sum(batch_loss(tiny_model, p) * p.input_ids.shape[0] for p in parts)
        torch.testing.assert_close(mean / batch.input_ids.shape[0], batch_loss(tiny_model, batch))
    assert batch.parts(1) == [batch]
    assert len(batch.parts(2 * n)) == n  # at most one part per example


def test_foobar_and_itwas_tasks_relabel_the_same_rotten_tomatoes_reviews():
    from pipeline.config import DataConfig
    from pipeline.data.loading import load_examples

    sizes = dict(n_train=20, n_val=10, n_test=10)
    plain = load_examples(DataConfig(task="rotten_tomatoes", **sizes))
    foobar = load_examples(DataConfig(task="rotten_tomatoes_foobar", **sizes))
    itwas = load_examples(DataConfig(task="rotten_tomatoes_itwas", **sizes))
    for split in ("train", "validation", "test"):
        a, b, c = plain[split], foobar[split], itwas[split]
        assert [e.label for e in a] == [e.label for e in b] == [e.label for e in c]
        texts = [e.prompt.removeprefix("Review: ").removesuffix("\nSentiment:") for e in a]
        assert [e.prompt.removeprefix("Review: ").removesuffix("\nLabel:") for e in b] == texts
        assert [e.prompt.removesuffix(" It was") for e in c] == [t.strip() for t in texts]
        assert all(e.candidates == (" foo", " bar") for e in b)
        assert all(e.candidates == (" terrible", " great") for e in c)
    assert {e.label for e in foobar["train"]} == {0, 1}
