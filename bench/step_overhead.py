"""ZO step cost against its forward passes, and training memory against inference memory.

Prints, for the demo model (or any job config):

- ``step / forwards``: the wall time of one ZO step divided by (forwards per step x the time of
  one forward on the same batch). 1.0 means perturbing, restoring and updating cost nothing.
- ``train peak / inference peak``: the peak memory (CPU: ru_maxrss; GPU: max_memory_allocated)
  of a process that runs training steps, divided by that of a process that runs only forwards on
  the same batch, each in its own fresh process; on CPU also the peak RSS sampled during the
  loop alone (model loading can peak higher than the loop).

Usage: python bench/step_overhead.py [JOB.yaml] [key=value ...] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from pipeline.config import load_config
from pipeline.train import build
from pipeline.zo.methods import StepContext


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
    batch = data.train_batch(0, cfg.train.batch_size, cfg.train.seed)
    return cfg, backend, method, batch


def measure_memory(args, mode: str) -> None:
    """Peak memory of the whole process, and (CPU) the peak RSS sampled during the loop alone:
    loading the model can peak higher than running it, which would hide the loop's cost."""
    import threading

    import psutil

    cfg, backend, method, batch = _setup(args)
    proc, loop_peak, running = psutil.Process(), [0], [True]

    def sample() -> None:
        while running[0]:
            loop_peak[0] = max(loop_peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for step in range(args.repeats):
        if mode == "train":
            method.step(StepContext(step, cfg.train.seed, cfg.method.lr, batch, backend))
        else:
            backend.loss(batch)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", default="jobs/demo.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-mode", choices=["train", "inference"], help=argparse.SUPPRESS)
    parser.add_argument("--timing-json", action="store_true",
                        help="Only time forward and step; rank 0 prints one JSON line (used by "
                             "bench/sharded_overhead.py under torchrun).")
    args = parser.parse_args()
    if args.memory_mode:
        measure_memory(args, args.memory_mode)
        return

    cfg, backend, method, batch = _setup(args)
    device = backend.device
    backend.loss(batch)  # warm-up
    steps = iter(range(10**9))
    fwd = _time(lambda: backend.loss(batch), device, args.repeats)
    stats = []

    def one_step():
        stats.append(method.step(StepContext(next(steps), cfg.train.seed, cfg.method.lr, batch,
                                             backend)))

    step = _time(one_step, device, args.repeats)
    forwards = stats[-1].forwards
    f, s = statistics.median(fwd), statistics.median(step)
    trainable = sum(sh.numel for sh in backend.shards())
    if args.timing_json:
        if backend.rank == 0:
            print(json.dumps({"forward": f, "step": s, "forwards": forwards,
                              "world_size": backend.world_size}))
        backend.close()
        return

    peaks = {}
    for mode in ("inference", "train"):
        out = subprocess.run(
            [sys.executable, __file__, args.job, *args.overrides, "--repeats", "2",
             "--memory-mode", mode],
            check=True, capture_output=True, text=True,
        )
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])

    print(f"model {cfg.model.name_or_path} ({cfg.model.dtype}), method {cfg.method.name}, "
          f"trainable {trainable:,} parameters, batch {cfg.train.batch_size}, "
          f"{torch.get_num_threads()} threads, device {device}")
    print(f"forward        {f * 1e3:9.1f} ms (median of {args.repeats})")
    print(f"step           {s * 1e3:9.1f} ms ({forwards} forwards)")
    print(f"step / forwards          {s / (forwards * f):6.2f}")
    inf, tr = peaks["inference"], peaks["train"]
    print(f"peak memory (process)  inference {inf['peak_bytes'] / 2**20:7.0f} MiB, training "
          f"{tr['peak_bytes'] / 2**20:7.0f} MiB, ratio {tr['peak_bytes'] / inf['peak_bytes']:.2f}")
    if device.type == "cpu":
        print(f"peak RSS during the loop inference {inf['loop_peak_bytes'] / 2**20:7.0f} MiB, "
              f"training {tr['loop_peak_bytes'] / 2**20:7.0f} MiB, ratio "
              f"{tr['loop_peak_bytes'] / inf['loop_peak_bytes']:.2f}")


if __name__ == "__main__":
    main()
