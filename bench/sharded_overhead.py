"""ZO step / forward-pass time per backend and method, world size 1 and N, side by side.

Each (backend, method) runs ``bench/step_overhead.py --timing-json`` in fresh processes (under
torchrun for fsdp / zero3). The table prints the median forward and step times, their ratio
(step / (forwards x forward)), the step time against the single-process one (scaling), and what
one step sends through torch.distributed beyond its forwards' parameter gathers (calls, bytes;
the gathers themselves are what inference pays too). On this 2-core CPU each rank gets one
thread, so sharding gives no speed-up: compare the ratios. Every backend times its steps with
one forward per evaluation and with fused evaluations (``train.fused_evaluations``), interleaved
in the same processes (``fused`` column: bench/step_overhead.py --fused-both); the last columns
say how many plain forwards' worth of parameter gathers a step ran and the bytes gathered into a
rank per step over the trainable bytes.

Usage: python bench/sharded_overhead.py [JOB.yaml] [key=value ...] [--methods mezo,...]
       [--backends fsdp,zero3] [--nproc-per-node 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pipeline.zo.methods import METHODS

SCRIPT = Path(__file__).with_name("step_overhead.py")
METHOD_OVERRIDES = {"zoact": ["method.zoact_calib_batches=1"]}


def measure(args, backend: str, method: str, nproc: int) -> dict:
    cmd = [str(SCRIPT), args.job, *args.overrides, f"parallel.backend={backend}",
           "train.fused_evaluations=true",
           "train.threads=1", "tracking.enabled=false", f"method.name={method}",
           *METHOD_OVERRIDES.get(method, []), "--repeats", str(args.repeats), "--timing-json",
           "--fused-both"]
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
    parser.add_argument("--methods", default="mezo",
                        help=f"comma-separated, or 'all' ({','.join(METHODS)})")
    args = parser.parse_args()
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    backends = [("single", 1)] + [(b, args.nproc_per_node) for b in args.backends.split(",")]
    print(f"{'method':8s} {'backend':8s} {'ranks':>5s} {'fused':>5s} {'forward ms':>11s} "
          f"{'step ms':>9s} {'step/fwds':>9s} {'step vs ws1':>11s} "
          f"{'step comm (calls, bytes)':>25s} {'gathers':>7s} {'gathered/model':>14s}",
          flush=True)
    for method in methods:
        single = None
        for backend, n in backends:
            r = measure(args, backend, method, n)
            for mode, m in r["modes"].items():
                single = single or m
                ratio = m["step"] / (r["forwards"] * r["forward"])
                comm = (f"{m['step_calls']} calls, {m['step_bytes']} B" if "step_calls" in m
                        else "-")
                gathers = f"{m['model_gathers']:.2f}" if "model_gathers" in m else "-"
                model = (f"{m['gathered_per_trainable']:.2f}" if "model_gathers" in m
                         else "-")
                print(f"{method:8s} {backend:8s} {r['world_size']:5d} "
                      f"{str(mode == 'fused').lower():>5s} {r['forward'] * 1e3:11.1f} "
                      f"{m['step'] * 1e3:9.1f} {ratio:9.2f} {m['step'] / single['step']:11.2f} "
                      f"{comm:>25s} {gathers:>7s} {model:>14s}", flush=True)
    print("(1 thread per rank; step comm excludes the parameter gathers inside forwards; "
          "gathers: plain forwards' worth of parameter gathers per step; gathered/model: bytes "
          "all-gathered into a rank per step / trainable bytes; step vs ws1: against the "
          "single-process sequential step)")


if __name__ == "__main__":
    main()
