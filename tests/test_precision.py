"""16-bit storage: exact restore with fp32 masters, measured drift without, NaN steps skipped."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipeline import checkpoint
from pipeline.config import MethodConfig, load_config
from pipeline.metrics import read_jsonl
from pipeline.parallel import trainable_names
from pipeline.parallel.check import _load_whole, run_check
from pipeline.parallel.single import SingleBackend
from pipeline.zo.methods import METHODS, StepContext

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _steps(model, batch, dtype, method, *, master, steps=3, lr=0.0):
    model.to(DTYPES[dtype])
    backend = SingleBackend(model, trainable_names(model, ["*"]), "cpu", master=master)
    zo = METHODS[method](MethodConfig(name=method), backend.shards())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(steps):
        assert not zo.step(StepContext(step, 0, lr, batch, backend)).skipped
    return before, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["mezo", "bszo"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_lr_zero_restores_16bit_weights_bitwise_with_masters(tiny_model, tiny_batch, dtype,
                                                             method):
    before, after = _steps(tiny_model, tiny_batch, dtype, method, master=True)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_lr_zero_without_masters_drifts_in_16bit(tiny_model, tiny_batch, dtype):
    before, after = _steps(tiny_model, tiny_batch, dtype, "mezo", master=False)
    diffs = [(after[n].float() - before[n].float()).abs() for n in before]
    changed = sum(int((d > 0).sum()) for d in diffs) / sum(d.numel() for d in diffs)
    # θ + εz - 2εz + εz rounds to a neighbouring 16-bit value for a sizeable share of elements
    assert max(d.max().item() for d in diffs) > 0 and changed > 0.01, changed
    print(f"{dtype}: {changed:.3f} of the elements moved")


def test_nan_loss_from_fp16_overflow_leaves_weights_bitwise_and_is_counted(tiny_job,
                                                                           tiny_model_dir,
                                                                           tmp_path):
    """ε = 1e5 overflows fp16 (max 65504): every perturbed forward is non-finite, each step is
    skipped and counted, and the stored weights and masters stay the loaded ones, bitwise."""
    from transformers import AutoModelForCausalLM

    from pipeline.train import run

    cfg = load_config("jobs/demo.yaml", [*tiny_job, "model.dtype=fp16", "method.eps=1e5",
                                         "train.steps=3", "train.eval_zero_shot=false",
                                         "tracking.enabled=false", "checkpoint.every=0"])
    summary = run(cfg, tmp_path / "run", progress=False)
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert summary["skipped_steps"] == 3 and [r.get("skipped") for r in records] == [True] * 3
    saved = load_file(str(checkpoint.latest(tmp_path / "run")[1] / "shards-rank0.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16)
    for name, p in base.named_parameters():
        assert torch.equal(saved[name].view(p.shape), p.detach()), name
        assert torch.equal(saved["master::" + name].view(p.shape), p.detach().float()), name


def _deepspeed_fp16() -> bool:
    """Whether DeepSpeed's accelerator here has fp16 (its CPU accelerator has it only with
    AVX512-FP16; otherwise it refuses fp16 configs: "Type fp16 is not supported on your
    device")."""
    code = ("import os; os.environ.setdefault('DS_ACCELERATOR', 'cpu'); "
            "from deepspeed.accelerator import get_accelerator; "
            "print(get_accelerator().is_fp16_supported())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return out.stdout.strip().endswith("True")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_lr_zero_restores_bitwise_with_masters_on_2_ranks(dtype, tiny_job, tiny_model_dir,
                                                          tmp_path):
    from transformers import AutoModelForCausalLM

    backends = ("fsdp", "zero3") if dtype == "bf16" or _deepspeed_fp16() else ("fsdp",)
    extra = ["method.lr=0", f"model.dtype={dtype}", "precision.master_weights=fp32"]
    report = run_check("jobs/demo.yaml", [*tiny_job, *extra], 2, 2, tmp_path, backends)
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=DTYPES[dtype])
                .named_parameters())
    for backend in ("single", *backends):
        final = _load_whole(sorted((tmp_path / backend).glob("final-rank*.safetensors")))
        assert final and all(torch.equal(s.local.view(s.shape), base[s.name].detach())
                             for s in final), backend
        if backend != "single":
            assert report[backend]["perturbation"] == 0.0
    for backend in backends:  # real steps: finite losses (a NaN step would restore too)
        steps = [json.loads(line) for line in (tmp_path / backend / "steps.jsonl").open()]
        assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)
