"""Rank worker: counts the torch.distributed collectives one ZO step issues beyond the forwards.

Run under torchrun; argv: OUT_JSON CONFIG [overrides...]. Every collective call is recorded by
:func:`pipeline.parallel.comm_count.counting` with the sizes of the tensors it sends and whether it
happened inside a forward pass (``backend.loss``: parameter gathers of FSDP2 / ZeRO-3); the test
asserts on the others.
"""

import json
import sys

import torch

from pipeline.config import load_config
from pipeline.parallel.comm_count import counting
from pipeline.train import build
from pipeline.zo.methods import StepContext


def main() -> None:
    out, config, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    cfg = load_config(config, overrides)
    backend, method, data = build(cfg)
    batch = data.train_batch(0, cfg.train.batch_size, cfg.train.seed, backend.rank,
                             backend.world_size)
    backend.loss(batch)  # warm-up: lazy initialisation collectives are not the step's
    with counting(backend) as calls:
        method.step(StepContext(0, cfg.train.seed, cfg.method.lr, batch, backend))
    if backend.rank == 0:
        with open(out, "w") as f:
            json.dump(calls, f)
    backend.close()


if __name__ == "__main__":
    main()
