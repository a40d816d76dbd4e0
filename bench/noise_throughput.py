"""Noise generation throughput: the block-seeded sharding-invariant noise vs plain torch.randn.

DESIGN.md asks the counter-based noise to stay within 1.5x of ``torch.randn``. Prints elements/s
of: ``torch.randn`` into one buffer, ``noise.gaussian`` over a whole parameter, and the in-place
``perturb.move`` path that the methods use (generate + scale + add, block by block).

Usage: python bench/noise_throughput.py [--numel 33554432] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.zo import perturb
from pipeline.zo.noise import gaussian
from pipeline.zo.shards import ParamShard


def rate(fn, numel: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return numel / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = args.numel
    gen = torch.Generator().manual_seed(0)
    shard = ParamShard("bench.weight", (n,), 0, torch.zeros(n))
    rates = {
        "torch.randn into a buffer": rate(lambda: torch.randn(n, generator=gen), n, args.repeats),
        "noise.gaussian (block-seeded)": rate(lambda: gaussian(1, 2, 0, n), n, args.repeats),
        "perturb.move (generate+scale+add)": rate(
            lambda: perturb.move([shard], 1, 0.0, 1e-3), n, args.repeats
        ),
    }
    base = rates["torch.randn into a buffer"]
    print(f"{n:,} elements, {torch.get_num_threads()} threads")
    for name, r in rates.items():
        print(f"{name:36s} {r / 1e6:8.1f} M elements/s   {r / base:5.2f}x torch.randn")


if __name__ == "__main__":
    main()
