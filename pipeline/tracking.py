"""MLflow tracking of a run: params, per-step metrics, evaluations, summary, artifacts.

Only global rank 0 talks to MLflow; every other rank (and ``tracking.enabled: false``) gets a
no-op :class:`Tracker` with the same methods. Tracking never breaks training: the first MLflow
error prints one warning and turns the tracker into a no-op; the run directory's plain files
(``metrics.jsonl``, ``summary.json``) remain the complete record.

The default store is MLflow's embedded SQLite store next to the run directories
(``sqlite:///<runs root>/mlflow.db``), artifacts in ``<runs root>/mlartifacts``. On a cluster,
``tracking.uri`` points at an ``mlflow server`` over HTTP.

The MLflow run id is written to ``<run_dir>/mlflow_run_id``; starting a tracker on a run directory
that has one continues that run. A continued run reads back the last step it logged and silently
drops records at or before it, so a resumed run that recomputes steps after its last checkpoint
logs each step once, and ``forwards_total`` continues from the logged value.

Usage (rank 0 talks to MLflow, other ranks get a no-op)::

    with Tracker.start(cfg, run_dir, rank=rank, resume=resuming) as tracker:
        ...
        tracker.log_step(record)       # per ZO step
        tracker.log_eval(record)       # per evaluation
        tracker.log_summary(summary)   # at the end
        tracker.log_artifacts(run_dir)
    # FINISHED on a normal exit, FAILED on an exception, KILLED on KeyboardInterrupt/SystemExit
"""

from __future__ import annotations

import fcntl
import functools
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.paired import RECORD_KEYS

RUN_ID_FILE = "mlflow_run_id"
ARTIFACT_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "update_log.jsonl",
                  "examples.jsonl")
CURVES_PNG = "curves.png"
STATUSES = ("FINISHED", "FAILED", "KILLED")


# Bounded retries/timeouts for http(s) tracking servers: an unreachable server must cost seconds,
# not MLflow's default of 7 retries with exponential backoff and 120 s timeouts. Values a user set
# in the environment win.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
SYSTEM_METRICS_INTERVAL_S = 10.0
_PARAM_MAX = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_BATCH_MAX = 100  # params/tags per log_batch call (MAX_PARAMS_TAGS_PER_BATCH)


def default_tracking_uri(run_dir: Path) -> str:
    """``sqlite:///<runs root>/mlflow.db``, the runs root being the run directory's parent."""
    return f"sqlite:///{Path(run_dir).parent.resolve()}/mlflow.db"


def read_run_id(run_dir: Path) -> str | None:
    """The MLflow run id recorded in ``run_dir``, or None."""
    path = Path(run_dir) / RUN_ID_FILE
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return text or None


def _write_run_id(run_dir: Path, run_id: str) -> None:
    path = run_dir / RUN_ID_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)


def sqlite_artifact_root(uri: str) -> str | None:
    """``<db dir>/mlartifacts`` for a ``sqlite:///`` URI (instead of MLflow's ``./mlruns``)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return str(Path(db).resolve().parent / "mlartifacts")


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """HEAD of the repository holding this package (None outside a git checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    # Only this package's own checkout counts, not a repository it happens to sit inside.
    if len(out) != 2 or Path(out[0]).resolve() != root:
        return None
    return out[1]


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return str(value)[:_PARAM_MAX]


def _number(value: Any) -> float | None:
    """A finite float, or None for None/NaN/inf/non-numbers."""
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    msg = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _warn(message: str) -> None:
    print(f"[tracking] {message}", file=sys.stderr, flush=True)


def _quiet_mlflow() -> None:
    """MLflow's INFO lines (creating and migrating tables, system metrics started) are not the
    user's business on every run; warnings and errors still show."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive ``flock`` beside a local SQLite store while a run opens it: two first runs
    under one ``runs/`` root would race in MLflow's schema migration (one fails with
    ``CommandError: Online migration expected to match one row`` and loses its tracking)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


class Tracker:
    """Logs one run to MLflow; a no-op when disabled, on ranks other than 0, or after an error.

    Create with :meth:`start` (or :meth:`noop`); every method is safe to call on a no-op tracker.
    """

    def __init__(self, client: Any = None, run_id: str | None = None, uri: str | None = None):
        self._client = client
        self._run_id = run_id
        self._uri = uri
        self._monitor: Any = None
        self._finished = client is None
        self._warned = False
        self._last_step: int | None = None  # last training step logged (resumed from MLflow)
        self._forwards_total = 0.0
        self._eval_last: dict[str, int] = {}  # metric key -> last step logged
        self._continued = False

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def noop(cls) -> Tracker:
        """A tracker that logs nothing."""
        return cls()

    @classmethod
    def start(cls, cfg, run_dir: Path, *, rank: int = 0, resume: bool = False) -> Tracker:
        """Start (or continue) the MLflow run of ``run_dir``; a no-op tracker off rank 0.

        If ``run_dir/mlflow_run_id`` exists the run it names is continued (status back to
        RUNNING); otherwise a new run is created in ``cfg.tracking.experiment`` and its id is
        written there. ``resume`` marks an intended resume (tag ``zo.resumed``); deduplication of
        re-logged steps happens whenever an existing run is continued.
        """
        tcfg = cfg.tracking
        if rank != 0 or not tcfg.enabled:
            return cls.noop()
        run_dir = Path(run_dir)
        uri = tcfg.uri or default_tracking_uri(run_dir)
        tracker = cls(uri=uri)
        try:
            if uri.startswith(("http://", "https://")):
                for key, value in HTTP_ENV_DEFAULTS.items():
                    os.environ.setdefault(key, value)
            run_dir.mkdir(parents=True, exist_ok=True)
            from mlflow import MlflowClient

            from pipeline.sweep import claim_parent

            _quiet_mlflow()
            first_in_sweep = claim_parent()  # None outside a sweep (SLURM job array)
            with _store_lock(uri):  # the first run creates (migrates) a SQLite store alone
                tracker._client = MlflowClient(tracking_uri=uri)
                tracker._finished = False
                run_id = read_run_id(run_dir)
                if run_id is None or not tracker._continue(run_id, resume):
                    tracker._create(cfg, run_dir, first_in_sweep)
        except Exception as exc:  # tracking must never break training
            tracker._disable(exc)
            return tracker
        if tcfg.system_metrics:
            tracker._start_system_metrics()
        return tracker

    def _continue(self, run_id: str, resume: bool) -> bool:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                _warn(f"run {run_id} from {RUN_ID_FILE} is not in {self._uri}; starting a new run")
                return False
            raise
        if run.info.lifecycle_stage != "active":
            _warn(f"run {run_id} from {RUN_ID_FILE} is deleted in {self._uri}; starting a new run")
            return False
        self._run_id = run_id
        self._continued = True
        self._client.update_run(run_id, status="RUNNING")
        if resume:
            self._client.set_tag(run_id, "zo.resumed", "true")
        for key in ("loss", "forwards_total"):
            history = self._client.get_metric_history(run_id, key)
            if not history:
                continue
            last = max(history, key=lambda m: (m.step, m.timestamp))
            if self._last_step is None or last.step > self._last_step:
                self._last_step = last.step
            if key == "forwards_total":
                self._forwards_total = last.value
        return True

    def _create(self, cfg, run_dir: Path, first_in_sweep: bool | None = None) -> None:
        from mlflow.entities import Param

        from pipeline.sweep import parent_run_id

        parent = parent_run_id(self._client, lambda: self._experiment_id(cfg.tracking.experiment),
                               first_in_sweep)
        experiment_id = self._experiment_id(cfg.tracking.experiment)
        tags = {
            "zo.method": cfg.method.name,
            "backend": cfg.parallel.backend,
            "precision": cfg.model.dtype,
            "run_dir": str(run_dir.resolve()),
        }
        if parent:
            tags["mlflow.parentRunId"] = parent  # a task of a sweep (pipeline.sweep)
        sha = git_sha()
        if sha:
            tags["git.sha"] = sha
        for tag, env in (
            ("slurm.job_id", "SLURM_JOB_ID"),
            ("slurm.array_job_id", "SLURM_ARRAY_JOB_ID"),
            ("slurm.array_task_id", "SLURM_ARRAY_TASK_ID"),
        ):
            if os.environ.get(env):
                tags[tag] = os.environ[env]
        run = self._client.create_run(experiment_id, tags=tags, run_name=run_dir.name)
        self._run_id = run.info.run_id
        params = [Param(k, _param_value(v)) for k, v in cfg.flat().items()]
        for i in range(0, len(params), _BATCH_MAX):
            self._client.log_batch(self._run_id, params=params[i:i + _BATCH_MAX],
                                   synchronous=True)
        _write_run_id(run_dir, self._run_id)

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self._client.create_experiment(
                    name, artifact_location=sqlite_artifact_root(self._uri)
                )
            except MlflowException:
                exp = self._client.get_experiment_by_name(name)  # created concurrently
                if exp is None:
                    raise
        if exp.lifecycle_stage != "active":
            raise RuntimeError(
                f"experiment {name!r} is deleted; restore it or set tracking.experiment"
            )
        return exp.experiment_id

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self._run_id,
                sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                resume_logging=self._continued,
                tracking_uri=self._uri,
            )
            monitor.start()
            self._monitor = monitor
        except Exception as exc:  # psutil missing, unsupported platform, ...
            _warn(f"system metrics unavailable ({_short(exc)}); continuing without them")

    # -- state ----------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether this tracker still talks to MLflow."""
        return self._client is not None

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def uri(self) -> str | None:
        return self._uri

    @property
    def last_step(self) -> int | None:
        """The last training step logged (read back from MLflow on a continued run)."""
        return self._last_step

    def _disable(self, exc: BaseException) -> None:
        if self._warned:
            return
        self._warned = True
        _warn(
            f"MLflow unavailable at {self._uri} ({_short(exc)}); training continues, "
            "the run directory stays complete"
        )
        self._client = None
        self._finished = True
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            # Stop the sampling thread without waiting on a possibly hanging request.
            event = getattr(monitor, "_shutdown_event", None)
            if event is not None:
                event.set()

    def _log_metrics(self, values: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for key, value in values.items():
            number = _number(value)
            if number is not None:
                metrics.append(Metric(key, number, now, int(step)))
        if metrics:
            self._client.log_batch(self._run_id, metrics=metrics, synchronous=True)

    # -- logging --------------------------------------------------------------------------------

    def log_step(self, record: Mapping[str, Any]) -> None:
        """Metrics of one ZO step (a ``metrics.jsonl`` step record) at ``record["step"]``.

        Steps at or before the last logged step are dropped (a resumed run recomputing them).
        """
        if self._client is None:
            return
        try:
            step = int(record["step"])
            if self._last_step is not None and step <= self._last_step:
                return
            values: dict[str, Any] = {"loss": record.get("loss"), "lr": record.get("lr")}
            grad = record.get("projected_grad")
            if isinstance(grad, (list, tuple)):
                finite = [g for g in (_number(v) for v in grad) if g is not None]
                values["projected_grad"] = grad[0] if grad else None
                if len(grad) > 1 and finite:
                    values["projected_grad_mean"] = sum(finite) / len(finite)
            else:
                values["projected_grad"] = grad
            forwards = _number(record.get("forwards"))
            if forwards is not None:
                values["forwards"] = forwards
                self._forwards_total += forwards
            if _number(record.get("forwards_total")) is not None:
                self._forwards_total = float(record["forwards_total"])  # trainer knows better
            if forwards is not None or "forwards_total" in record:
                values["forwards_total"] = self._forwards_total
            seconds = _number(record.get("seconds"))
            if seconds:
                values["steps_per_second"] = 1.0 / seconds
            if record.get("skipped"):
                values["skipped"] = 1.0
            self._log_metrics(values, step)
            self._last_step = step
        except Exception as exc:
            self._disable(exc)

    def log_eval(self, record: Mapping[str, Any]) -> None:
        """``<split>_accuracy``, ``<split>_loss`` (each with ``_stderr``) and, when the record has
        them, the paired changes from zero-shot (``<split>_delta_loss``, ``..._se``,
        ``<split>_delta_accuracy``, ``..._se``, ``<split>_mcnemar_p``) at ``record["step"]``.

        An evaluation already logged at this step or later (zero-shot at step 0 included) is
        dropped.
        """
        if self._client is None:
            return
        try:
            step = int(record["step"])
            key = f"{record['split']}_accuracy"
            if key not in self._eval_last and self._continued:
                history = self._client.get_metric_history(self._run_id, key)
                if history:
                    self._eval_last[key] = max(m.step for m in history)
            if key in self._eval_last and step <= self._eval_last[key]:
                return
            split = record["split"]
            values = {key: record.get("accuracy"), f"{key}_stderr": record.get("stderr"),
                      f"{split}_loss": record.get("eval_loss"),
                      f"{split}_loss_stderr": record.get("eval_loss_stderr")}
            values.update({f"{split}_{k}": record[k] for k in RECORD_KEYS if k in record})
            self._log_metrics(values, step)
            self._eval_last[key] = step
        except Exception as exc:
            self._disable(exc)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Final metrics of ``summary.json``: zero-shot/final accuracy and loss, the paired change
        (``final_delta_loss``, ``final_delta_loss_se``, ``final_loss_z``, ``final_delta_accuracy``,
        ``final_delta_accuracy_se``, ``final_mcnemar_p``), wall time, throughput."""
        if self._client is None:
            return
        try:
            steps = summary.get("steps")
            final_step = int(steps) if isinstance(steps, int) else (self._last_step or 0)
            zero_shot = summary.get("zero_shot") or {}
            final = summary.get("final") or {}
            change = summary.get("paired") or {}
            if zero_shot:
                self._log_metrics({
                    "zero_shot_accuracy": zero_shot.get("accuracy"),
                    "zero_shot_accuracy_stderr": zero_shot.get("stderr"),
                    "zero_shot_loss": zero_shot.get("eval_loss"),
                    "zero_shot_loss_stderr": zero_shot.get("eval_loss_stderr"),
                }, 0)
            forwards = summary.get("forwards")
            self._log_metrics({
                **{f"final_{k}": change.get(k) for k in (*RECORD_KEYS, "loss_z")},
                "final_loss": final.get("eval_loss"),
                "final_loss_stderr": final.get("eval_loss_stderr"),
                "final_accuracy": final.get("accuracy"),
                "final_accuracy_stderr": final.get("stderr"),
                "wall_seconds": summary.get("wall_seconds"),
                "train_seconds": summary.get("train_seconds"),
                "steps_per_second_mean": summary.get("steps_per_second"),
                "forwards_total_final": forwards if forwards is not None else self._forwards_total,
                "steps_final": steps,
                "skipped_steps": summary.get("skipped_steps"),
            }, final_step)
        except Exception as exc:
            self._disable(exc)

    def log_artifacts(self, run_dir: Path, extra: Iterable[Path] = ()) -> None:
        """Upload the run directory's files and a fresh ``curves.png`` drawn from metrics.jsonl."""
        if self._client is None:
            return
        run_dir = Path(run_dir)
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            try:
                from pipeline.metrics import read_jsonl
                from pipeline.plots import plot_run_curves

                plot_run_curves(read_jsonl(metrics), run_dir / CURVES_PNG)
            except Exception as exc:  # a plot is not worth a failed run
                _warn(f"could not draw {CURVES_PNG} ({_short(exc)})")
        paths = [run_dir / name for name in (*ARTIFACT_FILES, CURVES_PNG)] + list(extra)
        try:
            for path in paths:
                if path.is_file():
                    self._client.log_artifact(self._run_id, str(path))
        except Exception as exc:
            self._disable(exc)

    def finish(self, status: str = "FINISHED") -> None:
        """Stop system metrics and mark the run FINISHED, FAILED or KILLED (once)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        if self._finished or self._client is None:
            self._finished = True
            return
        self._finished = True
        monitor, self._monitor = self._monitor, None
        try:
            if monitor is not None:
                monitor.finish()  # before set_terminated: the monitor stops on a finished run
            self._client.set_terminated(self._run_id, status=status)
        except Exception as exc:
            self._disable(exc)

    # -- context manager ------------------------------------------------------------------------

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            status = "KILLED"
        else:
            status = "FAILED"
        self.finish(status)
        return False
