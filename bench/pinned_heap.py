"""Step time with and without glibc's mmap threshold pinned (what CPU training does after
loading, :func:`pipeline.heap.pin_mmap_threshold`).

Each measurement is a fresh process: load the job's model and method, one warm-up step, then
(pinned at a threshold, or glibc's default) ``--steps`` timed steps. The kinds (default, then
each of ``--thresholds``) alternate, ``--pairs`` times, and the medians are printed with their
ratios to the default, beside the minor page faults and system time per step (what a pinned
threshold costs: each mapped block is faulted in afresh; these do not depend on the machine's
load as the wall time does).

Usage: python bench/pinned_heap.py [JOB.yaml] [key=value ...] [--pairs 3] [--steps 4]
       [--thresholds 262144,8388608]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

from pipeline.heap import MMAP_THRESHOLD


def child(job: str, overrides: list[str], steps: int, threshold: int) -> None:
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
    if threshold:
        pin_mmap_threshold(threshold)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for s in range(1, steps + 1):
        step(s)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    print(wall, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", nargs="?", default="jobs/demo.yaml")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--thresholds", default=str(MMAP_THRESHOLD),
                    help="comma-separated byte counts to pin at (the default: what training pins)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)  # threshold, 0: glibc's default
    args = ap.parse_args()
    if args.child is not None:
        child(args.job, args.overrides, args.steps, args.child)
        return
    kinds = [0, *(int(t) for t in args.thresholds.split(","))]
    rows: dict[int, list[tuple[float, ...]]] = {k: [] for k in kinds}
    for i in range(args.pairs):
        for kind in kinds:
            out = subprocess.run([sys.executable, __file__, "--child", str(kind), "--steps",
                                  str(args.steps), args.job, *args.overrides],
                                 capture_output=True, text=True, check=True)
            wall, faults, system = map(float, out.stdout.split()[-3:])
            rows[kind].append((wall, faults, system))
            print(f"round {i + 1}: {_name(kind)} {wall:.2f} s, {faults / args.steps:.0f} minor"
                  f" page faults and {system / args.steps:.2f} s system time per step", flush=True)
    med = {k: [statistics.median(col) for col in zip(*v)] for k, v in rows.items()}
    print(f"{args.steps} steps, medians: default {med[0][0]:.2f} s"
          f" ({med[0][1] / args.steps:.0f} faults, {med[0][2] / args.steps:.2f} s system per step)")
    for kind in kinds[1:]:
        wall, faults, system = med[kind]
        print(f"  {_name(kind)}: {wall:.2f} s, {wall / med[0][0]:.3f}x the default"
              f" ({faults / args.steps:.0f} faults, {system / args.steps:.2f} s system per step)")


def _name(threshold: int) -> str:
    return f"pinned at {threshold // 1024} KiB" if threshold else "default"


if __name__ == "__main__":
    main()
