"""Runs that survive: SIGKILL, SIGTERM, NaN losses, full disks, corrupt checkpoints; replay."""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pipeline import checkpoint
from pipeline.metrics import read_jsonl

STEPS = 12


def zopipe(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def train_args(run_dir, tiny_job, *extra):
    return ["train", "jobs/demo.yaml", *tiny_job, f"train.steps={STEPS}", "checkpoint.every=3",
            "checkpoint.keep_last=0", "tracking.enabled=false", *extra, "--run-dir",
            str(run_dir), "--no-progress"]


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def final_weights(run_dir):
    step, path = checkpoint.latest(run_dir)
    assert step == STEPS
    return load_file(str(path / "shards-rank0.safetensors"))


def wait_for_step(run_dir, step, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        path = run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        if sum('"loss"' in line for line in lines) >= step:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_job):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    code, out = finish(zopipe(*train_args(run_dir, tiny_job)))
    assert code == 0, out
    return run_dir


@pytest.fixture(scope="module")
def tiny_job(tiny_model_dir):  # module scope for the reference fixture
    return [f"model.name_or_path={tiny_model_dir}", "data.n_train=64", "data.n_val=16",
            "data.n_test=32", "train.batch_size=8", "method.lr=1e-3", "train.threads=1"]


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_is_bitwise(reference, tiny_job, tmp_path):
    rng = random.Random(1234)
    ref_losses, ref_weights = losses(reference), final_weights(reference)
    assert len(ref_losses) == STEPS
    for trial in range(3):
        run_dir = tmp_path / f"trial{trial}"
        proc = zopipe(*train_args(run_dir, tiny_job))
        kill_at = rng.randint(1, STEPS - 2)
        assert wait_for_step(run_dir, kill_at, proc)
        time.sleep(rng.random() * 0.3)  # anywhere inside the next step or save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        code, out = finish(zopipe("resume", str(run_dir), "--no-progress"))
        assert code == 0, out
        assert losses(run_dir) == ref_losses, f"trial {trial}, killed after step {kill_at}"
        weights = final_weights(run_dir)
        assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues_one_mlflow_run(reference, tiny_job, tmp_path):
    from mlflow import MlflowClient

    run_dir = tmp_path / "runs" / "run"
    proc = zopipe(*train_args(run_dir, tiny_job, "tracking.enabled=true",
                              "tracking.system_metrics=false"))
    assert wait_for_step(run_dir, 4, proc)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 128 + signal.SIGTERM, out
    assert "zopipe resume" in out
    stopped_at, _ = checkpoint.latest(run_dir)
    assert 4 <= stopped_at < STEPS
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent}/mlflow.db")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"

    code, out = finish(zopipe("train", *train_args(run_dir, tiny_job, "tracking.enabled=true",
                                                   "tracking.system_metrics=false")[1:]))
    assert code == 0, out
    assert "resuming" in out
    assert losses(run_dir) == losses(reference)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow
def test_replay_and_export_equal_the_run(reference, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = final_weights(reference)
    code, out = finish(zopipe("replay", str(reference), "--out", str(tmp_path / "replayed"),
                              "--no-progress"))
    assert code == 0, out
    code, out = finish(zopipe("export", str(reference), "--out", str(tmp_path / "exported")))
    assert code == 0, out
    for name in ("replayed", "exported"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        params = dict(model.named_parameters())
        assert all(torch.equal(params[k].reshape(-1), ref[k]) for k in ref), name
    log = (reference / "update_log.jsonl").stat().st_size
    assert log / STEPS < 500  # bytes per step: the whole trajectory in kilobytes


def test_changed_config_is_refused_and_harmless_change_allowed(reference, tiny_job, tmp_path):
    code, out = finish(zopipe("resume", str(reference), "method.lr=0.5", "--no-progress"))
    assert code == 1 and "method.lr" in out and "Traceback" not in out
    code, out = finish(zopipe("resume", str(reference), "--no-progress"))
    assert code == 0 and "already finished" in out


def test_nan_losses_are_skipped_counted_and_stop_the_run(tiny_job, tmp_path):
    run_dir = tmp_path / "run"
    code, out = finish(zopipe(*train_args(run_dir, tiny_job, "method.lr=1e38",
                                          "train.max_nonfinite_steps=3")))
    assert code == 1 and "non-finite losses in a row" in out and "Traceback" not in out
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert sum(1 for r in records if r.get("skipped")) == 3
    assert all(r["loss"] is None for r in records[-3:])


def test_full_disk_at_save_keeps_the_previous_checkpoint(tiny_model, tmp_path):
    from pipeline.config import MethodConfig
    from pipeline.parallel import trainable_names
    from pipeline.parallel.single import SingleBackend
    from pipeline.zo.methods.mezo import MeZO

    backend = SingleBackend(tiny_model, trainable_names(tiny_model, ["*"]), "cpu", master=False)
    method = MeZO(MethodConfig(), backend.shards())
    first = checkpoint.save(tmp_path, 1, backend, method, {"step": 1}, "x: 1\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # the OS refuses larger files
    try:
        with pytest.raises(checkpoint.CheckpointError, match="step-1 is intact"):
            checkpoint.save(tmp_path, 2, backend, method, {"step": 2}, "x: 1\n")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert checkpoint.latest(tmp_path) == (1, first)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-1"]


def test_incomplete_checkpoints_are_ignored(tiny_model, tmp_path, capsys):
    from pipeline.config import MethodConfig
    from pipeline.parallel import trainable_names
    from pipeline.parallel.single import SingleBackend
    from pipeline.zo.methods.mezo import MeZO

    backend = SingleBackend(tiny_model, trainable_names(tiny_model, ["*"]), "cpu", master=False)
    method = MeZO(MethodConfig(), backend.shards())
    good = checkpoint.save(tmp_path, 3, backend, method, {"step": 3}, "x: 1\n")
    partial = tmp_path / "checkpoints" / "step-6"
    partial.mkdir()
    (partial / "trainer.json").write_text(json.dumps({"step": 6}))
    assert checkpoint.latest(tmp_path) == (3, good)
    assert "ignoring incomplete checkpoint" in capsys.readouterr().err


def test_zo_adam_moments_survive_a_resume(tiny_job, tmp_path):
    """The sharded Adam moments go into the per-rank checkpoint files and come back."""
    from pipeline.config import load_config
    from pipeline.train import run

    common = [*tiny_job, "method.name=zo_adam", "tracking.enabled=false", "checkpoint.every=2",
              "train.eval_zero_shot=false"]
    run(load_config("jobs/demo.yaml", [*common, "train.steps=5"]), tmp_path / "a",
        progress=False)
    run(load_config("jobs/demo.yaml", [*common, "train.steps=3"]), tmp_path / "b",
        progress=False)
    run(load_config("jobs/demo.yaml", [*common, "train.steps=5"]), tmp_path / "b",
        progress=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    saved = load_file(str(checkpoint.latest(tmp_path / "b")[1] / "shards-rank0.safetensors"))
    assert any(k.startswith("exp_avg_sq::") for k in saved)
