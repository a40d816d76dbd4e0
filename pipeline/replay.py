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
from pipeline.export import save_hf, unsharded
from pipeline.metrics import read_jsonl
from pipeline.run_dir import RunDirError
from pipeline.zo.methods.base import ReplayUnsupported


def replay_run(run_dir: Path, out: Path | None = None, *, upto: int | None = None,
               progress: bool = True):
    """Replay the update log (up to step ``upto``); save to ``out`` if given; return the backend.
    """
    from pipeline.train import build_model

    log = run_dir / "update_log.jsonl"
    if not log.exists():
        raise RunDirError(f"{run_dir} has no update_log.jsonl to replay")
    cfg = unsharded(load_config(run_dir / "config.yaml"))
    backend, method = build_model(cfg)
    if not hasattr(method, "replay"):
        raise RunDirError(f"method {cfg.method.name} cannot be replayed from its log")
    records = [r for r in read_jsonl(log) if upto is None or r["step"] <= upto]
    try:
        for record in tqdm(records, desc="replay", unit="step", disable=not progress):
            method.replay(record)
    except ReplayUnsupported as exc:  # e.g. AGZO: its bases come from activations, not the log
        raise RunDirError(f"{cfg.method.name} runs cannot be replayed: {exc}. Use zopipe export "
                          "on a checkpoint instead") from None
    if out is not None:
        save_hf(backend.model, cfg.model.name_or_path, out)
    return backend
