"""Precision report: drift, lost updates, memory and accuracy per precision on the demo model.

(a) drift: max and mean |θ_after - θ_before| over all weights after N steps at learning rate 0,
    per method (MeZO, BSZO), storage dtype, with and without fp32 masters;
(b) lost updates: after one step at the recipe's learning rate (jobs/demo.yaml), the fraction of
    elements whose stored value did not change, and, with masters, of masters that did not change
    (an update that moved the master is kept, even while the 16-bit copy does not show it yet);
(c) memory and (d) accuracy: one fresh process per precision / quantization runs the same short
    training run (MeZO; LoRA on a quantized base; ZO-Act coefficients) and reports the peak RSS
    (CPU; max_memory_allocated on a GPU) and the test accuracy before and after.

Sizes (--steps, --run-steps and SIZE below) are chosen to finish in ~10-15 minutes on 2 CPU
cores. Usage: python bench/precision_report.py [--steps 2] [--run-steps 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

JOB = "jobs/demo.yaml"
SIZE = ["data.n_train=64", "data.n_val=8", "data.n_test=64", "data.max_length=64",
        "train.batch_size=4", "train.eval_batch_size=32", "tracking.enabled=false",
        "train.threads=1"]
RUNS = {  # (c)+(d): label -> overrides of the same short run
    "fp32": ["model.dtype=fp32"],
    "bf16 + fp32 masters": ["model.dtype=bf16", "precision.master_weights=fp32"],
    "bf16, no masters": ["model.dtype=bf16", "precision.master_weights=none"],
    "fp16 + fp32 masters": ["model.dtype=fp16", "precision.master_weights=fp32"],
    "fp16, no masters": ["model.dtype=fp16", "precision.master_weights=none"],
    "nf4 + LoRA (MeZO)": ["model.dtype=bf16", "model.quantization=nf4", "method.tuning=lora",
                          "method.lr=1e-4", "method.eps=1e-2"],
    "nf4 + ZO-Act C": ["model.dtype=bf16", "model.quantization=nf4", "method.name=zoact",
                       "method.tuning=coefficients", "model.trainable=[]", "method.lr=1e-3",
                       "method.zoact_calib_batches=1"],
    "int8 + LoRA (MeZO)": ["model.quantization=int8", "method.tuning=lora", "method.lr=1e-4",
                           "method.eps=1e-2"],
}


def drift_and_lost(method: str, dtype: str, steps: int, data) -> list[dict]:
    """(a) and (b) for one method and dtype, without and with fp32 masters."""
    from pipeline.config import load_config
    from pipeline.models.loading import load_model
    from pipeline.parallel import trainable_names
    from pipeline.parallel.single import SingleBackend
    from pipeline.zo.methods import StepContext, build_method

    cfg = load_config(JOB, [*SIZE, f"model.dtype={dtype}", f"method.name={method}"])
    model = load_model(cfg.model, torch.device("cpu"))
    names = trainable_names(model, cfg.model.trainable)
    params = dict(model.named_parameters())
    init = {n: params[n].detach().clone() for n in names}
    batch = data.train_batch(0, cfg.train.batch_size, cfg.train.seed)
    rows = []
    for master in ([False] if dtype == "fp32" else [False, True]):
        def fresh(master=master):
            for n in names:
                params[n].data.copy_(init[n])
            backend = SingleBackend(model, names, "cpu", master=master)
            return backend, build_method(cfg, backend.shards())

        backend, zo = fresh()
        for step in range(steps):
            zo.step(StepContext(step, cfg.train.seed, 0.0, batch, backend))
        diffs = [(params[n].detach().float() - init[n].float()).abs() for n in names]
        total = sum(d.numel() for d in diffs)
        row = {"method": method, "dtype": dtype, "masters": "fp32" if master else "none",
               "drift_max": max(d.max().item() for d in diffs),
               "drift_mean": sum(d.sum().item() for d in diffs) / total}
        backend, zo = fresh()
        before = [s.master.clone() for s in backend.shards()] if master else None
        stats = zo.step(StepContext(0, cfg.train.seed, cfg.method.lr, batch, backend))
        same = sum(int((params[n].detach() == init[n]).sum()) for n in names)
        row.update(lr=cfg.method.lr, skipped=stats.skipped, stored_unchanged=same / total)
        if master:
            kept = sum(int((s.master == b).sum()) for s, b in zip(backend.shards(), before))
            row["master_unchanged"] = kept / total
        rows.append(row)
    return rows


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` over
    ``execve``, so a child started by this script would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_run(overrides: list[str], steps: int) -> dict:
    """(c)+(d) in this process: build, zero-shot accuracy, ``steps`` steps, accuracy, memory."""
    from pipeline.config import load_config
    from pipeline.evaluation import evaluate
    from pipeline.train import build
    from pipeline.zo.methods import StepContext

    cfg = load_config(JOB, [*SIZE, *overrides])
    baseline = peak_rss_mb()  # imports only
    backend, method, data = build(cfg)
    t = cfg.train
    before = evaluate(backend, data, "test", t.eval_batch_size, progress=False).accuracy
    losses, skipped, tic = [], 0, time.perf_counter()
    for step in range(steps):
        batch = data.train_batch(step, t.batch_size, t.seed)
        stats = method.step(StepContext(step, t.seed, cfg.method.lr, batch, backend))
        losses.append(stats.loss)
        skipped += stats.skipped
    seconds = (time.perf_counter() - tic) / steps
    after = evaluate(backend, data, "test", t.eval_batch_size, progress=False).accuracy
    out = {"acc_before": before, "acc_after": after, "losses": losses, "skipped": skipped,
           "s_per_step": seconds,
           "trainable": sum(s.numel for s in backend.shards())
           + sum(c.numel() for c in getattr(method, "C", {}).values()),
           "peak_rss_mb": peak_rss_mb(),
           "baseline_mb": baseline}
    if backend.device.type == "cuda":
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def report_ab(cfg, data, steps: int) -> None:
    print(f"\n(a) drift after {steps} steps at lr 0; (b) after 1 step at lr {cfg.method.lr}: "
          "share of elements whose stored value / master did not change")
    print("| method | dtype | masters | max abs drift | mean abs drift | stored unchanged | "
          "master unchanged |\n|---|---|---|---|---|---|---|")
    for method in ("mezo", "bszo"):
        for dtype in ("fp32", "bf16", "fp16"):
            for r in drift_and_lost(method, dtype, steps, data):
                master = f"{r['master_unchanged']:.1%}" if "master_unchanged" in r else "-"
                flag = " (skipped)" if r["skipped"] else ""
                print(f"| {method} | {dtype} | {r['masters']} | {r['drift_max']:.2e} | "
                      f"{r['drift_mean']:.2e} | {r['stored_unchanged']:.1%}{flag} | {master} |",
                      flush=True)


def report_cd(cfg, steps: int) -> None:
    print(f"\n(c) memory and (d) accuracy: {steps} steps, test accuracy on "
          f"{cfg.data.n_test} examples before -> after, one process each")
    print("| run | trainable elements | peak RSS, MB (imports only) | s/step | "
          "accuracy before -> after | finite losses |\n|---|---|---|---|---|---|")
    for label, overrides in RUNS.items():
        proc = subprocess.run([sys.executable, __file__, "--run-steps", str(steps),
                               "--one", *overrides], capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"| {label} | failed: {proc.stderr.strip().splitlines()[-1:]} |||||")
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        finite = sum(1 for v in r["losses"] if v == v)
        mem = f"{r['peak_rss_mb']:.0f} ({r['baseline_mb']:.0f})" + (
            f", GPU {r['gpu_peak_mb']:.0f}" if "gpu_peak_mb" in r else "")
        print(f"| {label} | {r['trainable']:,} | {mem} | {r['s_per_step']:.1f} | "
              f"{r['acc_before']:.3f} -> {r['acc_after']:.3f} | {finite}/{len(r['losses'])} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="(a): steps at lr 0")
    parser.add_argument("--run-steps", type=int, default=5, help="(c)/(d): steps of the run")
    parser.add_argument("--parts", default="ab,cd", help="ab: drift and lost updates; cd: memory "
                        "and accuracy runs")
    parser.add_argument("--one", nargs="*", help=argparse.SUPPRESS)  # child process of (c)/(d)
    args = parser.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(one_run(args.one, args.run_steps)))
        return

    from pipeline.config import load_config
    from pipeline.data.task_data import prepare
    from pipeline.models.loading import load_tokenizer

    started = time.perf_counter()
    cfg = load_config(JOB, SIZE)
    data = prepare(cfg.data, load_tokenizer(cfg.model.name_or_path))
    print(f"demo model {cfg.model.name_or_path}, {SIZE}")
    if "ab" in args.parts:
        report_ab(cfg, data, args.steps)
    if "cd" in args.parts:
        report_cd(cfg, args.run_steps)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
