"""Rank worker: a few steps of the configured method, recorded for comparison across ranks.

argv: OUT_DIR STEPS CONFIG [overrides...]; run directly (1 process) or under torchrun. Each rank
saves ``rank<r>.pt`` with per-step ``loss`` and ``grad`` (projected gradients), AGZO's per-step
``bases``, BSZO's per-step ``posterior`` (μ, Σ, noise EMA), ZO-Act's final ``V`` and ``C`` and
P-GAP's final ``factors`` (this rank's rows of U, S, V per weight), the first row of each local U
(``row0``) and ``refreshed_at`` when the method has them.
"""

import sys
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.train import build
from pipeline.zo.methods import StepContext


def main() -> None:
    out, steps, config, *overrides = sys.argv[1:]
    out = Path(out)
    torch.set_num_threads(1)
    cfg = load_config(config, overrides)
    backend, method, data = build(cfg)
    record = {"loss": [], "grad": [], "bases": [], "posterior": []}
    for step in range(int(steps)):
        batch = data.train_batch(step, cfg.train.batch_size, cfg.train.seed, backend.rank,
                                 backend.world_size)
        stats = method.step(StepContext(step, cfg.train.seed, cfg.method.lr, batch, backend))
        record["loss"].append(stats.loss)
        record["grad"].append(stats.projected_grad)
        if hasattr(method, "last_bases"):
            record["bases"].append(dict(method.last_bases))
        if getattr(method, "posterior", None) is not None:
            post = method.posterior
            record["posterior"].append((post.mu.clone(), post.cov.clone(), post.noise_ema))
    if hasattr(method, "C"):
        record.update(V=dict(method.V), C={n: c.clone() for n, c in method.C.items()})
    if hasattr(method, "factors"):
        record.update(refreshed_at=method.refreshed_at, row0=dict(method.row0),
                      factors={n: tuple(t.cpu() for t in f) for n, f in method.factors.items()})
    out.mkdir(parents=True, exist_ok=True)
    torch.save(record, out / f"rank{backend.rank}.pt")
    backend.close()


if __name__ == "__main__":
    main()
