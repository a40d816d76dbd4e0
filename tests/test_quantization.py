"""A frozen 4-bit base (bitsandbytes NF4 on CPU): ZO-Act coefficients and MeZO-LoRA train on the
demo model, checkpoints hold only the adapter state, full tuning is refused."""

import math
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from pipeline import checkpoint
from pipeline.config import ConfigError, load_config
from pipeline.metrics import read_jsonl

SHORT = ["data.n_train=8", "data.n_val=4", "data.n_test=4", "data.max_length=32",
         "train.batch_size=2", "train.eval_batch_size=4", "train.steps=2",
         "train.eval_zero_shot=false", "tracking.enabled=false", "checkpoint.every=0",
         "train.threads=1", "model.quantization=nf4", "model.dtype=bf16"]


def _avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def test_full_tuning_of_a_4bit_base_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as err:
        load_config("jobs/demo.yaml", ["model.quantization=nf4"])
    assert "method.tuning=lora" in str(err.value) and "method.tuning=coefficients" in str(err.value)
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "jobs/demo.yaml",
                          "model.quantization=nf4", "method.tuning=full"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Error:" in out.stderr + out.stdout
    assert "cannot be tuned in full" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr + out.stdout


def test_4bit_layout_stays_put_and_odd_widths_run(tiny_model_dir, tiny_batch):
    """The tiny model's k_proj has 8 outputs (not a multiple of 32): the AVX512-BF16 kernel
    would assert on it, and on other layers it would repack the weight in place."""
    import bitsandbytes as bnb

    from pipeline.models.objective import batch_loss
    from pipeline.models.quantization import load_quantized

    model = load_quantized(str(tiny_model_dir), "nf4", torch.float32, torch.device("cpu"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert layers and all(not m.support_avx512bf16_for_cpu for m in layers.values())
    assert any(m.out_features % 32 for m in layers.values())
    before = {n: m.weight.data.clone() for n, m in layers.items()}
    batch = tiny_batch
    with torch.no_grad():
        assert math.isfinite(batch_loss(model, batch).item())
    assert all(torch.equal(m.weight.data, before[n]) for n, m in layers.items())
    if _avx512_bf16():  # the problem is real on this CPU: the fused path fails on the same model
        for m in layers.values():
            m.support_avx512bf16_for_cpu = True
        with pytest.raises(AssertionError), torch.no_grad():
            batch_loss(model, batch)


def _train(tmp_path, job, extra):
    from pipeline.train import run

    cfg = load_config(job, [*SHORT, *extra])
    summary = run(cfg, tmp_path, progress=False)
    losses = [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    step_dir = checkpoint.latest(tmp_path)[1]
    with safe_open(str(step_dir / "shards-rank0.safetensors"), "pt") as f:
        shards = {k: f.get_tensor(k) for k in f.keys()}
    size = sum(p.stat().st_size for p in step_dir.iterdir())
    return summary, losses, shards, torch.load(step_dir / "method.pt", weights_only=True), size


@pytest.mark.slow
def test_nf4_zoact_coefficients_train_and_checkpoint_only_coefficients(tmp_path):
    summary, losses, shards, state, size = _train(
        tmp_path, "jobs/zoact.yaml", ["method.zoact_calib_batches=1"])
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert summary["skipped_steps"] == 0 and shards == {}
    assert state["names"] and any(c.abs().sum() > 0 for c in state["C"].values())
    assert size < 10_000_000  # V, C and Adam (2.5 MB); the 4-bit base alone is ~100 MB


@pytest.mark.slow
def test_nf4_mezo_lora_trains_and_checkpoints_only_the_adapter(tmp_path):
    summary, losses, shards, _, size = _train(
        tmp_path, "jobs/demo.yaml", ["method.tuning=lora", "method.lr=1e-4", "method.eps=1e-2"])
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    names = [k.removeprefix("master::") for k in shards]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n.split(".")[-3] for n in names} == {"lora_A", "lora_B"}  # q_proj and v_proj, r 8
    assert all(".q_proj." in n or ".v_proj." in n for n in names)
    lora_b = [t for k, t in shards.items() if ".lora_B." in k and not k.startswith("master::")]
    assert all(t.numel() % 8 == 0 for t in lora_b) and any(t.abs().sum() > 0 for t in lora_b)
    assert size < 5_000_000


def test_lora_export_merges_into_a_plain_model(tiny_job, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.export import export_run
    from pipeline.train import run

    cfg = load_config("jobs/demo.yaml", [*tiny_job, "method.tuning=lora", "method.lr=1e-2",
                                         "method.eps=1e-2", "train.steps=2",
                                         "tracking.enabled=false", "train.eval_zero_shot=false"])
    run(cfg, tmp_path / "run", progress=False)
    export_run(tmp_path / "run", tmp_path / "out")
    merged = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out").named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    assert set(merged) == set(base)  # a plain model: no lora_ keys left
    moved = {n for n in base if not torch.equal(merged[n], base[n])}
    assert moved and all(".q_proj." in n or ".v_proj." in n for n in moved)


@pytest.mark.slow
def test_lora_on_2_rank_fsdp_tracks_the_single_process_run(tiny_job, tmp_path):
    from conftest import run_method_ranks

    extra = [*tiny_job, "method.tuning=lora", "method.lr=1e-2", "method.eps=1e-2"]
    (one,) = run_method_ranks(tmp_path / "one", 1, "single", "jobs/demo.yaml", extra, 3)
    two = run_method_ranks(tmp_path / "two", 2, "fsdp", "jobs/demo.yaml", extra, 3)
    assert two[0]["loss"] == two[1]["loss"]
    assert max(abs(a - b) for a, b in zip(one["loss"], two[0]["loss"])) < 1e-6
    assert all(g[0] != 0 and math.isfinite(g[0]) for g in one["grad"])


def test_the_missing_fused_kernel_warning_is_dropped_and_other_bnb_warnings_pass():
    """bitsandbytes warns at import (AVX512-BF16 CPUs) that `kernels` is missing; we never use
    that kernel, so the line only alarms. Our module is imported before bitsandbytes on the
    quantized path (load_model -> load_quantized -> transformers' bnb quantizer)."""
    import logging
    import subprocess
    import sys

    code = ("import logging, pipeline.models.quantization, bitsandbytes; "
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('other %s', 1)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "gemm_4bit_forward" not in out.stderr and "other 1" in out.stderr
    # a LoRA run imports bitsandbytes through peft, without the quantized path
    code = "import pipeline.models.lora, peft"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "gemm_4bit_forward" not in out.stderr
    from pipeline.models.quantization import FUSED_KERNEL_WARNING, _drop_fused_kernel_warning

    def record(msg):
        return logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, "", 0, msg,
                                 None, None)

    assert not _drop_fused_kernel_warning(record(FUSED_KERNEL_WARNING + " from x: %s"))
    assert _drop_fused_kernel_warning(record("anything else"))
