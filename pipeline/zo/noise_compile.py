"""The fused noise kernels: :mod:`pipeline.zo.noise_math` compiled by ``torch.compile``.

Inductor turns ``dst = ((src + z·a)·s + z·b)`` into one loop (C++/OpenMP on CPU, Triton on GPU)
that hashes each element's index and adds its noise in place, with no noise buffer. The seed, key
words, start offset and coefficients are tensor arguments and shapes are dynamic, so one compiled
kernel serves every step, parameter and shard (a few graphs: one per dtype pair and device).

The compiled and the eager (reference) kernels agree to about one fp32 ulp of ``z`` but not
bitwise (inductor's vectorised log/cos are not ATen's): a process therefore picks ONE path per
parameter size rule (:func:`pipeline.zo.noise.uses_compiled`) and never mixes them. If
``torch.compile`` is unavailable (no C++ compiler, no Triton) the first use warns once and every
call runs the eager reference; ``ZO_NOISE_COMPILE=0`` forces the reference.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable

import torch

from pipeline.zo import noise_math

_compiled: dict[tuple[str, str], Callable | None] = {}
compile_seconds: dict[tuple[str, str], float] = {}  # first-call (probe) time, for bench/


def enabled() -> bool:
    return os.environ.get("ZO_NOISE_COMPILE", "1") != "0"


def _probe(fn: Callable, device: torch.device) -> None:
    """Compile and run once on a small tensor, checking the result against the reference."""
    x = torch.zeros(64, device=device)
    coef = torch.tensor([1.0, 1.0, 0.0], device=device)
    args = ((torch.linspace(-3, 3, 64, device=device), coef) if fn.kind == "stored" else
            (torch.tensor(5, dtype=torch.int32, device=device),
             torch.tensor([123, -456], dtype=torch.int32, device=device), coef))
    with torch.no_grad():
        fn(x, x, *args)
        ref = torch.zeros(64, device=device)
        noise_math.REFERENCE[fn.kind](ref, ref, *args)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


def kernel(kind: str, device: torch.device) -> Callable | None:
    """The compiled kernel of ``kind`` for ``device``, or None (use the reference)."""
    if not enabled():
        return None
    slot = (kind, device.type)
    if slot not in _compiled:
        fn = torch.compile(noise_math.REFERENCE[kind], dynamic=True, fullgraph=True)
        fn.kind = kind
        tic = time.perf_counter()
        try:
            _probe(fn, device)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: use the reference
            warnings.warn(f"torch.compile of the {kind} noise kernel failed on {device.type} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); using the "
                          "eager reference kernel (same noise to ~1 ulp, slower)", stacklevel=3)
            fn = None
        compile_seconds[slot] = time.perf_counter() - tic
        _compiled[slot] = fn
    return _compiled[slot]
