"""Rank worker: updates at a non-zero learning rate, each rank measuring the WHOLE global batch.

argv: OUT_DIR STEPS DTYPES VARIANTS CONFIG [overrides...]; run directly (1 process) or under
torchrun. DTYPES is a comma-separated list of ``model.dtype`` values (one backend each, in one
process group); VARIANTS a JSON object ``{variant: {method field: value}}``.

Every rank takes the whole global batch of each step (not its part), so its losses, their
float64 mean over the ranks and the projected gradients are bitwise the single process's: what
is left to differ across world sizes is how each rank perturbs the weights its forwards gather
and how it writes its shard's update (noise and stochastic-rounding bits keyed by global index).
For each dtype and variant, from the loaded weights, the rank runs STEPS steps and saves its
shards with their global offsets (``<dtype>/<variant>-rank<r>.safetensors``); rank 0 writes the
per-step losses and projected gradients to ``<dtype>/records.json``.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.train import build
from pipeline.zo.methods import StepContext, build_method
from pipeline.zo.shard_io import save_shards


def run_variants(cfg, variants: dict, steps: int, out: Path, last: bool) -> None:
    backend, _, data = build(cfg)
    shards = backend.shards()
    loaded = [s.local.detach().clone() for s in shards]
    records = {}
    for variant, fields in variants.items():
        for s, w in zip(shards, loaded):
            s.local.copy_(w)
        method = build_method(replace(cfg, method=replace(cfg.method, **fields)), shards)
        records[variant] = []
        for step in range(steps):
            batch = data.train_batch(step, cfg.train.batch_size, cfg.train.seed, 0, 1)
            stats = method.step(StepContext(step, cfg.train.seed, cfg.method.lr, batch, backend))
            records[variant].append({"loss": stats.loss, "grad": stats.projected_grad})
        save_shards(shards, out / f"{variant}-rank{backend.rank}.safetensors")
    if backend.rank == 0:
        (out / "records.json").write_text(json.dumps(records))
    if cfg.parallel.backend == "single":
        backend.close()
    else:  # one process group for every dtype: re-creating it under torchrun's store can fail
        backend.close(leave_group=last)


def main() -> None:
    out, steps, dtypes, variants, config, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    dtypes = dtypes.split(",")
    for dtype in dtypes:
        cfg = load_config(config, [*overrides, f"model.dtype={dtype}"])
        (Path(out) / dtype).mkdir(parents=True, exist_ok=True)
        run_variants(cfg, json.loads(variants), int(steps), Path(out) / dtype,
                     last=dtype == dtypes[-1])


if __name__ == "__main__":
    main()
