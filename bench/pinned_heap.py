"""Step time with and without glibc's mmap threshold pinned (what CPU training does after
loading, :func:`pipeline.heap.pin_mmap_threshold`).

Each measurement is a fresh process: load the job's model and method, one warm-up step, then
(pinned or not) ``--steps`` timed steps. The two kinds alternate, ``--pairs`` times, and the
medians are printed with their ratio.

Usage: python bench/pinned_heap.py [JOB.yaml] [key=value ...] [--pairs 3] [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def child(job: str, overrides: list[str], steps: int, pin: bool) -> None:
    import torch

    from pipeline.config import load_config
    from pipeline.data.task_data import prepare
    from pipeline.heap import pin_mmap_threshold
    from pipeline.models.loading import load_tokenizer
    from pipeline.parallel import build_backend
    from pipeline.zo.methods import StepContext, build_method

    cfg = load_config(job, ["tracking.enabled=false", *overrides])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = prepare(cfg.data, load_tokenizer(cfg.model.name_or_path))
    backend = build_backend(cfg)
    method = build_method(cfg, backend.shards())
    batch = data.train_batch(0, cfg.train.batch_size, cfg.train.seed, 0, 1)

    def step(s: int) -> None:
        method.step(StepContext(s, cfg.train.seed, cfg.method.lr, batch, backend))

    step(0)
    if pin:
        pin_mmap_threshold()
    start = time.perf_counter()
    for s in range(1, steps + 1):
        step(s)
    print(time.perf_counter() - start, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", nargs="?", default="jobs/demo.yaml")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--child", choices=["pin", "default"])
    args = ap.parse_args()
    if args.child:
        child(args.job, args.overrides, args.steps, args.child == "pin")
        return
    times: dict[str, list[float]] = {"default": [], "pin": []}
    for i in range(args.pairs):
        for kind in ("default", "pin"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--steps",
                                  str(args.steps), args.job, *args.overrides],
                                 capture_output=True, text=True, check=True)
            times[kind].append(float(out.stdout.split()[-1]))
            print(f"pair {i + 1}: {kind} {times[kind][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.steps} steps, median: default {med['default']:.2f} s, pinned {med['pin']:.2f} s,"
          f" pinned / default {med['pin'] / med['default']:.3f}")


if __name__ == "__main__":
    main()
