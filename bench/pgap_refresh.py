"""P-GAP's refresh cost against its normal step (and MeZO's step), on the demo model.

Prints the wall time of: one forward; one P-GAP refresh (R1-R3: 2q probe forwards, then per 2-D
weight the fp32 estimate Ĝ and its randomized range finder), split into the probe phase and the
fit; one normal P-GAP step (2 forwards along Δ = U Z Vᵀ); one MeZO step on the same batch. The
refresh's cost per step, amortized over ``pgap_refresh_every`` steps, is refresh / T.

Usage: python bench/pgap_refresh.py [JOB.yaml] [key=value ...] [--steps 2]
(default job: jobs/pgap.yaml, the demo model)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.config import load_config
from pipeline.train import build
from pipeline.zo.methods import StepContext
from pipeline.zo.methods.mezo import MeZO


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", default="jobs/pgap.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=2, help="normal steps timed (median)")
    args = parser.parse_args()
    if "=" in args.job:  # only overrides were given
        args.job, args.overrides = "jobs/pgap.yaml", [args.job, *args.overrides]
    cfg = load_config(args.job, ["method.name=pgap", "method.lr=0", *args.overrides])
    backend, pgap, data = build(cfg)
    device = backend.device
    batch = data.train_batch(0, cfg.train.batch_size, cfg.train.seed, backend.rank,
                             backend.world_size)
    seed = cfg.train.seed

    def timed(fn) -> float:
        _sync(device)
        tic = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - tic

    forward = timed(lambda: backend.loss(batch))  # warm-up
    forward = statistics.median(timed(lambda: backend.loss(batch)) for _ in range(2))
    fit_time = [0.0]
    fit = pgap.fit

    def timed_fit(*a):
        fit_time[0] = timed(lambda: fit(*a))

    pgap.fit = timed_fit
    refresh = timed(lambda: pgap.refresh(StepContext(0, seed, 0.0, batch, backend)))
    normal = statistics.median(
        timed(lambda t=t: pgap.step(StepContext(t, seed, 0.0, batch, backend)))
        for t in range(1, 1 + args.steps))
    mezo = MeZO(cfg.method, pgap.shards)
    mezo_step = statistics.median(
        timed(lambda t=t: mezo.step(StepContext(t, seed, 0.0, batch, backend)))
        for t in range(1, 1 + args.steps))
    m = cfg.method
    matrices = sum(1 for s in pgap.shards if len(s.shape) == 2)
    n = sum(s.total for s in pgap.shards)
    print(f"{n / 1e6:.1f}M trainable, {matrices} matrices, q={m.pgap_q}, r={m.pgap_rank}, "
          f"power_iters={m.pgap_power_iters}, T={m.pgap_refresh_every}, batch "
          f"{cfg.train.batch_size}, {device}, {torch.get_num_threads()} threads, world "
          f"{backend.world_size}")
    rows = [
        ("forward", forward),
        (f"refresh (R1-R3, {2 * m.pgap_q} forwards)", refresh),
        ("  probes (forwards + 3q regenerations)", refresh - fit_time[0]),
        ("  fit (Ĝ per layer + range finder)", fit_time[0]),
        ("P-GAP normal step (2 forwards)", normal),
        ("MeZO step (2 forwards)", mezo_step),
    ]
    for name, sec in rows:
        print(f"{name:44s} {sec * 1e3:10.0f} ms")
    print(f"refresh / normal step                        {refresh / normal:10.2f}")
    amortized = refresh / m.pgap_refresh_every
    print(f"refresh amortized over T, per step           {amortized * 1e3:10.0f} ms "
          f"({amortized / normal:.1%} of a normal step)")
    print(f"P-GAP normal step / MeZO step                {normal / mezo_step:10.2f}")
    backend.close()


if __name__ == "__main__":
    main()
