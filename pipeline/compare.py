"""Compare tracked runs: a fixed-width table and loss/accuracy curves against forward passes.

The table's paired columns are each run's final held-out change from its zero-shot evaluation
(loss difference ± paired SE, accuracy difference, McNemar's exact p; see :mod:`pipeline.paired`).

Runs are found in MLflow, either from run directories (their ``mlflow_run_id`` file; the tracking
URI defaults to the run directory's parent ``mlflow.db``, as in :mod:`pipeline.tracking`) or by
experiment name. Missing values print as ``-``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.tracking import default_tracking_uri, read_run_id

DEFAULT_RUNS_ROOT = Path("runs")
MISSING = "-"


class CompareError(ValueError):
    """Runs that cannot be compared (no run id, no tracking store, unknown experiment)."""


def _client(uri: str):
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):].split("?", 1)[0]
        if db != ":memory:" and not Path(db).is_file():
            # Opening a missing SQLite store would create an empty one; say what is wrong instead.
            raise CompareError(f"no MLflow store at {uri} (was the run tracked?)")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _row(run, uri: str, metric: str) -> dict[str, Any]:
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    steps = metrics.get("steps_final", _float(params.get("train.steps")))
    forwards = metrics.get("forwards_total_final", metrics.get("forwards_total"))
    batch = _float(params.get("train.batch_size"))
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name or run.info.run_id[:8],
        "status": run.info.status,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": uri,
        "metric": metric,
        "method": tags.get("zo.method") or params.get("method.name"),
        "lr": _float(params.get("method.lr")),
        "eps": _float(params.get("method.eps")),
        "batch_size": int(batch) if batch is not None else None,
        "steps": int(steps) if steps is not None else None,
        "forwards": int(forwards) if forwards is not None else None,
        "zero_shot": metrics.get(f"zero_shot_{metric}"),
        "zero_shot_stderr": metrics.get(f"zero_shot_{metric}_stderr"),
        "final": metrics.get(f"final_{metric}"),
        "final_stderr": metrics.get(f"final_{metric}_stderr"),
        "delta_loss": metrics.get("final_delta_loss"),
        "delta_loss_se": metrics.get("final_delta_loss_se"),
        "delta_accuracy": metrics.get("final_delta_accuracy"),
        "mcnemar_p": metrics.get("final_mcnemar_p"),
        "wall_seconds": metrics.get("wall_seconds"),
        "steps_per_second": metrics.get("steps_per_second_mean"),
        "eval_keys": sorted(
            k for k in metrics
            if k.endswith(f"_{metric}") and not k.startswith(("zero_shot_", "final_"))
        ),
    }


def _runs_from_dirs(run_dirs: Iterable[Path], tracking_uri: str | None, metric: str):
    from mlflow.exceptions import MlflowException

    rows, problems = [], []
    clients: dict[str, Any] = {}
    for run_dir in map(Path, run_dirs):
        run_id = read_run_id(run_dir)
        if run_id is None:
            problems.append(f"{run_dir}: no mlflow_run_id (tracking disabled or never started)")
            continue
        uri = tracking_uri or default_tracking_uri(run_dir)
        try:
            client = clients.get(uri) or clients.setdefault(uri, _client(uri))
            rows.append(_row(client.get_run(run_id), uri, metric))
        except (CompareError, MlflowException) as exc:
            problems.append(f"{run_dir}: run {run_id} not readable from {uri} ({exc})")
    if problems:
        raise CompareError("cannot compare:\n" + "\n".join(f"  - {p}" for p in problems))
    return rows


def _runs_from_experiment(experiment: str, tracking_uri: str | None, metric: str):
    from mlflow.entities import ViewType

    uri = tracking_uri or default_tracking_uri(DEFAULT_RUNS_ROOT / "_")
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise CompareError(f"no experiment {experiment!r} in {uri}")
    runs, token = [], None
    while True:
        page = client.search_runs(
            [exp.experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
            order_by=["attributes.start_time ASC"], page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    rows = [_row(run, uri, metric) for run in runs]
    # Best final score first; runs without one keep their start order at the end.
    rows.sort(key=lambda r: (r["final"] is None, -(r["final"] or 0.0)))
    return rows


def _acc(value: float | None, stderr: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value:.3f} ± {stderr:.3f}" if stderr is not None else f"{value:.3f}"


def _paired(row: dict[str, Any]) -> str:
    """The final held-out loss change from zero-shot, paired over examples, in its SE."""
    d, se = row.get("delta_loss"), row.get("delta_loss_se")
    if d is None or not se:
        return MISSING
    return f"{d:+.4f} ± {se:.4f} ({d / se:+.1f} SE)"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _text(value: Any, fmt: str = "") -> str:
    if value is None:
        return MISSING
    return format(value, fmt)


COLUMNS = (
    # header, row -> text, right-aligned
    ("run", lambda r: r["run_name"], False),
    ("method", lambda r: _text(r["method"]), False),
    ("lr", lambda r: _text(r["lr"], "g"), True),
    ("eps", lambda r: _text(r["eps"], "g"), True),
    ("batch", lambda r: _text(r["batch_size"]), True),
    ("steps", lambda r: _text(r["steps"]), True),
    ("forwards", lambda r: _text(r["forwards"]), True),
    ("zero-shot", lambda r: _acc(r["zero_shot"], r["zero_shot_stderr"]), True),
    ("final", lambda r: _acc(r["final"], r["final_stderr"]), True),
    ("Δ loss (paired)", _paired, True),
    ("Δ acc.", lambda r: _text(r["delta_accuracy"], "+.3f"), True),
    ("McNemar p", lambda r: _text(r["mcnemar_p"], ".2g"), True),
    ("wall", lambda r: _duration(r["wall_seconds"]), True),
    ("steps/s", lambda r: _text(r["steps_per_second"], ".3g"), True),
    ("status", lambda r: _text(r["status"]), False),
)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table of :func:`compare` rows."""
    cells = [[header for header, _, _ in COLUMNS]]
    cells += [[fn(row) for _, fn, _ in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if right else v.ljust(w)
            for v, w, (_, _, right) in zip(values, widths, COLUMNS)
        ]
        return "  ".join(parts).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(values) for values in cells[1:]]
    return "\n".join(out)


def compare(
    run_dirs: list[Path] | None,
    experiment: str | None,
    tracking_uri: str | None,
    metric: str = "accuracy",
) -> tuple[str, list[dict[str, Any]]]:
    """Rows of the given run directories and/or every active run of ``experiment``, and a table.

    ``tracking_uri`` defaults to each run directory's ``<parent>/mlflow.db`` (run directories) or
    ``runs/mlflow.db`` (experiment). ``metric`` picks ``zero_shot_<metric>``/``final_<metric>``
    and the per-split evaluation curves. Run directories keep their order; experiment runs follow,
    best final ``metric`` first; a run listed both ways appears once.
    """
    if not run_dirs and not experiment:
        raise CompareError("give run directories or an experiment to compare")
    rows = _runs_from_dirs(run_dirs, tracking_uri, metric) if run_dirs else []
    if experiment:
        seen = {r["run_id"] for r in rows}
        rows += [
            r for r in _runs_from_experiment(experiment, tracking_uri, metric)
            if r["run_id"] not in seen
        ]
    return format_table(rows), rows


def run_records(client, run_id: str, eval_keys: Iterable[str] = (), metric: str = "accuracy"):
    """A run's MLflow metric histories as ``metrics.jsonl``-style records (for the plots)."""
    by_step: dict[int, dict[str, Any]] = {}
    for key in ("loss", "forwards_total", "forwards"):
        for m in client.get_metric_history(run_id, key):
            by_step.setdefault(m.step, {"step": m.step})[key] = m.value
    records: list[dict[str, Any]] = [by_step[s] for s in sorted(by_step)]
    suffix = f"_{metric}"
    for key in eval_keys:
        split = key[: -len(suffix)]
        stderr = {m.step: m.value for m in client.get_metric_history(run_id, f"{key}_stderr")}
        for m in client.get_metric_history(run_id, key):
            records.append({"step": m.step, "split": split, metric: m.value,
                            "stderr": stderr.get(m.step)})
    return records


def write_comparison_png(rows: list[dict[str, Any]], out_png: str | Path) -> Path:
    """Loss and evaluation curves of every row against forward passes -> ``out_png``."""
    from pipeline.plots import plot_comparison

    clients: dict[str, Any] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    names = [r["run_name"] for r in rows]
    metric = rows[0]["metric"] if rows else "accuracy"
    for row in rows:
        uri = row["tracking_uri"]
        client = clients.get(uri) or clients.setdefault(uri, _client(uri))
        label = row["run_name"]
        if names.count(label) > 1:
            label = f"{label} ({row['run_id'][:8]})"
        runs[label] = run_records(client, row["run_id"], row.get("eval_keys", ()), metric)
    return plot_comparison(runs, out_png, metric=metric)
