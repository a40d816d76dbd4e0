"""BIG-bench JSON tasks as splits: deduplicated, conflicting inputs dropped, seeded and disjoint."""

import json

import pytest

from pipeline.data.bigbench import load_bigbench
from pipeline.data.tasks import get_task

ANSWERS = ("negative", "positive", "neutral", "ambivalent")


def _task_json(path, examples):
    path.write_text(json.dumps({"examples": [
        {"input": text, "target_scores": {a: int(a == answer) for a in ANSWERS}}
        for text, answer in examples]}))
    return path


def test_splits_are_disjoint_deduplicated_and_seeded(tmp_path):
    rows = [(f"sentence {i}.", ANSWERS[i % 4]) for i in range(40)]
    rows += [("sentence 3.", "neutral"), (" sentence 5. ", "positive")]  # a conflict, a repeat
    path = _task_json(tmp_path / "task.json", rows)
    dd = load_bigbench(path, ANSWERS, n_train=20, n_val=10, n_test=9, seed=0)
    texts = {name: list(split["text"]) for name, split in dd.items()}
    every = sum(texts.values(), [])
    assert len(every) == len(set(every)) == 39 and "sentence 3." not in every
    labels = dict(zip(every, sum((list(s["label"]) for s in dd.values()), [])))
    assert labels["sentence 6."] == ANSWERS.index("neutral")
    again = load_bigbench(path, ANSWERS, n_train=20, n_val=10, n_test=9, seed=0)
    assert {k: list(v["text"]) for k, v in again.items()} == texts
    other = load_bigbench(path, ANSWERS, n_train=20, n_val=10, n_test=9, seed=1)
    assert list(other["test"]["text"]) != texts["test"]
    with pytest.raises(ValueError, match="39 usable examples, fewer than the 40"):
        load_bigbench(path, ANSWERS, n_train=20, n_val=10, n_test=10)


def test_multiemo_template_and_one_token_verbalizers():
    task = get_task("multiemo")
    ex = task.example({"text": "The room was clean.", "label": 3})
    assert ex.prompt == "Review: The room was clean.\nSentiment:"
    assert ex.candidates[ex.label] == " mixed" and task.bigbench[1][3] == "ambivalent"
