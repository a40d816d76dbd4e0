"""Sharded ZO on 2 gloo ranks: FSDP2 and DeepSpeed ZeRO-3 against the single-process run."""

import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import count_step_collectives
from safetensors.torch import load_file

from pipeline import checkpoint
from pipeline.metrics import read_jsonl
from pipeline.sharding_check import run_check

BACKENDS = ["fsdp", "zero3"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small(tiny_model_dir):
    return [f"model.name_or_path={tiny_model_dir}", "data.n_train=64", "data.n_val=16",
            "data.n_test=32", "train.batch_size=8", "method.lr=1e-3", "train.threads=1"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturbations_bitwise_and_run_tracks_single_process(backend, small, tmp_path):
    report = run_check("jobs/demo.yaml", small, 2, 3, tmp_path, (backend,))[backend]
    assert report["perturbation"] == 0.0
    # a perturbed forward of the same batch on every rank: the gathered weights are perturbed
    # exactly as the single process's, and the stored shards are left as they were
    assert report["probe_loss"] == 0.0 and report["stored_unchanged"]
    # Each rank averages its half of the global batch in fp32; the float64 mean of the two
    # halves differs from the fp32 mean of the whole by fp32 rounding (~1e-7 of a loss ~0.7),
    # which the 1/(2ε) of the projected gradient magnifies by 500.
    assert report["loss"] < 1e-6
    assert report["projected_grad"] < 1e-3
    assert report["params"] < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_zero_is_bitwise_without_masters(backend, small, tmp_path):
    report = run_check("jobs/demo.yaml", [*small, "method.lr=0"], 2, 2, tmp_path,
                       (backend,))[backend]
    # single is bitwise (test_precision), so equal final parameters mean bitwise here too
    assert report["perturbation"] == 0.0 and report["params"] == 0.0


def _zopipe(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=600)


def _train_args(run_dir, small, backend, *extra):
    return ["train", "jobs/demo.yaml", *small, f"parallel.backend={backend}", "train.steps=6",
            "checkpoint.every=2", "checkpoint.keep_last=0", "tracking.enabled=false", *extra,
            "--run-dir", str(run_dir), "--no-progress", "--nproc-per-node", "2"]


def _losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_resume_same_world_size_is_bitwise_and_2_to_1_tracks(backend, small, tmp_path):
    ref = tmp_path / "ref"
    done = _zopipe(*_train_args(ref, small, backend))
    assert done.returncode == 0, done.stdout + done.stderr

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli",
                             *_train_args(run, small, backend)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len(_losses(run)) >= 3:
            (run / "STOP").touch()  # what the SLURM batch script does on preemption
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out
    (run / "STOP").unlink()
    stopped, _ = checkpoint.latest(run)
    assert 3 <= stopped < 6

    resumed = _zopipe("resume", str(run), "--no-progress", "--nproc-per-node", "2")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _losses(run) == _losses(ref)
    ours = load_file(str(checkpoint.latest(run)[1] / "shards-rank0.safetensors"))
    theirs = load_file(str(checkpoint.latest(ref)[1] / "shards-rank0.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    # 2 ranks -> 1: the checkpoint reshards; the rest tracks the 2-rank run to fp32 rounding.
    one = tmp_path / "one"
    shutil.copytree(run, one)
    for path in (one / "checkpoints").iterdir():
        if path.name != f"step-{stopped}":
            shutil.rmtree(path)
    single = _zopipe("resume", str(one), "--no-progress")
    assert single.returncode == 0, single.stdout + single.stderr
    a, b = _losses(one), _losses(ref)
    assert a[:stopped] == b[:stopped]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6


def test_bf16_without_masters_resumes_bitwise_on_2_zero3_ranks(small, tmp_path):
    """The default 16-bit path on 2 ranks: resumed from the step-2 checkpoint of an
    uninterrupted run (what a run stopped or killed after step 2 resumes from), steps 3-6 give
    bitwise its losses, update log and every rank's bf16 shards. (zero3 only, to keep the suite
    short; the stop/kill machinery itself is dtype-blind and tested above and in test_resume.)"""
    ref = tmp_path / "ref"
    done = _zopipe(*_train_args(ref, small, "zero3", "model.dtype=bf16"))
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    for path in (run / "checkpoints").iterdir():
        if path.name != "step-2":
            shutil.rmtree(path)
    (run / "summary.json").unlink()
    resumed = _zopipe("resume", str(run), "--no-progress", "--nproc-per-node", "2")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "from step-2" in resumed.stdout + resumed.stderr
    assert _losses(run) == _losses(ref) and len(_losses(ref)) == 6
    assert read_jsonl(run / "update_log.jsonl") == read_jsonl(ref / "update_log.jsonl")
    for rank in (0, 1):
        ours = load_file(str(checkpoint.latest(run)[1] / f"shards-rank{rank}.safetensors"))
        theirs = load_file(str(checkpoint.latest(ref)[1] / f"shards-rank{rank}.safetensors"))
        assert set(ours) == set(theirs) and not any(k.startswith("master::") for k in ours)
        assert all(theirs[k].dtype == torch.bfloat16 for k in theirs)
        assert all(torch.equal(ours[k].view(torch.int16), theirs[k].view(torch.int16))
                   for k in theirs)
    first = load_file(str(ref / "checkpoints" / "step-2" / "shards-rank1.safetensors"))
    assert any(not torch.equal(first[k], theirs[k]) for k in theirs)  # steps 3-6 moved them


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
def test_a_step_communicates_one_collective_of_a_few_scalars(backend, fused, small, tmp_path):
    """Everything the process group ran in the step, inside its forwards too, is 2 plain
    forwards' parameter gathers (fused evaluations: ONE forward's, the two evaluations run as
    one forward of the repeated batch) plus one all-gather of the two losses."""
    record = count_step_collectives(tmp_path / "calls.json", backend,
                                    [*small, f"train.fused_evaluations={str(fused).lower()}"])
    assert record["forwards"] == 2 and record["forward"]  # the backend gathers in a forward
    assert all(c["op"] == "all_gather" for c in record["forward"])
    assert record["extra"] == [{"op": "all_gather", "numel": 2, "bytes": 16}]
    gathers = 1 if fused else 2
    assert sorted(map(str, record["missing"])) == \
        sorted(map(str, record["forward"] * (2 - gathers)))
    assert len(record["step"]) == gathers * len(record["forward"]) + 1
    assert sum(c["bytes"] for c in record["step"]) == \
        gathers * sum(c["bytes"] for c in record["forward"]) + 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_gathered_inside_a_loss_is_counted(backend, small, tmp_path):
    # the stray gather wraps backend.loss: the step evaluates one forward at a time
    record = count_step_collectives(tmp_path / "calls.json", backend,
                                    [*small, "train.fused_evaluations=false"], "--stray-gather")
    embedding = 49152 * 16 // 2  # rank 0's half of the tiny model's embedding, the first shard
    stray = {"op": "all_gather", "numel": embedding, "bytes": 4 * embedding}
    assert record["extra"] == [stray, stray, {"op": "all_gather", "numel": 2, "bytes": 16}]
