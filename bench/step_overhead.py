"""ZO step cost against its forward passes.

Prints, for the demo model (or any job config) and each method given, ``step / forwards``: the
wall time of one ZO step divided by (forwards per step x the time of one forward on the same
batch). 1.0 means perturbing and updating cost nothing. (Training memory against inference
memory is bench/memory.py, whose baseline is inference as a user runs it.)

Each method runs in its own processes, after one warm-up step (the noise kernel compiles
there); forwards and steps are timed interleaved and the fastest of each is kept (this machine
is shared: the fastest run is the least disturbed one). ``--timing-json`` (one method, used by
bench/sharded_overhead.py under torchrun) times forward and step and, with several ranks,
counts the bytes one step sends beyond what its forwards' parameter gathers send as inference
does (:mod:`pipeline.parallel.comm_count`: inside the forwards too).

Usage: python bench/step_overhead.py [JOB.yaml] [key=value ...] [--methods mezo,bszo,...]
       [--cache-noise] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from pipeline.config import load_config
from pipeline.parallel.comm_count import beyond_forwards, recording, summary
from pipeline.train import build
from pipeline.zo.methods import METHODS, StepContext

# ZO-Act's first steps calibrate its basis; one calibration batch makes the timed steps real ones
METHOD_OVERRIDES = {"zoact": ["method.zoact_calib_batches=1"]}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _setup(args):
    cfg = load_config(args.job, args.overrides)
    backend, method, data = build(cfg)
    batch = data.train_batch(0, cfg.train.batch_size, cfg.train.seed, backend.rank,
                             backend.world_size)
    return cfg, backend, method, batch


def _time(fn, device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        _sync(device)
        tic = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - tic)
    return out


def timing(args) -> None:
    """Rank 0 prints one JSON line: forward and step medians, forwards, communication."""
    cfg, backend, method, batch = _setup(args)
    device = backend.device
    steps = iter(range(10**9))
    stats = []

    def one_step():
        stats.append(method.step(StepContext(next(steps), cfg.train.seed, cfg.method.lr, batch,
                                             backend)))

    backend.loss(batch)
    one_step()  # warm-up: compiles the noise kernel, ZO-Act calibrates
    fwd, step = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same load on a shared machine
        fwd += _time(lambda: backend.loss(batch), device, 1)
        step += _time(one_step, device, 1)
    comm = {}
    if backend.world_size > 1:  # the backend has settled: the timed forwards and steps ran
        with recording() as forward:
            backend.loss(batch)
        with recording() as calls:
            one_step()
        extra, _ = beyond_forwards(calls, forward, stats[-1].forwards)
        comm = summary(extra, forward, stats[-1].forwards)
    if backend.rank == 0:
        print(json.dumps({"forward": min(fwd), "step": min(step),
                          "forwards": stats[-1].forwards, "world_size": backend.world_size,
                          "trainable": sum(s.total for s in backend.shards()),
                          "threads": torch.get_num_threads(), "device": str(device), **comm}))
    backend.close()


def _child(args, method: str, extra: list[str], flags: list[str]) -> dict:
    overrides = [*args.overrides, f"method.name={method}", *METHOD_OVERRIDES.get(method, []),
                 *extra]
    out = subprocess.run([sys.executable, __file__, args.job, *overrides, "--repeats",
                          str(args.repeats), *flags], check=True, capture_output=True, text=True)
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", default="jobs/demo.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="mezo",
                        help=f"comma-separated, or 'all' ({','.join(METHODS)})")
    parser.add_argument("--cache-noise", action="store_true",
                        help="also a MeZO row with method.cache_noise=true")
    parser.add_argument("--timing-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timing_json:
        timing(args)
        return

    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    rows = [(m, m, []) for m in methods]
    if args.cache_noise:
        rows.append(("mezo+cache", "mezo", ["method.cache_noise=true"]))
    print(f"{'method':11s} {'fwd/step':>8s} {'forward ms':>10s} {'step ms':>9s} "
          f"{'step/fwds':>9s}", flush=True)
    for label, method, extra in rows:
        t = _child(args, method, extra, ["--timing-json"])
        print(f"{label:11s} {t['forwards']:8d} {t['forward'] * 1e3:10.1f} "
              f"{t['step'] * 1e3:9.1f} {t['step'] / (t['forwards'] * t['forward']):9.2f}",
              flush=True)
    print(f"(job {args.job} {' '.join(args.overrides)}; {t['trainable']:,} trainable, "
          f"{t['threads']} threads, device {t['device']}; fastest of {args.repeats} forwards and "
          "steps, interleaved)")


if __name__ == "__main__":
    main()
