"""Rank worker: counts the torch.distributed collectives one ZO step issues beyond the forwards.

Run under torchrun; argv: OUT_JSON CONFIG [overrides...]. Every call of the listed collectives
is recorded with the sizes of the tensors it sends and whether it happened inside a forward pass
(``backend.loss``: parameter gathers of FSDP2 / ZeRO-3); the test asserts on the others.
"""

import json
import sys

import torch
import torch.distributed as dist

from pipeline.config import load_config
from pipeline.train import build
from pipeline.zo.methods import StepContext

COUNTED = ("all_gather", "all_reduce", "broadcast", "all_gather_object", "broadcast_object_list",
           "reduce", "scatter", "gather", "all_to_all", "send", "recv")


def main() -> None:
    out, config, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    cfg = load_config(config, overrides)
    backend, method, data = build(cfg)
    batch = data.train_batch(0, cfg.train.batch_size, cfg.train.seed, backend.rank,
                             backend.world_size)
    backend.loss(batch)  # warm-up: lazy initialisation collectives are not the step's
    calls = []
    originals = {}
    inside = [False]
    forward = backend.loss

    def loss(b):
        inside[0] = True
        try:
            return forward(b)
        finally:
            inside[0] = False

    backend.loss = loss
    for name in COUNTED:
        original = getattr(dist, name)
        originals[name] = original

        def counting(*args, _name=name, _original=original, **kwargs):
            values = [*args, *kwargs.values()]
            tensors = [a for a in values if isinstance(a, torch.Tensor)]
            tensors += [t for a in values if isinstance(a, list) for t in a
                        if isinstance(t, torch.Tensor) and a is not args[0]]
            calls.append({"op": _name, "numel": sum(t.numel() for t in tensors),
                          "in_forward": inside[0]})
            return _original(*args, **kwargs)

        setattr(dist, name, counting)
    method.step(StepContext(0, cfg.train.seed, cfg.method.lr, batch, backend))
    for name, original in originals.items():
        setattr(dist, name, original)
    if backend.rank == 0:
        with open(out, "w") as f:
            json.dump(calls, f)
    backend.close()


if __name__ == "__main__":
    main()
