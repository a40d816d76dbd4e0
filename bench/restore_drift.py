"""Restore drift: how far the weights move after N MeZO steps with learning rate 0.

MeZO restores ``θ + εz - 2εz + εz`` in floating point, which is not exactly ``θ``. With fp32
masters (``precision.master_weights=fp32``) the stored weights are rewritten from the master and
the drift is exactly 0. Prints max and mean |θ_after - θ_before| per dtype, with and without
masters, on the demo model (or any job).

Usage: python bench/restore_drift.py [JOB.yaml] [key=value ...] [--steps 5]
"""

from __future__ import annotations

import argparse

import torch

from pipeline.config import load_config
from pipeline.train import build
from pipeline.zo.methods import StepContext


def drift(job: str, overrides: list[str], steps: int) -> tuple[float, float]:
    cfg = load_config(job, overrides)
    backend, method, data = build(cfg)
    before = [s.local.detach().float().clone() for s in backend.shards()]
    batch = data.train_batch(0, cfg.train.batch_size, cfg.train.seed)
    for step in range(steps):
        method.step(StepContext(step, cfg.train.seed, 0.0, batch, backend))
    diffs = [(s.local.float() - b).abs() for s, b in zip(backend.shards(), before)]
    total = sum(d.numel() for d in diffs)
    return max(d.max().item() for d in diffs), sum(d.sum().item() for d in diffs) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", default="jobs/demo.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    print(f"{'dtype':6s} {'masters':8s} {'max |Δθ|':>12s} {'mean |Δθ|':>12s}  after "
          f"{args.steps} steps at lr 0")
    for dtype in args.dtypes.split(","):
        for master in ("none", "fp32"):
            extra = [f"model.dtype={dtype}", f"precision.master_weights={master}"]
            mx, mean = drift(args.job, [*args.overrides, *extra], args.steps)
            print(f"{dtype:6s} {master:8s} {mx:12.3e} {mean:12.3e}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
