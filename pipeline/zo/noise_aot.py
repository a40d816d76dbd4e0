"""The CPU noise kernels, compiled ahead of time by AOTInductor and loaded without the compiler.

Why not ``torch.compile`` in the training process (as on CUDA): importing dynamo and inductor
and compiling one kernel keep about 155 MiB resident in every process (70 MiB of imports, 85 MiB
left by the compile), a fixed cost that was 7-13% of the demo model's inference memory and is
paid by every rank. Here each kernel signature (its kind and the dtypes of its arguments) is
exported with ``torch.export`` (dynamic length) and compiled by AOTInductor in a separate Python
process, into a package under ``$ZOPIPE_CACHE/kernels/<key>/``; the training process loads the
package with AOTInductor's C++ package loader, which imports neither dynamo nor inductor. The
generated C++ is the same inductor code ``torch.compile`` emits for :mod:`noise_math`.

A package is built the first time a signature is needed on a machine (about 15-20 s of CPU per
signature; a run needs 1-4) and reused by every later process. The key holds the torch version,
a hash of the kernels' source (:mod:`noise_math`, :mod:`rounding`) and build options (a change
rebuilds), and of the CPU's flags and ``ATEN_CPU_CAPABILITY`` (the code is built for the host's
instruction set, so nodes of a cluster with other CPUs sharing one cache directory each get
their own). Ranks starting together build once: the build runs under an exclusive ``flock``
and lands by rename.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.assets import cache_root
from pipeline.zo import noise_math, rounding

# argument positions of each kind that hold the elements (dynamic length); the rest are the
# 0-d offset, the key words and the coefficients (fixed shapes)
ELEMENTS = {"gaussian": (0, 1), "rademacher": (0, 1), "gaussian_sr": (0, 1),
            "rademacher_sr": (0, 1), "stored": (0, 1, 2), "stored_sr": (0, 1, 2), "round": (0, 1)}
EXAMPLE = 64  # the traced length (shapes are dynamic: any length runs)
# The loop is parallel over the threads the calling process sets (torch.set_num_threads), not a
# count fixed at build time: with a static thread count inductor would decide from the small
# traced length (or a 1-thread build process) to emit a serial loop, and the kernel ran on one
# core of however many the run was given. Elementwise, so the values do not depend on the split.
BUILD_OPTIONS = {"cpp.dynamic_threads": True}
BUILD_TIMEOUT = 900


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_key() -> str:
    """The directory name of this machine's packages."""
    parts = [torch.__version__, platform.machine(), _cpu_flags(),
             os.environ.get("ATEN_CPU_CAPABILITY", ""),  # inductor vectorises for it
             inspect.getsource(noise_math), inspect.getsource(rounding), repr(BUILD_OPTIONS),
             str(EXAMPLE)]
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return f"torch-{torch.__version__.replace('+', '-')}-{digest}"


def kernel_dir() -> Path:
    return cache_root() / "kernels" / cache_key()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def package_path(kind: str, dtypes: tuple[torch.dtype, ...]) -> Path:
    return kernel_dir() / f"{kind}-{'-'.join(map(_dtype_name, dtypes))}.pt2"


def _example(kind: str, dtypes: tuple[torch.dtype, ...]) -> tuple[torch.Tensor, ...]:
    """Arguments of ``kind`` with ``dtypes`` in the shapes the kernels are called with."""
    fixed = {"gaussian": (None, None, (), (2,), (3,)), "rademacher": (None, None, (), (2,), (3,)),
             "gaussian_sr": (None, None, (), (2,), (2,), (3,)),
             "rademacher_sr": (None, None, (), (2,), (2,), (3,)),
             "stored": (None, None, None, (3,)), "stored_sr": (None, None, None, (), (2,), (3,)),
             "round": (None, None, (), (2,))}[kind]
    args = []
    for shape, dtype in zip(fixed, dtypes):
        if shape is None:
            args.append(torch.linspace(-3, 3, EXAMPLE).to(dtype))
        elif dtype == torch.int32:
            args.append(torch.full(shape, 5, dtype=dtype))
        else:
            args.append(torch.ones(shape, dtype=dtype))
    return tuple(args)


class _Kernel(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.fn = noise_math.REFERENCE[kind]

    def forward(self, *args):
        self.fn(*args)
        return (args[0],)


def build(kind: str, dtypes: tuple[torch.dtype, ...], path: Path) -> None:
    """Export and AOT-compile the ``kind`` kernel for ``dtypes`` into the package ``path``
    (run in a process of its own: :func:`ensure`)."""
    args = _example(kind, dtypes)
    n = torch.export.Dim("n", min=2, max=(1 << 31) - 2)
    dynamic = tuple({0: n} if i in ELEMENTS[kind] else None for i in range(len(args)))
    program = torch.export.export(_Kernel(kind), args, dynamic_shapes=(dynamic,), strict=False)
    # stochastic rounding casts to 16 bits and back on purpose: inductor must not fold that
    options = dict(BUILD_OPTIONS)
    if kind.endswith("_sr") or kind == "round":
        options["emulate_precision_casts"] = True
    from torch._inductor import aoti_compile_and_package  # only in the build process

    tmp = path.with_name(f".{os.getpid()}.{path.name}")  # a .pt2 name, as the packager asks
    try:
        aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=options)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure(kind: str, dtypes: tuple[torch.dtype, ...]) -> Path:
    """The package of ``kind`` for ``dtypes``, built first (in a subprocess) if missing."""
    path = package_path(kind, dtypes)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be building it
        if not path.is_file():
            cmd = [sys.executable, "-m", "pipeline.zo.noise_aot", kind,
                   *map(_dtype_name, dtypes), str(path)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
            if out.returncode != 0 or not path.is_file():
                lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
                raise RuntimeError(lines[-1] if lines else f"exit status {out.returncode}")
    return path


class AotKernel:
    """A kernel of ``kind`` on the CPU: called like its reference in :mod:`noise_math`; each
    dtype signature's package is built or loaded on first use."""

    def __init__(self, kind: str):
        self.kind = kind
        self._runners: dict[tuple[torch.dtype, ...], Callable] = {}
        self.seconds: dict[tuple[torch.dtype, ...], float] = {}  # build + load, per signature

    def _runner(self, dtypes: tuple[torch.dtype, ...]) -> Callable:
        tic = time.perf_counter()
        try:
            path = ensure(self.kind, dtypes)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            names = ", ".join(map(_dtype_name, dtypes))
            raise RuntimeError(f"building the {self.kind} noise kernel for ({names}) in "
                               f"{kernel_dir()} failed: {exc}; ZOPIPE_CACHE moves the kernel "
                               "cache, ZO_NOISE_COMPILE=0 runs the eager reference kernel "
                               "(slower)") from exc
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        self.seconds[dtypes] = time.perf_counter() - tic
        return loader.run

    def __call__(self, *args: torch.Tensor) -> None:
        dtypes = tuple(a.dtype for a in args)
        run = self._runners.get(dtypes)
        if run is None:
            run = self._runners[dtypes] = self._runner(dtypes)
        run(list(args))


if __name__ == "__main__":
    kind_, *names, out_ = sys.argv[1:]
    build(kind_, tuple(getattr(torch, name) for name in names), Path(out_))
