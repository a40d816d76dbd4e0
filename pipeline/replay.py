"""``zopipe replay``: rebuild a run's weights from the base model and its update log alone.

Each record of ``update_log.jsonl`` (seeds, projected gradients, learning rate) defines a step's
update; the method re-applies it with the same arithmetic and no forward pass, so the result
equals the run's weights bitwise (fp32). The log of a full-parameter MeZO run is a few hundred
bytes per step, against the model's size for a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from pipeline.config import load_config
from pipeline.export import NEW_OUT, save_hf, unsharded
from pipeline.metrics import read_jsonl
from pipeline.out_dirs import check_new
from pipeline.run_dir import RunDirError

# Their directions come from activations (AGZO's bases, ZO-Act's V), which the log does not carry.
FROM_ACTIVATIONS = ("agzo", "zoact")


def replay_run(run_dir: Path, out: Path | None = None, *, upto: int | None = None,
               progress: bool = True):
    """Replay the update log (up to step ``upto``); save to ``out`` if given; return the backend.
    """
    from pipeline.train import build_model

    log = run_dir / "update_log.jsonl"
    if not log.exists():
        raise RunDirError(f"{run_dir} has no update_log.jsonl to replay")
    cfg = unsharded(load_config(run_dir / "config.yaml"))
    if cfg.method.name in FROM_ACTIVATIONS:
        raise RunDirError(f"{cfg.method.name} runs cannot be replayed: their directions come from "
                          "activations, which the update log does not carry. Use zopipe export "
                          "on a checkpoint instead")
    if out is not None:
        check_new(out, NEW_OUT)
    backend, method = build_model(cfg)
    records = [r for r in read_jsonl(log) if upto is None or r["step"] <= upto]
    for record in tqdm(records, desc="replay", unit="step", disable=not progress):
        method.replay(record)
    if out is not None:
        save_hf(backend.model, cfg.model.name_or_path, out)
    return backend
