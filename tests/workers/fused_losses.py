"""Rank worker: a step's evaluations run fused against one at a time, and what each gathers.

Run under torchrun (or directly, one process); argv: OUT_JSON CONFIG [overrides...]. On this
rank's first training batch it evaluates MeZO's ``[θ + εz, θ - εz]`` and BSZO's ``[θ, θ + εz_1,
θ + εz_2]`` both ways: one ``backend.loss`` per point (the sequential path) and one
``backend.losses`` call (fused when ``train.fused_evaluations`` is on), and records every
all-gather the process group ran in each (:func:`pipeline.parallel.comm_count.recording`) and in
one plain forward. Rank 0 writes ``{"losses": {name: [[sequential...], [fused...]]},
"gathered": {name: bytes}, "trainable_bytes"}``; losses as ``float.hex`` (bitwise).
"""

import json
import sys

import torch

from pipeline.config import load_config
from pipeline.parallel.comm_count import recording
from pipeline.train import build
from pipeline.zo.perturbation import Perturbation


def _gathered(calls: list[dict]) -> int:
    return sum(c["bytes"] for c in calls if c["op"].startswith("all_gather"))


def main() -> None:
    out, config, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    cfg = load_config(config, overrides)
    backend, _, data = build(cfg)
    batch = data.train_batch(0, cfg.train.batch_size, cfg.train.seed, backend.rank,
                             backend.world_size)
    eps = cfg.method.eps
    points = {"mezo": [Perturbation.dense(11, eps), Perturbation.dense(11, -eps)],
              "bszo": [None, Perturbation.dense(12, eps), Perturbation.dense(13, eps)]}
    for _ in range(3):  # DeepSpeed traces its first forwards (broadcasts): settle first
        backend.loss(batch)
    with recording() as forward:
        backend.loss(batch)
    record = {"losses": {}, "gathered": {"forward": _gathered(forward)},
              "trainable_bytes": sum(s.total * s.local.element_size()
                                     for s in backend.shards())}
    for name, ats in points.items():
        with recording() as calls:
            sequential = [backend.loss(batch, at) for at in ats]
        record["gathered"][f"{name}_sequential"] = _gathered(calls)
        with recording() as calls:
            fused = backend.losses(batch, ats)
        record["gathered"][f"{name}_fused"] = _gathered(calls)
        record["losses"][name] = [[v.item().hex() for v in sequential],
                                  [v.item().hex() for v in fused]]
    if backend.rank == 0:
        with open(out, "w") as f:
            json.dump(record, f)
    backend.close()


if __name__ == "__main__":
    main()
