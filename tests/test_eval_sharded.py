"""Per-example read-outs under sharding: 2 FSDP ranks score different batches, and rank 0 still
gets every example's loss and correctness in split order (the all-reduce of examples.jsonl)."""

import subprocess
import sys

import pytest

from pipeline.metrics import read_jsonl

pytestmark = pytest.mark.slow


def _zero_shot(tiny_model_dir, run_dir, *extra):
    """Per-example zero-shot values of a 0-step run (an odd test split: ranks get unequal work)."""
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "jobs/demo.yaml",
           f"model.name_or_path={tiny_model_dir}", "data.n_train=16", "data.n_val=8",
           "data.n_test=37", "train.eval_batch_size=8", "train.steps=0", "train.threads=1",
           "tracking.enabled=false", *extra, "--run-dir", str(run_dir), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return next(r for r in read_jsonl(run_dir / "examples.jsonl") if r["step"] == 0)


def test_two_fsdp_ranks_gather_every_example_in_split_order(tiny_model_dir, tmp_path):
    single = _zero_shot(tiny_model_dir, tmp_path / "single")
    sharded = _zero_shot(tiny_model_dir, tmp_path / "fsdp", "parallel.backend=fsdp",
                         "--nproc-per-node", "2")
    assert len(sharded["loss"]) == len(single["loss"]) == 37
    assert max(abs(a - b) for a, b in zip(sharded["loss"], single["loss"])) < 1e-5
    assert sharded["correct"] == single["correct"]
    assert len(set(single["loss"])) > 30  # distinct values: a misplaced one would show
