"""Noise throughput: the fused counter-based kernel vs torch.randn vs the block-seeded reference.

Elements/s of ``p += α·z`` over one tensor (what a ZO step does per parameter, 3x per step), by:

- ``torch.randn`` into a buffer (generation only), and ``torch.randn`` into a buffer + ``add_``;
- the former construction (block-seeded ``torch.randn``: one generator per 2^18-element block,
  seeded from (seed, key, block), then ``add_``);
- the counter-based kernel run eagerly (:mod:`pipeline.zo.noise_math`, the reference);
- the fused compiled kernel (``noise.apply``, no noise buffer), Gaussian and Rademacher;
- a cached ``z`` (``method.cache_noise``: the same fp32 arithmetic reading a stored z).

Also prints the compile time of the first call and the compiled graphs after calls of many
sizes. Usage: python bench/noise_throughput.py [--numel 33554432] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch._dynamo.utils import counters

from pipeline.zo import noise, noise_compile, noise_math
from pipeline.zo.rounding import rounding_seed
from pipeline.zo.seeds import mix

BLOCK = 1 << 18


def rate(fn, numel: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        tic = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    return numel / statistics.median(times)


def block_seeded(p: torch.Tensor, seed: int, key: int, alpha: float) -> None:
    """The former noise.py: one seeded torch.randn draw per 2^18-element block, then add_."""
    gen = torch.Generator(p.device)
    for b in range(0, p.numel(), BLOCK):
        gen.manual_seed(mix(seed, key, b // BLOCK))
        piece = p[b : b + BLOCK]
        piece.add_(torch.randn(piece.numel(), generator=gen, device=p.device).mul_(alpha))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    n, dev = args.numel, torch.device(args.device)
    p = torch.zeros(n, device=dev)
    gen = torch.Generator(dev).manual_seed(0)
    buf = torch.empty(n, device=dev)
    p16 = torch.zeros(n, dtype=torch.bfloat16, device=dev)  # a bf16 weight: the SR update
    graphs0 = counters["stats"]["unique_graphs"]
    tic = time.perf_counter()
    for kind in noise.KINDS:
        noise.apply(p[:1000], p[:1000], 0, 0, 0, n, 1.0, kind=kind)
    k = torch.tensor(noise.key_words(1, 2), dtype=torch.int32, device=dev)
    base = torch.tensor(0, dtype=torch.int32, device=dev)
    coef = torch.tensor([1e-3, 1.0, 0.0], device=dev)
    z = noise.gaussian(1, 2, 0, n, device=dev)
    noise.apply_stored(p[:1000], p[:1000], z[:1000], n, 1.0)
    compile_s = time.perf_counter() - tic
    graphs1 = counters["stats"]["unique_graphs"]
    rows = {
        "torch.randn into a buffer": lambda: torch.randn(n, generator=gen, out=buf),
        "torch.randn into a buffer + add_": lambda: p.add_(
            torch.randn(n, generator=gen, out=buf).mul_(1e-3)),
        "block-seeded randn + add_ (former)": lambda: block_seeded(p, 1, 2, 1e-3),
        "counter noise, eager reference": lambda: noise_math.apply_gaussian(p, p, base, k, coef),
        "fused compiled, gaussian": lambda: noise.apply(p, p, 1, 2, 0, n, 1e-3),
        "fused compiled, rademacher": lambda: noise.apply(p, p, 1, 2, 0, n, 1e-3,
                                                          kind="rademacher"),
        "cached z (cache_noise), compiled": lambda: noise.apply_stored(p, p, z, n, 1e-3),
        "fused compiled, gaussian, SR into bf16": lambda: noise.apply(
            p16, p16, 1, 2, 0, n, 1e-3, rounding=rounding_seed(3)),
    }
    rates = {name: rate(fn, n, args.repeats) for name, fn in rows.items()}
    for size in (3, 1001, 65_537, n // 2):  # other shard sizes: no new graphs expected
        noise.apply(p[:size], p[:size], 5, 6, 7, n, 1.0)
    graphs = counters["stats"]["unique_graphs"] - graphs0
    new = counters["stats"]["unique_graphs"] - graphs1
    base_rate = rates["torch.randn into a buffer"]
    base_add = rates["torch.randn into a buffer + add_"]
    seconds = ", ".join(f"{k[0]} {v:.1f} s" for k, v in noise_compile.compile_seconds.items())
    print(f"{n:,} elements on {dev}, {torch.get_num_threads()} threads; first calls "
          f"{compile_s:.1f} s "
          f"(compile: {seconds}); {graphs} compiled graphs, {new} of them after the first calls "
          "(calls of 6 more sizes and offsets)")
    print(f"{'':38s} {'M elem/s':>9s} {'vs randn':>9s} {'vs randn+add':>13s}")
    for name, r in rates.items():
        print(f"{name:38s} {r / 1e6:9.1f} {r / base_rate:8.2f}x {r / base_add:12.2f}x")


if __name__ == "__main__":
    main()
