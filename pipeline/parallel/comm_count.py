"""What the process group sends, and what of it a ZO step adds to its forwards' parameter gathers.

:func:`recording` runs a block under ``torch.profiler`` and returns every collective the process
group executed in it, as the process group's own work records it (the ``gloo:<op>`` /
``nccl:<op>`` event of each ProcessGroup work, with the shapes and dtypes of the tensors it
sends). That is below every way of issuing one: ``torch.distributed`` calls, a ProcessGroup's
methods, functional collectives, FSDP2's and DeepSpeed's gathers, inside a forward or outside.

:func:`beyond_forwards` tells a step's own traffic apart from the gathers its forwards pay as
inference does: it takes ``forwards`` times what one plain forward (``backend.loss``) sends out of
everything the step sent. What remains is what the method added, wherever it issued it: outside
the forwards (the loss all-gather), inside them (AGZO's basis reductions, streamed from a layer's
hook), or a gather of a parameter added to a loss. Used by bench/step_overhead.py under torchrun
and by the tests' rank worker (tests/workers/count_collectives.py).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
from torch.profiler import ProfilerActivity, profile

PROCESS_GROUPS = ("gloo:", "nccl:")

# the element sizes of the dtype names the profiler records (c10's scalar type names)
ITEM_BYTES = {"double": 8, "long int": 8, "c10::complex<float>": 8, "float": 4, "int": 4,
              "c10::BFloat16": 2, "c10::Half": 2, "short int": 2, "unsigned char": 1,
              "signed char": 1, "bool": 1, "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1}


def _call(event) -> dict:
    shapes = [s for s in event.input_shapes if s]
    dtypes = [d for d in event.input_dtypes if d]
    numels = [int(torch.Size(s).numel()) for s in shapes]
    return {"op": event.name.split(":", 1)[1], "numel": sum(numels),
            "bytes": sum(n * ITEM_BYTES[d] for n, d in zip(numels, dtypes))}


@contextlib.contextmanager
def recording() -> Iterator[list[dict]]:
    """Yields a list that fills, when the block ends, with ``{"op", "numel", "bytes"}`` per
    collective the process group ran in the block (``numel``/``bytes``: of what this rank sends),
    in the order they started."""
    calls: list[dict] = []
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        yield calls
    events = [e for e in prof.events() if e.name.startswith(PROCESS_GROUPS)]
    calls += [_call(e) for e in sorted(events, key=lambda e: e.time_range.start)]


def _key(call: dict) -> tuple:
    return call["op"], call["numel"], call["bytes"]


def beyond_forwards(step: list[dict], forward: list[dict], forwards: int
                    ) -> tuple[list[dict], list[dict]]:
    """``(extra, missing)``: the step's collectives beyond ``forwards`` times those of one plain
    ``forward`` (in the step's order), and those of the forwards the step did not send."""
    expected = Counter({k: n * forwards for k, n in Counter(map(_key, forward)).items()})
    extra = []
    for call in step:
        if expected[_key(call)] > 0:
            expected[_key(call)] -= 1
        else:
            extra.append(call)
    missing = [{"op": op, "numel": numel, "bytes": nbytes}
               for (op, numel, nbytes), n in expected.items() for _ in range(n)]
    return extra, missing


def summary(extra: list[dict], forward: list[dict], forwards: int) -> dict:
    """Calls and bytes the step added (its own), and those of its forwards' gathers."""
    return {"step_calls": len(extra), "step_bytes": sum(c["bytes"] for c in extra),
            "forward_calls": forwards * len(forward),
            "forward_bytes": forwards * sum(c["bytes"] for c in forward)}
