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
does (:mod:`pipeline.parallel.comm_count`: inside the forwards too), and the parameter gathers
themselves: how many plain forwards' worth of them a step ran (``model_gathers``: 1 with
``train.fused_evaluations``), and their bytes received per rank over the trainable bytes.

``--fused-both`` times every step twice, with one forward per evaluation and with the step's
evaluations fused into one forward of the repeated batch (``train.fused_evaluations``),
interleaved in the same process.

Usage: python bench/step_overhead.py [JOB.yaml] [key=value ...] [--methods mezo,bszo,...]
       [--cache-noise] [--fused-both] [--repeats 3]
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


def _gathered(calls: list[dict]) -> int:
    return sum(c["bytes"] for c in calls if c["op"].startswith("all_gather"))


def _evaluation_modes(args, backend) -> dict:
    """``{label: the backend's fused evaluator or None}``: the configured mode, or with
    ``--fused-both`` sequential and fused steps of the same process (the bench switches the
    backend's evaluator between them)."""
    fused = getattr(backend, "_fused", None)
    if not args.fused_both:
        return {"fused" if fused is not None else "sequential": fused}
    if fused is None:
        raise SystemExit("--fused-both needs train.fused_evaluations=true (and no fp32 masters "
                         "on a sharded backend)")
    return {"sequential": None, "fused": fused}


def timing(args) -> None:
    """Rank 0 prints one JSON line: the fastest forward, and per evaluation mode the fastest
    step and its communication."""
    cfg, backend, method, batch = _setup(args)
    device = backend.device
    steps = iter(range(10**9))
    stats = []

    def one_step():
        stats.append(method.step(StepContext(next(steps), cfg.train.seed, cfg.method.lr, batch,
                                             backend)))

    modes = _evaluation_modes(args, backend)
    backend.loss(batch)
    for evaluator in modes.values():  # warm-up: compiles the noise kernel, ZO-Act calibrates
        backend._fused = evaluator
        one_step()
    fwd, step = [], {mode: [] for mode in modes}
    for _ in range(args.repeats):  # interleaved, so all see the same load on a shared machine
        fwd += _time(lambda: backend.loss(batch), device, 1)
        for mode, evaluator in modes.items():
            backend._fused = evaluator
            step[mode] += _time(one_step, device, 1)
    out = {mode: {"step": min(times)} for mode, times in step.items()}
    if backend.world_size > 1:  # the backend has settled: the timed forwards and steps ran
        with recording() as forward:
            backend.loss(batch)
        for mode, evaluator in modes.items():
            backend._fused = evaluator
            with recording() as calls:
                one_step()
            extra, _ = beyond_forwards(calls, forward, stats[-1].forwards)
            out[mode].update(summary(extra, forward, stats[-1].forwards))
            # the parameter gathers: how many times a step moves the model into every rank
            trainable = sum(s.total * s.local.element_size() for s in backend.shards())
            gathered = _gathered(calls) - _gathered(extra)
            out[mode].update(model_gathers=gathered / _gathered(forward),
                             gathered_per_trainable=backend.world_size * gathered / trainable)
    if backend.rank == 0:
        print(json.dumps({"forward": min(fwd), "modes": out,
                          "forwards": stats[-1].forwards, "world_size": backend.world_size,
                          "trainable": sum(s.total for s in backend.shards()),
                          "threads": torch.get_num_threads(), "device": str(device)}))
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
    parser.add_argument("--fused-both", action="store_true",
                        help="time each step with sequential and with fused evaluations, "
                        "interleaved in one process (train.fused_evaluations=true is set)")
    parser.add_argument("--timing-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timing_json:
        timing(args)
        return

    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    rows = [(m, m, []) for m in methods]
    if args.cache_noise:
        rows.append(("mezo+cache", "mezo", ["method.cache_noise=true"]))
    print(f"{'method':16s} {'fwd/step':>8s} {'forward ms':>10s} {'step ms':>9s} "
          f"{'step/fwds':>9s}", flush=True)
    flags = ["--timing-json"]
    if args.fused_both:
        flags.append("--fused-both")
        rows = [(label, method, [*extra, "train.fused_evaluations=true"])
                for label, method, extra in rows]
    for label, method, extra in rows:
        t = _child(args, method, extra, flags)
        for mode, m in t["modes"].items():
            name = f"{label} {mode}" if args.fused_both else label
            print(f"{name:16s} {t['forwards']:8d} {t['forward'] * 1e3:10.1f} "
                  f"{m['step'] * 1e3:9.1f} {m['step'] / (t['forwards'] * t['forward']):9.2f}",
                  flush=True)
    print(f"(job {args.job} {' '.join(args.overrides)}; {t['trainable']:,} trainable, "
          f"{t['threads']} threads, device {t['device']}; fastest of {args.repeats} forwards and "
          "steps, interleaved)")


if __name__ == "__main__":
    main()
