"""ZO step cost against its forward passes, and training memory against inference memory.

Prints, for the demo model (or any job config) and each method given, side by side:

- ``step / forwards``: the wall time of one ZO step divided by (forwards per step x the time of
  one forward on the same batch). 1.0 means perturbing, restoring and updating cost nothing.
- ``train / inference peak``: the peak memory (CPU: ru_maxrss; GPU: max_memory_allocated) of a
  process that runs training steps, divided by that of a process that runs only forwards on
  the same batch, each in its own fresh process; on CPU also the peak RSS sampled during the
  loop alone, after one warm-up step (model loading can peak higher than the loop).

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
import resource
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


def _peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _setup(args):
    cfg = load_config(args.job, args.overrides)
    backend, method, data = build(cfg)
    batch = data.train_batch(0, cfg.train.batch_size, cfg.train.seed, backend.rank,
                             backend.world_size)
    return cfg, backend, method, batch


def measure_memory(args, mode: str) -> None:
    """Peak memory of the whole process, and (CPU) the peak RSS sampled during the loop alone."""
    import threading

    import psutil

    cfg, backend, method, batch = _setup(args)
    steps = iter(range(10**9))

    def run():
        if mode == "train":
            method.step(StepContext(next(steps), cfg.train.seed, cfg.method.lr, batch, backend))
        else:
            backend.loss(batch)

    run()  # warm-up (compiles the noise kernel)
    proc, loop_peak, running = psutil.Process(), [0], [True]

    def sample() -> None:
        while running[0]:
            loop_peak[0] = max(loop_peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(args.repeats):
        run()
    running[0] = False
    sampler.join()
    print(json.dumps({"peak_bytes": _peak_bytes(backend.device), "loop_peak_bytes": loop_peak[0]}))


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
    parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    parser.add_argument("--memory-mode", choices=["train", "inference"], help=argparse.SUPPRESS)
    parser.add_argument("--timing-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_mode:
        measure_memory(args, args.memory_mode)
        return
    if args.timing_json:
        timing(args)
        return

    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    rows = [(m, m, []) for m in methods]
    if args.cache_noise:
        rows.append(("mezo+cache", "mezo", ["method.cache_noise=true"]))
    print(f"{'method':11s} {'fwd/step':>8s} {'forward ms':>10s} {'step ms':>9s} "
          f"{'step/fwds':>9s} {'mem train/inf':>13s} {'loop train/inf':>14s}", flush=True)
    inference = None
    for label, method, extra in rows:
        t = _child(args, method, extra, ["--timing-json"])
        mem = loop = "-"
        if not args.no_memory:
            if inference is None:
                inference = _child(args, "mezo", [], ["--memory-mode", "inference"])
            train = _child(args, method, extra, ["--memory-mode", "train"])
            mem = f"{train['peak_bytes'] / inference['peak_bytes']:.2f}"
            loop = (f"{train['loop_peak_bytes'] / 2**20:.0f}/"
                    f"{inference['loop_peak_bytes'] / 2**20:.0f}MiB "
                    f"{train['loop_peak_bytes'] / inference['loop_peak_bytes']:.2f}")
        print(f"{label:11s} {t['forwards']:8d} {t['forward'] * 1e3:10.1f} "
              f"{t['step'] * 1e3:9.1f} {t['step'] / (t['forwards'] * t['forward']):9.2f} "
              f"{mem:>13s} {loop:>14s}", flush=True)
    print(f"(job {args.job} {' '.join(args.overrides)}; {t['trainable']:,} trainable, "
          f"{t['threads']} threads, device {t['device']}; fastest of {args.repeats} forwards and "
          "steps, interleaved)")


if __name__ == "__main__":
    main()
