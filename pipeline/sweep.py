"""Sweeps: a sweep file's override sets, and the MLflow parent run that groups their runs.

A sweep runs as a SLURM job array (``slurm/sweep.sbatch``), one task per override set, each in
``<sweep dir>/task-<i>``. The batch script exports ``ZOPIPE_SWEEP_DIR``; the first task whose
tracker starts creates one parent run for the array and records its id in
``<sweep dir>/mlflow_parent_run_id`` (claimed with an exclusive file create, so concurrent tasks
agree on one parent); every task's run is a child of it (tag ``mlflow.parentRunId``), which is how
MLflow nests runs. The parent is a grouping record: it is created FINISHED, with the array job id
and the number of tasks as tags.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import yaml

SWEEP_DIR_ENV = "ZOPIPE_SWEEP_DIR"
PARENT_FILE = "mlflow_parent_run_id"
PARENT_WAIT_S = 120.0


class SweepError(ValueError):
    """A sweep file that cannot be expanded; the message shows the expected form."""


def expand_sweep(path: str | Path) -> list[list[str]]:
    """Override sets of a sweep file: every combination of ``grid``, then each of ``runs``.

    ::

        grid:                       # 2 x 2 = 4 tasks
          method.lr: [1.0e-6, 1.0e-5]
          method.eps: [1.0e-3, 1.0e-2]
        runs:                       # and one task per entry
          - {method.lr: 1.0e-7, train.steps: 4000}
    """
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SweepError(f"cannot read the sweep file {path}: {exc}") from exc
    unknown = set(raw) - {"grid", "runs"} if isinstance(raw, dict) else {"(not a mapping)"}
    grid, runs = (raw.get("grid") or {}, raw.get("runs") or []) if not unknown else ({}, [])
    if unknown or not isinstance(grid, dict) or not isinstance(runs, list) or not all(
            isinstance(r, dict) for r in runs) or not all(
            isinstance(v, list) and v for v in grid.values()):
        raise SweepError(f"sweep file {path}: expected `grid: {{key: [values]}}` and/or "
                         "`runs: [{key: value, ...}]`, e.g. grid: {method.lr: [1e-6, 1e-5]}")
    sets: list[list[str]] = [[]] if grid else []
    for key, values in grid.items():
        sets = [s + [_override(key, v)] for s in sets for v in values]
    sets += [[_override(k, v) for k, v in run.items()] for run in runs]
    if not sets:
        raise SweepError(f"sweep file {path} defines no runs")
    return sets


def _override(key: str, value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def _sweep_dir() -> Path | None:
    value = os.environ.get(SWEEP_DIR_ENV)
    return Path(value) if value else None


def claim_parent() -> bool | None:
    """Call before opening the tracking store. None outside a sweep; True for the one task that
    creates the parent run; False for the others, after the parent exists (so one task at a time
    initialises a fresh store: concurrent first opens of one SQLite file fail)."""
    sweep_dir = _sweep_dir()
    if sweep_dir is None:
        return None
    id_file, claim = sweep_dir / PARENT_FILE, sweep_dir / f"{PARENT_FILE}.claim"
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        pass
    deadline = time.monotonic() + PARENT_WAIT_S
    while not id_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no parent run id in {id_file} after {PARENT_WAIT_S:.0f} s; "
                               f"remove {claim} if the task that claimed it died")
        time.sleep(0.2)
    return False


def parent_run_id(client, experiment_id: Callable[[], str], first: bool | None) -> str | None:
    """The sweep's parent run id (``first``: create it now); None outside a sweep."""
    sweep_dir = _sweep_dir()
    if first is None or sweep_dir is None:
        return None
    id_file = sweep_dir / PARENT_FILE
    if not first:
        return id_file.read_text().strip()
    tags = {"zo.sweep": "parent", "run_dir": str(sweep_dir.resolve())}
    for tag, env in (("slurm.array_job_id", "SLURM_ARRAY_JOB_ID"),
                     ("zo.sweep.tasks", "SLURM_ARRAY_TASK_COUNT")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    run = client.create_run(experiment_id(), tags=tags, run_name=sweep_dir.name)
    client.set_terminated(run.info.run_id, status="FINISHED")
    tmp = id_file.with_name(id_file.name + ".tmp")
    tmp.write_text(run.info.run_id + "\n")
    os.replace(tmp, id_file)
    return run.info.run_id
