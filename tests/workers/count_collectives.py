"""Rank worker: what one ZO step sends through the process group beyond its forwards' gathers.

Run under torchrun; argv: OUT_JSON CONFIG [overrides...] [--stray-gather]. Everything the process
group runs is recorded (:func:`pipeline.parallel.comm_count.recording`), in a plain forward and
in one step, inside the forwards and outside; rank 0 writes both, the step's forwards, and what
the step sent beyond that many plain forwards (``extra``, ``missing``). ``--stray-gather`` makes
every forward of the step also all-gather a parameter shard, as a loss that gathered a
parameter would: the test checks that the count sees it.
"""

import json
import sys

import torch
import torch.distributed as dist

from pipeline.config import load_config
from pipeline.parallel.comm_count import beyond_forwards, recording
from pipeline.train import build
from pipeline.zo.methods import StepContext


def _gather_a_parameter_in_each_forward(backend) -> None:
    loss, shard = backend.loss, backend.shards()[0]

    def gathering(batch, at=None):
        whole = torch.empty(shard.numel * backend.world_size, dtype=shard.local.dtype)
        dist.all_gather_into_tensor(whole, shard.local.contiguous())
        return loss(batch, at)

    backend.loss = gathering


def _steady_forward(backend, batch, tries: int = 5) -> list[dict]:
    """What a plain forward sends once the backend has settled: lazy initialisation, and
    DeepSpeed's check over its first forwards that every rank traced the same module order
    (broadcasts), are not what each forward pays."""
    last = None
    for _ in range(tries):
        with recording() as calls:
            backend.loss(batch)
        if calls == last:
            return calls
        last = calls
    raise RuntimeError(f"a plain forward sent something else each of {tries} times")


def main() -> None:
    args = sys.argv[1:]
    stray = "--stray-gather" in args
    out, config, *overrides = [a for a in args if a != "--stray-gather"]
    torch.set_num_threads(1)
    cfg = load_config(config, overrides)
    backend, method, data = build(cfg)
    batch = data.train_batch(0, cfg.train.batch_size, cfg.train.seed, backend.rank,
                             backend.world_size)
    forward = _steady_forward(backend, batch)
    if stray:
        _gather_a_parameter_in_each_forward(backend)
    with recording() as step:
        stats = method.step(StepContext(0, cfg.train.seed, cfg.method.lr, batch, backend))
    extra, missing = beyond_forwards(step, forward, stats.forwards)
    if backend.rank == 0:
        with open(out, "w") as f:
            json.dump({"forward": forward, "step": step, "forwards": stats.forwards,
                       "extra": extra, "missing": missing}, f)
    backend.close()


if __name__ == "__main__":
    main()
