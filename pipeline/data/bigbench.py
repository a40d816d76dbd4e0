"""BIG-bench multiple-choice JSON tasks (from the packaged ``bigbench`` sdist) as splits.

A BIG-bench JSON task lists ``examples``, each an ``input`` text and ``target_scores`` (answer ->
1 for the correct one, 0 otherwise). Tasks with a fixed answer set become rows ``text`` and
``label`` (the index of the correct answer in ``answers``). BIG-bench has no splits: the
examples are deduplicated by input (an input given two different answers is dropped), sorted, and
shuffled with a seeded permutation into disjoint train/validation/test parts, so the splits are a
pure function of (file, seed).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np

FEATURES = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})


def load_bigbench(json_path: str | Path, answers: tuple[str, ...], *, n_train: int, n_val: int,
                  n_test: int, seed: int = 0) -> datasets.DatasetDict:
    """Disjoint train/validation/test splits of a fixed-answer BIG-bench task."""
    examples = json.loads(Path(json_path).read_text())["examples"]
    labels: dict[str, set[int]] = {}
    for ex in examples:
        best = [a for a, score in ex["target_scores"].items() if score == 1]
        if len(best) != 1 or best[0] not in answers:
            raise ValueError(f"{json_path}: an example's answers {ex['target_scores']} do not "
                             f"name exactly one of {answers}")
        labels.setdefault(ex["input"].strip(), set()).add(answers.index(best[0]))
    rows = sorted((text, next(iter(lab))) for text, lab in labels.items() if len(lab) == 1)
    sizes = {"train": n_train, "validation": n_val, "test": n_test}
    if len(rows) < sum(sizes.values()):
        raise ValueError(f"{json_path} has {len(rows)} usable examples, fewer than the "
                         f"{sum(sizes.values())} requested ({sizes})")
    order = np.random.default_rng(seed).permutation(len(rows))
    splits, start = {}, 0
    for name, n in sizes.items():
        part = [rows[i] for i in order[start:start + n]]
        splits[name] = datasets.Dataset.from_dict(
            {"text": [t for t, _ in part], "label": [lab for _, lab in part]}, features=FEATURES)
        start += n
    return datasets.DatasetDict(splits)
