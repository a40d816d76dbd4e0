"""Training peak memory against inference peak memory, per backend, dtype and method.

The baseline is inference as a user runs it: the same model in the storage dtype, loaded as
transformers loads it (single) or sharded by the same backend (fsdp, zero3), no master copy and
no method state, running forwards on the same batch. Each figure is a fresh process (a torchrun
of 2 ranks for fsdp and zero3; the peak of the larger rank), measured over the loop alone: after
loading and one warm-up forward or step (which compiles the noise kernels, calibrates ZO-Act,
runs P-GAP's first refresh), the peak is reset and ``--steps`` more run.

- CPU: the peak resident set of the loop, ``VmHWM`` after resetting it (``/proc/self/clear_refs``,
  Linux) before the loop;
- GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

P-GAP is measured with ``pgap_refresh_every=1`` so every measured step refreshes (its peak);
ZO-Act with one calibration batch (calibration is the warm-up step). Each method runs with the
method section of its demo recipe (``jobs/<method>.yaml``) on the model, data and batch of
``jobs/demo.yaml``, so every row has the same baseline. ZO-Adam and ZO-SGD momentum keep fp32
moments of every trainable element: their rows show the bytes those add per rank.

Usage: python bench/memory.py [JOB.yaml] [key=value ...] [--backends single,fsdp,zero3]
       [--dtypes bf16,fp16] [--methods all] [--steps 2] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["mezo", "bszo", "lozo", "agzo", "pgap", "zoact", "zo_adam", "zo_sgd_mmt"]
MOMENT_BYTES = {"zo_adam": 8, "zo_sgd_mmt": 4}  # fp32 state per trainable element
EXTRA = {"pgap": ["method.pgap_refresh_every=1"], "zoact": ["method.zoact_calib_batches=1"]}


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def _peak(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(mode: str, job: str, overrides: list[str], steps: int) -> None:
    """One process (or rank): the loop's peak, printed as one JSON line."""
    from pipeline.data.task_data import prepare
    from pipeline.models.loading import load_tokenizer
    from pipeline.zo.methods import StepContext

    cfg = load_config(job, overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = prepare(cfg.data, load_tokenizer(cfg.model.name_or_path))
    if mode == "inference" and cfg.parallel.backend == "single":
        from pipeline.models.loading import load_model, resolve_device
        from pipeline.models.objective import batch_loss

        device = resolve_device(cfg.model.device)
        model = load_model(cfg.model, device)
        rank, world = 0, 1

        def run(_step: int) -> None:
            with torch.no_grad():
                batch_loss(model, batch.to(device))
    else:
        from pipeline.parallel import build_backend
        from pipeline.train import build_model

        # training builds as `zopipe train` does (on CPU that pins glibc's mmap threshold);
        # sharded inference is the backend alone, as a user's would be
        backend, method = build_model(cfg) if mode == "train" else (build_backend(cfg), None)
        device, rank, world = backend.device, backend.rank, backend.world_size

        def run(step: int) -> None:
            if method is None:
                backend.loss(batch)
            else:
                method.step(StepContext(step, cfg.train.seed, cfg.method.lr, batch, backend))
    batch = data.train_batch(0, cfg.train.batch_size, cfg.train.seed, rank, world)
    run(0)
    _reset_peak(device)
    for step in range(1, steps + 1):
        run(step)
    print(json.dumps({"rank": rank, "peak": _peak(device), "world": world}), flush=True)


def _method_overrides(method: str) -> list[str]:
    """The method section of ``jobs/<method>.yaml`` (or just the name), as overrides."""
    recipe = ROOT / "jobs" / f"{method}.yaml"
    section = {"name": method}
    if recipe.is_file():
        section.update(yaml.safe_load(recipe.read_text()).get("method", {}))
    return [f"method.{k}={json.dumps(v) if isinstance(v, (list, bool)) else v}"
            for k, v in section.items()] + EXTRA.get(method, [])


class RowFailed(RuntimeError):
    """One measurement's process failed (its stderr went to ours); the table goes on."""


def _measure(args, mode: str, backend: str, dtype: str, extra: list[str]) -> int:
    nproc = 1 if backend == "single" else args.nproc
    threads = 2 if nproc == 1 else 1
    # the method's recipe section first, so a command-line override (method.pgap_rank=16) wins
    overrides = [*extra, *args.overrides, f"parallel.backend={backend}", f"model.dtype={dtype}",
                 f"train.threads={threads}", "tracking.enabled=false"]
    cmd = [__file__, "--child", mode, "--steps", str(args.steps), args.job, *overrides]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd]
    out = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        print(f"{mode} {backend} {dtype} {' '.join(extra)} failed:\n{out.stderr[-3000:]}",
              file=sys.stderr, flush=True)
        raise RowFailed(lines[-1][:200] if lines else f"exit status {out.returncode}")
    peaks = [json.loads(ln)["peak"] for ln in out.stdout.splitlines() if ln.startswith("{")]
    return max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", default="jobs/demo.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--backends", default="single,fsdp,zero3")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--methods", default="all", help=f"comma-separated, or all ({METHODS})")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--child", choices=["train", "inference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.job, args.overrides, args.steps)
        return
    methods = METHODS if args.methods == "all" else args.methods.split(",")
    trainable = sum(p.numel() for p in _meta_params(args))
    print("| backend | dtype | method | train peak (MiB) | inference peak (MiB) "
          "| train / inference | note |")
    print("|---|---|---|---|---|---|---|", flush=True)
    failed = 0
    for backend in args.backends.split(","):
        ranks = 1 if backend == "single" else args.nproc
        for dtype in args.dtypes.split(","):
            try:
                base = _measure(args, "inference", backend, dtype, [])
            except RowFailed as exc:
                print(f"| {backend} | {dtype} | (inference) | - | - | - | failed: {exc} |",
                      flush=True)
                failed += 1
                continue
            for method in methods:
                try:
                    peak = _measure(args, "train", backend, dtype, _method_overrides(method))
                except RowFailed as exc:
                    print(f"| {backend} | {dtype} | {method} | - | {base / 2**20:.0f} | - | "
                          f"failed: {exc} |", flush=True)
                    failed += 1
                    continue
                note = ""
                if method in MOMENT_BYTES:
                    moments = MOMENT_BYTES[method] * trainable / ranks
                    note = (f"fp32 moments {moments / 2**20:.0f} MiB/rank: inference + moments "
                            f"= {(base + moments) / 2**20:.0f} MiB")
                print(f"| {backend} | {dtype} | {method} | {peak / 2**20:.0f} | "
                      f"{base / 2**20:.0f} | {peak / base:.3f} | {note} |", flush=True)
    print(f"\n(job {args.job} {' '.join(args.overrides)}; loop peaks over {args.steps} steps or "
          f"forwards after a warm-up one; fsdp/zero3 on {args.nproc} ranks, 1 thread each)")
    if failed:
        raise SystemExit(f"{failed} measurement(s) failed: their errors are above")


def _meta_params(args):
    from pipeline.models.meta import meta_model

    cfg = load_config(args.job, args.overrides)
    if cfg.model.config_for_planning is None:
        from transformers import AutoConfig, AutoModelForCausalLM

        from pipeline.models.loading import model_path

        config = AutoConfig.from_pretrained(model_path(cfg.model.name_or_path))
        with torch.device("meta"):
            return list(AutoModelForCausalLM.from_config(config).parameters())
    return list(meta_model(cfg.model).parameters())


if __name__ == "__main__":
    main()
