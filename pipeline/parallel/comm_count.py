"""Count what one ZO step sends through torch.distributed beyond its forwards' parameter gathers.

:func:`counting` wraps the torch.distributed collectives for the duration of a ``with`` block and
marks calls made inside ``backend.loss`` (FSDP2 / ZeRO-3 gathers, which inference pays too); the
rest is the step's own communication. Used by bench/step_overhead.py under torchrun and by the
tests' rank worker (tests/workers/count_collectives.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

COUNTED = ("all_gather", "all_reduce", "broadcast", "all_gather_object", "broadcast_object_list",
           "reduce", "scatter", "gather", "all_to_all", "all_to_all_single", "send", "recv",
           "all_gather_into_tensor", "reduce_scatter_tensor")


OUTPUT_FIRST = ("all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single",
                "reduce_scatter_tensor")


def tensors_in(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += tensors_in(v)
    return out


@contextlib.contextmanager
def counting(backend):
    """Yields a list that fills with ``{"op", "numel", "bytes", "in_forward"}`` per collective
    call (``numel``/``bytes``: of the tensors it sends)."""
    calls: list[dict] = []
    inside = [False]
    forward = backend.loss

    def loss(batch, at=None):
        inside[0] = True
        try:
            return forward(batch, at)
        finally:
            inside[0] = False

    originals = {name: getattr(dist, name) for name in COUNTED if hasattr(dist, name)}

    def wrap(name, original):
        def counted(*args, **kwargs):
            # the first argument of these is the output: count the inputs
            sent = args[1:] if name in OUTPUT_FIRST else args
            tensors = tensors_in([*sent, *kwargs.values()])
            calls.append({"op": name, "numel": sum(t.numel() for t in tensors),
                          "bytes": sum(t.numel() * t.element_size() for t in tensors),
                          "in_forward": inside[0]})
            return original(*args, **kwargs)
        return counted

    backend.loss = loss
    for name, original in originals.items():
        setattr(dist, name, wrap(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        backend.loss = forward


def summary(calls: list[dict]) -> dict:
    """Calls and bytes outside the forwards (the step's own) and inside (parameter gathers)."""
    own = [c for c in calls if not c["in_forward"]]
    fwd = [c for c in calls if c["in_forward"]]
    return {"step_calls": len(own), "step_bytes": sum(c["bytes"] for c in own),
            "forward_calls": len(fwd), "forward_bytes": sum(c["bytes"] for c in fwd)}
