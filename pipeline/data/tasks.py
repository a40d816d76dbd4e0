"""Task registry: MeZO-protocol prompt templates and verbalizers.

A task turns a dataset row into an :class:`Example`: the prompt, the candidate continuations and
the index of the correct one. Classification tasks whose candidates are single tokens train with
the cross-entropy over the candidates' logits (MeZO's classification mode); the others train by
teacher forcing on the correct candidate. Evaluation picks the candidate with the highest average
per-token log-likelihood.

Templates follow the MeZO-protocol table in ``shared/papers/METHODS.md``. ``rotten_tomatoes``
(and ``rotten_tomatoes_foobar``, the same reviews labelled `` foo``/`` bar``: label words with no
prior, so zero-shot is near chance; ``rotten_tomatoes_itwas``, the same reviews in MeZO's SST-2
prompt ``<review> It was`` -> `` terrible``/`` great``, on which a small model starts badly
calibrated) and ``multiemo`` (four-way sentiment of review sentences,
from BIG-bench) are the offline tasks built from packaged data; the others load from the
Hugging Face hub (where a user has access) or from local files (``data.data_dir``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]


@dataclass(frozen=True)
class Example:
    prompt: str
    candidates: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class Task:
    name: str
    prompt: Callable[[Row], str]
    candidates: Callable[[Row], tuple[str, ...]]
    label: Callable[[Row], int]
    hub: tuple[str, str | None] | None = None  # (path, config) for datasets.load_dataset
    # (packaged BIG-bench task, its answers in label order), see pipeline.data.bigbench
    bigbench: tuple[str, tuple[str, ...]] | None = None
    rotten_tomatoes: bool = False  # rows from the packaged Rotten Tomatoes corpus

    def example(self, row: Row) -> Example:
        return Example(self.prompt(row), self.candidates(row), self.label(row))


def _fixed(*cands: str) -> Callable[[Row], tuple[str, ...]]:
    return lambda row: cands


def _label(row: Row) -> int:
    return int(row["label"])


def _copa_prompt(row: Row) -> str:
    joiner = " so " if row["question"] == "effect" else " because "
    return row["premise"].rstrip().rstrip(".") + joiner


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "rotten_tomatoes",
            lambda r: f"Review: {r['text']}\nSentiment:",
            _fixed(" negative", " positive"),
            _label,
            rotten_tomatoes=True,
        ),
        Task(
            # the same reviews with label words that carry no sentiment: what the model knows
            # about reviews is there, the mapping to the words must be learned
            "rotten_tomatoes_foobar",
            lambda r: f"Review: {r['text']}\nLabel:",
            _fixed(" foo", " bar"),
            _label,
            rotten_tomatoes=True,
        ),
        Task(
            # the same reviews in MeZO's SST-2 prompt (the sst2 task below): the words carry the
            # sentiment, but a small model's zero-shot answers lean hard towards one of them
            "rotten_tomatoes_itwas",
            lambda r: f"{r['text'].strip()} It was",
            _fixed(" terrible", " great"),
            _label,
            rotten_tomatoes=True,
        ),
        Task(
            # BIG-bench multiemo/all_sentence_en; "ambivalent" is two tokens, "mixed" one
            "multiemo",
            lambda r: f"Review: {r['text']}\nSentiment:",
            _fixed(" negative", " positive", " neutral", " mixed"),
            _label,
            bigbench=("multiemo_all_sentence_en",
                      ("negative", "positive", "neutral", "ambivalent")),
        ),
        Task(
            "sst2",
            lambda r: f"{r['sentence'].strip()} It was",
            _fixed(" terrible", " great"),
            _label,
            hub=("stanfordnlp/sst2", None),
        ),
        Task(
            "rte",
            lambda r: f'{r["premise"]}\nDoes this mean that "{r["hypothesis"]}" is true? '
            "Yes or No?\n",
            _fixed("Yes", "No"),  # label 0 = entailment
            _label,
            hub=("aps/super_glue", "rte"),
        ),
        Task(
            "cb",
            lambda r: f'Suppose {r["premise"]} Can we infer that "{r["hypothesis"]}"? '
            "Yes, No, or Maybe?\n",
            _fixed("Yes", "No", "Maybe"),  # entailment, contradiction, neutral
            _label,
            hub=("aps/super_glue", "cb"),
        ),
        Task(
            "boolq",
            lambda r: f"{r['passage']} {r['question']}?\n",
            _fixed("Yes", "No"),
            lambda r: 1 - int(r["label"]),  # label 1 = true -> "Yes" (index 0)
            hub=("aps/super_glue", "boolq"),
        ),
        Task(
            "wsc",
            lambda r: f'{r["text"]}\nIn the previous sentence, does the pronoun '
            f'"{r["span2_text"]}" refer to {r["span1_text"]}? Yes or No?\n',
            _fixed("No", "Yes"),
            _label,
            hub=("aps/super_glue", "wsc.fixed"),
        ),
        Task(
            "wic",
            lambda r: f'Does the word "{r["word"]}" have the same meaning in these two '
            f"sentences? Yes, No?\n{r['sentence1']}\n{r['sentence2']}\n",
            _fixed("No", "Yes"),
            _label,
            hub=("aps/super_glue", "wic"),
        ),
        Task(
            "multirc",
            lambda r: f'{r["paragraph"]}\nQuestion: {r["question"]}\nI found this answer '
            f'"{r["answer"]}". Is that correct? Yes or No?\n',
            _fixed("No", "Yes"),
            _label,
            hub=("aps/super_glue", "multirc"),
        ),
        Task(
            "copa",
            _copa_prompt,
            lambda r: (_lower_first(r["choice1"]), _lower_first(r["choice2"])),
            _label,
            hub=("aps/super_glue", "copa"),
        ),
    ]
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; tasks are {', '.join(sorted(TASKS))}")
    return TASKS[name]
