"""The fused noise kernels: :mod:`pipeline.zo.noise_math` compiled by inductor.

Inductor turns ``dst = ((src + z·a)·s + z·b)`` into one loop (C++ on CPU, Triton on GPU) that
hashes each element's index and adds its noise in place, with no noise buffer. The seed, key
words, start offset and coefficients are tensor arguments and shapes are dynamic, so one compiled
kernel serves every step, parameter and shard (one per dtype signature and device). On CUDA the
kernels come from ``torch.compile`` in the process; on the CPU they are compiled ahead of time in
a separate process and loaded without the compiler (:mod:`pipeline.zo.noise_aot`), which keeps
about 155 MiB of compiler state out of every training process.

The compiled and the eager (reference) kernels agree to about one fp32 ulp of ``z`` but not
bitwise (inductor's vectorised log/cos are not ATen's): a process therefore picks ONE path per
parameter size rule (:func:`pipeline.zo.noise.uses_compiled`) and never mixes them. If
the compiler is unavailable (no C++ compiler, no Triton) the first use warns once and every
call runs the eager reference; ``ZO_NOISE_COMPILE=0`` forces the reference.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable

import torch

from pipeline.zo import noise_aot, noise_math

_compiled: dict[tuple[str, str], Callable | None] = {}
compile_seconds: dict[tuple[str, str], float] = {}  # first-call (probe) time, for bench/


def enabled() -> bool:
    return os.environ.get("ZO_NOISE_COMPILE", "1") != "0"


def _probe_args(kind: str, device: torch.device) -> tuple:
    """Small arguments of a kernel of ``kind``: ``(dst, src, ...)`` as its reference takes them."""
    low = torch.bfloat16 if kind.endswith("_sr") or kind == "round" else torch.float32
    dst = torch.zeros(64, dtype=low, device=device)
    src = torch.linspace(-3, 3, 64, device=device)
    base = torch.tensor(5, dtype=torch.int32, device=device)
    k = torch.tensor([123, -456], dtype=torch.int32, device=device)
    coef = torch.tensor([1.0, 1.0, 0.0], device=device)
    if kind == "round":
        return dst, src, base, k
    if kind.startswith("stored"):
        return (dst, src, src, base, k, coef) if kind.endswith("_sr") else (dst, src, src, coef)
    return (dst, src, base, k, k, coef) if kind.endswith("_sr") else (dst, src, base, k, coef)


def _probe(fn: Callable, device: torch.device) -> None:
    """Compile and run once on a small tensor, checking the result against the reference."""
    args = _probe_args(fn.kind, device)
    ref_args = (args[0].clone(), *args[1:])
    with torch.no_grad():
        fn(*args)
        noise_math.REFERENCE[fn.kind](*ref_args)
    low = args[0].dtype != torch.float32  # rounding: the noise may differ by an ulp of fp32
    got, want = args[0].float(), ref_args[0].float()
    # (not torch.testing.assert_close: its first call imports ~45 MiB that training never frees)
    bad = (got - want).abs() > 1e-5 + (1e-2 if low else 1e-5) * want.abs()
    if bad.any():
        raise AssertionError(f"compiled {fn.kind} kernel differs from the reference at "
                             f"{int(bad.sum())} of {bad.numel()} probe elements")


def _build(kind: str, device: torch.device) -> Callable:
    if device.type == "cpu":
        return noise_aot.AotKernel(kind)
    # stochastic rounding casts to 16 bits and back on purpose: inductor must not fold that
    options = {"emulate_precision_casts": True} if kind.endswith("_sr") or kind == "round" \
        else None
    fn = torch.compile(noise_math.REFERENCE[kind], dynamic=True, fullgraph=True, options=options)
    fn.kind = kind
    return fn


def kernel(kind: str, device: torch.device) -> Callable | None:
    """The compiled kernel of ``kind`` for ``device``, or None (use the reference)."""
    if not enabled():
        return None
    slot = (kind, device.type)
    if slot not in _compiled:
        tic = time.perf_counter()
        try:
            fn = _build(kind, device)
            _probe(fn, device)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: use the reference
            warnings.warn(f"compiling the {kind} noise kernel failed on {device.type} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:400]}); using the "
                          "eager reference kernel (same noise to ~1 ulp, slower)", stacklevel=3)
            fn = None
        compile_seconds[slot] = time.perf_counter() - tic
        _compiled[slot] = fn
    return _compiled[slot]
