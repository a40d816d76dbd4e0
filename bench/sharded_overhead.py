"""ZO step / forward-pass time for each backend, single process and N ranks, side by side.

Each backend runs ``bench/step_overhead.py --timing-json`` (under torchrun for the sharded
ones); the table prints the median forward time, step time and their ratio. On this 2-core CPU
sharding gives no speed-up (each rank gets one thread): the ratio is what to compare.

Usage: python bench/sharded_overhead.py [JOB.yaml] [key=value ...] [--nproc-per-node 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("step_overhead.py")


def measure(job: str, overrides: list[str], backend: str, nproc: int, repeats: int) -> dict:
    cmd = [str(SCRIPT), job, *overrides, f"parallel.backend={backend}", "train.threads=1",
           "tracking.enabled=false", "--repeats", str(repeats), "--timing-json"]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd]
    out = subprocess.run([sys.executable, *cmd], check=True, capture_output=True, text=True)
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", default="jobs/demo.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--nproc-per-node", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="fsdp,zero3")
    args = parser.parse_args()
    rows = [("single", 1)] + [(b, args.nproc_per_node) for b in args.backends.split(",")]
    print(f"{'backend':8s} {'ranks':>5s} {'forward ms':>11s} {'step ms':>9s} "
          f"{'step/forwards':>14s}   (1 thread per rank)")
    for backend, n in rows:
        r = measure(args.job, args.overrides, backend, n, args.repeats)
        ratio = r["step"] / (r["forwards"] * r["forward"])
        print(f"{backend:8s} {r['world_size']:5d} {r['forward'] * 1e3:11.1f} "
              f"{r['step'] * 1e3:9.1f} {ratio:14.2f}")


if __name__ == "__main__":
    main()
