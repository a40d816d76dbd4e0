"""MLflow tracking and run comparison, against real MLflow stores (SQLite and an HTTP server).

Runs are synthesised (config.yaml, metrics.jsonl, summary.json with made-up records); the trainer
is not involved. The SQLite tests share one store per module: creating an MLflow database runs its
migrations, which takes seconds.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.compare import CompareError, compare, write_comparison_png
from pipeline.config import load_config
from pipeline.plots import curves, moving_average
from pipeline.tracking import HTTP_ENV_DEFAULTS, RUN_ID_FILE, Tracker, read_run_id

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- helpers ------------------------------------------------------------------------------------


def make_cfg(experiment: str, *overrides: str, uri: str | None = None):
    items = [f"tracking.experiment={experiment}", "tracking.system_metrics=false", "method.lr=1e-5",
             *overrides]
    if uri:
        items.append(f"tracking.uri={uri}")
    return load_config(None, items)


def step_records(steps, forwards: int = 2) -> list[dict]:
    return [
        {"step": s, "loss": 1.0 / s, "projected_grad": [0.1 * s], "lr": 1e-5,
         "forwards": forwards, "seconds": 0.5}
        for s in steps
    ]


def eval_record(step: int, accuracy: float, split: str = "test", stderr: float = 0.02) -> dict:
    return {"step": step, "split": split, "accuracy": accuracy, "n": 500, "stderr": stderr}


def summary_for(steps: int, forwards: int, zero_shot: float | None, final: float,
                stderr: float = 0.02) -> dict:
    def acc(value):
        return {"accuracy": value, "n": 500, "stderr": stderr, "split": "test"}

    return {
        "method": "mezo", "model": "tiny", "task": "rotten_tomatoes", "steps": steps,
        "forwards": forwards, "skipped_steps": 0,
        "zero_shot": acc(zero_shot) if zero_shot is not None else None, "final": acc(final),
        "train_seconds": 2.0 * steps, "steps_per_second": 0.5, "wall_seconds": 2.0 * steps + 3,
    }


def write_run_files(run_dir: Path, cfg, records: list[dict], summary: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    with open(run_dir / "metrics.jsonl", "a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(summary))


def synth_run(run_dir: Path, cfg, *, steps: int = 5, zero_shot: float | None = 0.5,
              final: float = 0.8, stderr: float = 0.02) -> Tracker:
    """A whole run without the trainer: steps, zero-shot and final eval, summary, artifacts."""
    with Tracker.start(cfg, run_dir) as tracker:
        records = []
        if zero_shot is not None:
            records.append(eval_record(0, zero_shot, stderr=stderr))
            tracker.log_eval(records[-1])
        for rec in step_records(range(1, steps + 1)):
            records.append(rec)
            tracker.log_step(rec)
        records.append(eval_record(steps, final, stderr=stderr))
        tracker.log_eval(records[-1])
        summary = summary_for(steps, 2 * steps, zero_shot, final, stderr)
        write_run_files(run_dir, cfg, records, summary)
        tracker.log_summary(summary)
        tracker.log_artifacts(run_dir)
    return tracker


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def assert_full_cycle(client, run, run_dir: Path) -> None:
    """What a FINISHED synthetic run (steps 1..5, evals at 0 and 5) must show in MLflow."""
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.info.run_name == run_dir.name
    assert read_run_id(run_dir) == run_id
    params = run.data.params
    assert params["method.lr"] == "1e-05"
    assert params["method.name"] == "mezo"
    assert params["train.steps"] == "1000"
    tags = run.data.tags
    assert tags["zo.method"] == "mezo"
    assert tags["backend"] == "single"
    assert tags["precision"] == "fp32"
    assert tags["run_dir"] == str(run_dir.resolve())

    assert history(client, run_id, "loss") == [(s, 1.0 / s) for s in range(1, 6)]
    assert history(client, run_id, "forwards_total") == [(s, 2.0 * s) for s in range(1, 6)]
    assert history(client, run_id, "forwards") == [(s, 2.0) for s in range(1, 6)]
    assert history(client, run_id, "steps_per_second") == [(s, 2.0) for s in range(1, 6)]
    assert [step for step, _ in history(client, run_id, "projected_grad")] == [1, 2, 3, 4, 5]
    assert history(client, run_id, "test_accuracy") == [(0, 0.5), (5, 0.8)]
    assert history(client, run_id, "test_accuracy_stderr") == [(0, 0.02), (5, 0.02)]
    metrics = run.data.metrics
    assert metrics["zero_shot_accuracy"] == 0.5
    assert metrics["zero_shot_accuracy_stderr"] == 0.02
    assert metrics["final_accuracy"] == 0.8
    assert metrics["final_accuracy_stderr"] == 0.02
    assert metrics["wall_seconds"] == 13.0
    assert metrics["steps_per_second_mean"] == 0.5
    assert metrics["forwards_total_final"] == 10.0

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "curves.png", "metrics.jsonl", "summary.json"} <= artifacts
    assert (run_dir / "curves.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """One runs root (and so one SQLite store) for the module's SQLite tests."""
    return tmp_path_factory.mktemp("runs")


def sqlite_uri(runs_root: Path) -> str:
    return f"sqlite:///{runs_root.resolve()}/mlflow.db"


@pytest.fixture
def http_env():
    """Undo the tracker's process-wide defaults for MLflow's HTTP retries and timeout."""
    saved = {k: os.environ.pop(k, None) for k in HTTP_ENV_DEFAULTS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- SQLite store ---------------------------------------------------------------------------------


def test_sqlite_full_cycle(runs_root, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    cfg = make_cfg("cycle", "tracking.system_metrics=true",
                   "model.trainable=['*q_proj*', '*v_proj*']")
    run_dir = runs_root / "cycle-run"
    tracker = Tracker.start(cfg, run_dir)
    assert tracker.active and tracker.uri == sqlite_uri(runs_root)
    client = client_for(tracker.uri)
    records = [eval_record(0, 0.5)]
    tracker.log_eval(records[-1])
    for rec in step_records(range(1, 6)):
        records.append(rec)
        tracker.log_step(rec)
    records.append(eval_record(5, 0.8))
    tracker.log_eval(records[-1])
    summary = summary_for(5, 10, 0.5, 0.8)
    write_run_files(run_dir, cfg, records, summary)
    tracker.log_summary(summary)
    tracker.log_artifacts(run_dir)
    # System metrics: MLflow's monitor samples every 0.2 s here; wait (bounded) for a batch.
    deadline = time.monotonic() + 30
    while not any(k.startswith("system/") for k in client.get_run(tracker.run_id).data.metrics):
        assert time.monotonic() < deadline, "no system/ metrics were logged"
        time.sleep(0.2)
    tracker.finish("FINISHED")
    tracker.finish("FAILED")  # a second finish changes nothing

    run = only_run(client, "cycle")
    assert_full_cycle(client, run, run_dir)
    assert run.data.params["model.trainable"] == "*q_proj*,*v_proj*"
    assert run.data.tags["slurm.job_id"] == "4242"
    assert run.data.tags["slurm.array_job_id"] == "4240"
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                         text=True)
    if sha.returncode == 0:
        assert run.data.tags["git.sha"] == sha.stdout.strip()
    assert any(k.startswith("system/cpu") for k in run.data.metrics)
    # Artifacts sit next to the store, not in MLflow's default ./mlruns.
    assert run.info.artifact_uri.startswith(str(runs_root.resolve() / "mlartifacts"))


@pytest.mark.parametrize("store", ["sqlite", pytest.param("server", marks=pytest.mark.slow)])
def test_resume_continues_the_same_run_without_duplicates(store, runs_root, request, tmp_path):
    if store == "server":  # a real `mlflow server` on 127.0.0.1
        request.getfixturevalue("http_env")
        cfg = make_cfg("resume", uri=request.getfixturevalue("mlflow_server"))
        run_dir = tmp_path / "runs" / "resume-run"
    else:  # the default store: sqlite:///<runs root>/mlflow.db
        cfg = make_cfg("resume")
        run_dir = runs_root / "resume-run"
    with pytest.raises(KeyboardInterrupt), Tracker.start(cfg, run_dir) as first:
        first.log_eval(eval_record(0, 0.5))
        for rec in step_records([1, 2, 3]):
            first.log_step(rec)
        raise KeyboardInterrupt  # preempted after step 3
    client = client_for(first.uri)
    assert client.get_run(first.run_id).info.status == "KILLED"

    second = Tracker.start(cfg, run_dir, resume=True)
    assert second.run_id == first.run_id
    assert second.last_step == 3
    assert client.get_run(first.run_id).info.status == "RUNNING"
    # The resumed process recomputes from its last checkpoint (step 1) and its zero-shot eval.
    second.log_eval(eval_record(0, 0.5))
    for rec in step_records([2, 3, 4, 5]):
        second.log_step(rec)
    second.log_eval(eval_record(5, 0.8))
    second.log_summary(summary_for(5, 10, 0.5, 0.8))
    second.finish("FINISHED")

    run = only_run(client, "resume")
    assert run.info.run_id == first.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["zo.resumed"] == "true"
    assert history(client, run.info.run_id, "loss") == [(s, 1.0 / s) for s in range(1, 6)]
    assert history(client, run.info.run_id, "forwards_total") == [(s, 2.0 * s) for s in range(1, 6)]
    assert history(client, run.info.run_id, "test_accuracy") == [(0, 0.5), (5, 0.8)]


def test_context_manager_marks_failed_and_skips_non_finite(runs_root):
    cfg = make_cfg("failed")
    run_dir = runs_root / "failed-run"
    with pytest.raises(RuntimeError), Tracker.start(cfg, run_dir) as tracker:
        tracker.log_step({"step": 1, "loss": float("nan"), "projected_grad": [float("nan")],
                          "lr": 1e-5, "forwards": 2, "seconds": 0.5, "skipped": True})
        tracker.log_step({"step": 2, "loss": None, "projected_grad": [0.3, 0.5], "lr": 1e-5,
                          "forwards": 2, "seconds": 0.0})
        tracker.log_step({"step": 3, "loss": 0.25, "projected_grad": [0.1, 0.2, 0.6],
                          "lr": 1e-5, "forwards": 6, "seconds": 0.25})
        raise RuntimeError("boom")
    client = client_for(tracker.uri)
    run = only_run(client, "failed")
    run_id = run.info.run_id
    assert run.info.status == "FAILED"
    assert history(client, run_id, "loss") == [(3, 0.25)]
    assert history(client, run_id, "projected_grad") == [(2, 0.3), (3, 0.1)]
    assert [(s, round(v, 9)) for s, v in history(client, run_id, "projected_grad_mean")] == [
        (2, 0.4), (3, 0.3)]
    assert history(client, run_id, "skipped") == [(1, 1.0)]
    assert history(client, run_id, "forwards_total") == [(1, 2.0), (2, 4.0), (3, 10.0)]
    assert history(client, run_id, "steps_per_second") == [(1, 2.0), (3, 4.0)]


def test_stale_run_id_starts_a_new_run(runs_root, capsys):
    run_dir = runs_root / "stale-run"
    run_dir.mkdir()
    (run_dir / RUN_ID_FILE).write_text("0123456789abcdef0123456789abcdef\n")
    with Tracker.start(make_cfg("stale"), run_dir, resume=True) as tracker:
        tracker.log_step(step_records([1])[0])
    assert tracker.run_id != "0123456789abcdef0123456789abcdef"
    assert read_run_id(run_dir) == tracker.run_id
    client = client_for(tracker.uri)
    assert only_run(client, "stale").info.status == "FINISHED"
    assert history(client, tracker.run_id, "loss") == [(1, 1.0)]
    err = capsys.readouterr().err
    assert err.count("[tracking]") == 1 and "starting a new run" in err


def test_noop_tracker_off_rank_zero_and_when_disabled(tmp_path, capsys):
    for tracker, run_dir in (
        (Tracker.start(make_cfg("x"), tmp_path / "rank1", rank=1), tmp_path / "rank1"),
        (Tracker.start(make_cfg("x", "tracking.enabled=false"), tmp_path / "off"),
         tmp_path / "off"),
    ):
        with tracker:
            assert not tracker.active and tracker.run_id is None
            tracker.log_step(step_records([1])[0])
            tracker.log_eval(eval_record(0, 0.5))
            tracker.log_summary(summary_for(1, 2, 0.5, 0.6))
            tracker.log_artifacts(run_dir)
        assert not run_dir.exists()
    assert not list(tmp_path.iterdir())
    assert capsys.readouterr().err == ""


# -- unreachable and real HTTP servers -----------------------------------------------------------


def test_unreachable_server_warns_once_and_never_raises(tmp_path, capsys, http_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # a user's value is kept
    uri = f"http://127.0.0.1:{free_port()}"
    cfg = make_cfg("down", "tracking.system_metrics=true", uri=uri)
    run_dir = tmp_path / "down-run"
    started = time.monotonic()
    with Tracker.start(cfg, run_dir) as tracker:
        for rec in step_records(range(1, 4)):
            tracker.log_step(rec)
        tracker.log_eval(eval_record(3, 0.7))
        tracker.log_summary(summary_for(3, 6, None, 0.7))
        write_run_files(run_dir, cfg, step_records(range(1, 4)), summary_for(3, 6, None, 0.7))
        tracker.log_artifacts(run_dir)
    elapsed = time.monotonic() - started
    assert elapsed < 20, f"an unreachable server cost {elapsed:.1f} s"
    assert not tracker.active
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_ENV_DEFAULTS[
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    err = capsys.readouterr().err
    warning = f"[tracking] MLflow unavailable at {uri} ("
    assert err.count(warning) == 1, err
    assert err.count("[tracking]") == 1, err
    assert "training continues, the run directory stays complete" in err
    assert not (run_dir / RUN_ID_FILE).exists()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on a free local port; terminated (process group) afterwards."""
    port = free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (closed in teardown)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no huey job runners
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
         "--default-artifact-root", str(tmp_path / "art"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"

    def log_tail() -> str:
        log.flush()
        return (tmp_path / "server.log").read_text(errors="replace")[-3000:]

    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"mlflow server exited:\n{log_tail()}"
            assert time.monotonic() < deadline, f"mlflow server not up in 60 s:\n{log_tail()}"
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        # The first API request of a fresh server is slow; pay it here, not in the tracker.
        with urllib.request.urlopen(
            f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=60
        ) as resp:
            assert resp.status == 200
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        log.close()


@pytest.mark.slow
def test_http_server_full_cycle(mlflow_server, tmp_path, http_env):
    cfg = make_cfg("served", uri=mlflow_server)
    run_dir = tmp_path / "runs" / "served-run"
    tracker = synth_run(run_dir, cfg)
    assert tracker.uri == mlflow_server
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    client = client_for(mlflow_server)
    assert_full_cycle(client, only_run(client, "served"), run_dir)


# -- compare and plots ---------------------------------------------------------------------------


def test_compare_table_and_png(runs_root, tmp_path):
    cfg_a = make_cfg("sweep", "method.eps=1e-3", "train.batch_size=16")
    cfg_b = make_cfg("sweep", "method.lr=2e-5", "method.eps=1e-2", "train.batch_size=8")
    dir_a, dir_b = runs_root / "sweep-a", runs_root / "sweep-b"
    synth_run(dir_a, cfg_a, final=0.734, stderr=0.020)
    synth_run(dir_b, cfg_b, zero_shot=None, final=0.812, stderr=0.017)

    table, rows = compare([dir_a, dir_b], None, None)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["run", "method", "lr"]
    assert [r["run_name"] for r in rows] == ["sweep-a", "sweep-b"]
    row_a = next(line for line in lines if line.startswith("sweep-a"))
    row_b = next(line for line in lines if line.startswith("sweep-b"))
    assert "0.734 ± 0.020" in row_a and "0.500 ± 0.020" in row_a
    assert "0.812 ± 0.017" in row_b and " - " in row_b  # no zero-shot accuracy
    assert "1e-05" in row_a and "2e-05" in row_b
    # Fixed width: the right-aligned final column ends at the same offset in every line.
    end = lines[0].index(" final") + len(" final")
    assert row_a.index("0.734 ± 0.020") + len("0.734 ± 0.020") == end
    assert row_b.index("0.812 ± 0.017") + len("0.812 ± 0.017") == end
    assert rows[0]["forwards"] == 10 and rows[0]["steps"] == 5 and rows[1]["batch_size"] == 8
    assert rows[1]["zero_shot"] is None and math.isclose(rows[1]["final"], 0.812)

    # By experiment: the same runs, best final accuracy first.
    _, by_experiment = compare(None, "sweep", sqlite_uri(runs_root))
    assert [r["run_name"] for r in by_experiment] == ["sweep-b", "sweep-a"]

    png = write_comparison_png(rows, tmp_path / "comparison.png")
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_compare_reports_untracked_run_dirs(tmp_path):
    (tmp_path / "untracked").mkdir()
    with pytest.raises(CompareError, match="no mlflow_run_id"):
        compare([tmp_path / "untracked"], None, None)
    with pytest.raises(CompareError, match="no MLflow store"):
        compare(None, "sweep", f"sqlite:///{tmp_path}/missing.db")
    assert not (tmp_path / "missing.db").exists()


def test_curves_dedupe_resumed_steps_and_use_forward_counts():
    records = [eval_record(0, 0.5)] + step_records([1, 2, 3], forwards=2)
    records += step_records([3, 4], forwards=2)  # step 3 appended again after a resume
    records.append({"step": 5, "loss": None, "forwards": 4, "skipped": True})
    records.append(eval_record(5, 0.7))
    c = curves(records)
    assert c.loss_x == [2.0, 4.0, 6.0, 8.0]
    assert c.loss_y == [1.0, 0.5, 1.0 / 3, 0.25]
    assert c.evals["test"] == ([0.0, 12.0], [0.5, 0.7], [0.02, 0.02])
    assert moving_average([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]


RACER = """
import sys, time
from pathlib import Path
from pipeline.config import load_config
from pipeline.tracking import Tracker
cfg = load_config(None, ["tracking.experiment=race", "tracking.system_metrics=false"])
while time.time() < float(sys.argv[2]):  # both start together
    time.sleep(0.001)
tracker = Tracker.start(cfg, Path(sys.argv[1]))
print("active" if tracker.active else "inactive", flush=True)
tracker.finish("FINISHED")
"""


def test_two_first_runs_on_one_new_store_are_both_tracked_and_quiet(tmp_path):
    """Two first runs under one runs/ root: one creates the SQLite store while the other waits
    (unlocked they raced in MLflow's migration and one lost its tracking)."""
    import subprocess
    import sys
    import time

    start = time.time() + 8  # past both imports
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / f"run{i}"), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(out.strip().splitlines()[-1] == "active" for out in outs), outs
    assert not any("INFO" in out or "unavailable" in out for out in outs), outs
    client = client_for(sqlite_uri(tmp_path))
    exp = client.get_experiment_by_name("race")
    assert len(client.search_runs([exp.experiment_id])) == 2
