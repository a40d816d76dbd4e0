"""Runs that survive: SIGKILL, SIGTERM, NaN losses, full disks, corrupt checkpoints; replay."""

import json
import os
import random
import resource
import shutil
import signal
import stat
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
    stopped_at, stopped = checkpoint.latest(run_dir)
    assert 4 <= stopped_at < STEPS
    first = json.loads((stopped / "trainer.json").read_text())
    assert first["wall_seconds"] >= first["train_seconds"] > 0
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent}/mlflow.db")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"

    code, out = finish(zopipe("train", *train_args(run_dir, tiny_job, "tracking.enabled=true",
                                                   "tracking.system_metrics=false")[1:]))
    assert code == 0, out
    assert "resuming" in out
    assert losses(run_dir) == losses(reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    second = summary["train_seconds"] - first["train_seconds"]  # this session's steps
    assert summary["wall_seconds"] >= first["wall_seconds"] + second  # cumulative, like train
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
    for f in (tmp_path / "exported").iterdir():  # safetensors alone would write 0600
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~_umask(), f
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


@pytest.mark.parametrize("method,dtype", [("zo_adam", "fp32"), ("zo_adam", "bf16"),
                                          ("mezo", "bf16")])
def test_a_stopped_run_resumes_bitwise_16bit_and_adam_moments_included(tiny_job, tmp_path,
                                                                        method, dtype):
    """Stopped at step 3 and resumed to step 5, a run has the uninterrupted one's losses, update
    log and weights, bitwise. bf16 is the default 16-bit path (no fp32 masters; updates land by
    stochastic rounding keyed by the step's seed): the stored bf16 weights are the whole state.
    ZO-Adam's sharded fp32 moments go into the per-rank checkpoint files and come back."""
    from pipeline.config import load_config
    from pipeline.train import run

    common = [*tiny_job, f"method.name={method}", "tracking.enabled=false",
              "checkpoint.every=2", "checkpoint.keep_last=0", "train.eval_zero_shot=false",
              f"model.dtype={dtype}"]
    run(load_config("jobs/demo.yaml", [*common, "train.steps=5"]), tmp_path / "a",
        progress=False)
    run(load_config("jobs/demo.yaml", [*common, "train.steps=3"]), tmp_path / "b",
        progress=False)
    run(load_config("jobs/demo.yaml", [*common, "train.steps=5"]), tmp_path / "b",
        progress=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 5
    log = "update_log.jsonl"
    assert read_jsonl(tmp_path / "a" / log) == read_jsonl(tmp_path / "b" / log)

    def weights(run_dir, step):
        path = checkpoint.checkpoint_root(run_dir) / f"step-{step}" / "shards-rank0.safetensors"
        return load_file(str(path))

    saved, whole = weights(tmp_path / "b", 5), weights(tmp_path / "a", 5)
    assert set(saved) == set(whole) and not any(k.startswith("master::") for k in saved)
    assert any(k.startswith("exp_avg_sq::") for k in saved) == (method == "zo_adam")
    assert all(torch.equal(saved[k].view(torch.uint8), whole[k].view(torch.uint8)) for k in whole)
    at_stop = weights(tmp_path / "b", 3)
    names = [k for k in whole if "::" not in k]  # the weights, not the moments
    moved = sum(int((at_stop[k] != whole[k]).sum()) for k in names)
    assert moved > 0.5 * sum(whole[k].numel() for k in names)  # steps 4-5 were not rounded away


def _copy_run(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    return run_dir


def _files(run_dir):
    return {name: (run_dir / name).read_bytes() for name in
            ("config.yaml", "metrics.jsonl", "update_log.jsonl")}


@pytest.mark.parametrize("damage", ["truncate_shards", "text_method"])
def test_a_corrupt_checkpoint_is_found_before_loading_and_resume_falls_back(
        reference, tmp_path, damage):
    run_dir = _copy_run(reference, tmp_path)
    last = run_dir / "checkpoints" / f"step-{STEPS}"
    if damage == "truncate_shards":
        shard = last / "shards-rank0.safetensors"
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        (last / "method.pt").write_text("not a checkpoint\n")
    code, out = finish(zopipe("resume", str(run_dir), "--no-progress"))
    assert code == 0, out
    assert f"checkpoint {last} is corrupt" in out and "resuming from step-9" in out
    assert "Traceback" not in out
    assert "%|" not in out  # --no-progress: no bars, transformers' loading bar included
    assert losses(run_dir) == losses(reference)  # steps 10-12 recomputed, bitwise
    weights, ref = final_weights(run_dir), final_weights(reference)
    assert all(torch.equal(weights[k], ref[k]) for k in ref)
    kept = run_dir / "checkpoints" / f"corrupt-step-{STEPS}"  # set aside, not deleted
    assert kept.is_dir() and (kept / "method.pt").exists()


def test_when_no_checkpoint_verifies_resume_stops_in_one_line_and_touches_nothing(
        reference, tmp_path):
    run_dir = _copy_run(reference, tmp_path)
    for _, path in checkpoint.complete_checkpoints(run_dir):
        data = (path / "trainer.json").read_bytes()
        (path / "trainer.json").write_bytes(data[::-1])  # same size, other bytes
    before = _files(run_dir)
    code, out = finish(zopipe("resume", str(run_dir), "--no-progress"))
    assert code == 1 and "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "no checkpoint of" in errors[0] and "verifies" in errors[0]
    assert "trainer.json differs from what was saved" in out
    assert _files(run_dir) == before


def test_a_pre_manifest_marker_is_checked_for_files_and_a_bad_file_is_one_line(reference,
                                                                              tmp_path):
    run_dir = _copy_run(reference, tmp_path)
    last = run_dir / "checkpoints" / f"step-{STEPS}"
    assert checkpoint.verify(last) == []
    (last / checkpoint.COMPLETE).write_text(f"{STEPS}\n")  # the marker before manifests
    assert checkpoint.verify(last) == []
    (last / "method.pt").write_text("not a checkpoint\n")  # found only when loading
    (run_dir / "summary.json").unlink()  # else the finished run loads nothing
    code, out = finish(zopipe("resume", str(run_dir), "--no-progress"))
    assert code == 1 and "Traceback" not in out and "weights_only" not in out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "method.pt cannot be read" in errors[0]
    (last / "config.yaml").unlink()
    assert checkpoint.verify(last) == ["config.yaml is missing"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_checkpoint_files_follow_the_umask(reference):
    """safetensors creates 0600 files; a group-shared run directory needs the umask's mode."""
    want = 0o666 & ~_umask()  # the reference run inherited this process's umask
    ckpt = checkpoint.latest(reference)[1]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in ckpt.iterdir()}
    assert modes == dict.fromkeys(modes, want)


def test_export_refuses_a_non_empty_out_and_a_missing_adapter_creating_nothing(reference,
                                                                              tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("another model's weights\n")
    code, text = finish(zopipe("export", str(reference), "--out", str(out)))
    assert code == 1 and "Traceback" not in text, text
    assert f"Error: {out} is not empty; give --out a new (or empty) directory" in text
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "another model's weights\n"
    code, text = finish(zopipe("export", str(reference), "--out", str(tmp_path / "new"),
                               "--adapter-only"))
    assert code == 1 and "method mezo trains the model's own weights" in text, text
    assert not (tmp_path / "new").exists()


def test_a_run_that_fails_before_writing_leaves_no_lock_and_no_directory(tmp_path):
    from pipeline.run_lock import run_lock

    class Failed(Exception):
        pass

    with pytest.raises(Failed), run_lock(tmp_path / "runs" / "run"):
        raise Failed
    assert list(tmp_path.iterdir()) == []  # neither the run directory nor runs/
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(Failed), run_lock(kept):
        raise Failed
    assert list(kept.iterdir()) == []  # the user's directory stays, as it was
    with pytest.raises(Failed), run_lock(kept):
        (kept / "config.yaml").write_text("a run began\n")
        raise Failed
    assert sorted(p.name for p in kept.iterdir()) == [".lock", "config.yaml"]
    with run_lock(kept):  # the lock is free again
        pass


def test_a_second_process_on_a_run_directory_is_refused_and_a_killed_one_leaves_no_lock(
        tiny_job, tmp_path):
    run_dir = tmp_path / "run"
    first = zopipe(*train_args(run_dir, tiny_job, "train.steps=100000"))
    assert wait_for_step(run_dir, 4, first)
    code, out = finish(zopipe(*train_args(run_dir, tiny_job)))
    assert code == 1 and "Traceback" not in out
    assert f"{run_dir} is in use by pid {first.pid}" in out
    assert first.poll() is None  # the first run goes on
    first.send_signal(signal.SIGKILL)  # its lock dies with it
    first.wait()
    code, out = finish(zopipe("resume", str(run_dir), f"train.steps={STEPS}", "--no-progress"))
    assert code == 0, out
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one run's records, not two interleaved
