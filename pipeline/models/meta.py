"""A job's model built on the meta device from its ``config.json`` alone: shapes, no weights.

``zopipe plan`` and ``zopipe train --dry-run`` size 13B+ jobs on machines without the weights (or
a GPU): the recipes point ``model.config_for_planning`` at ``jobs/models/<name>/`` (the model's
published ``config.json``, a few KB), while ``model.name_or_path`` stays the hub id a real run
downloads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.models.loading import DTYPES, ModelError

REPO_ROOT = Path(__file__).resolve().parents[2]


def planning_config_dir(model_cfg) -> Path:
    """The directory holding the model's ``config.json`` (see ``model.config_for_planning``)."""
    given = model_cfg.config_for_planning
    if given is None:
        local = Path(model_cfg.name_or_path).expanduser()
        if (local / "config.json").is_file():
            return local
        raise ModelError(
            f"model.config_for_planning is not set and model.name_or_path="
            f"{model_cfg.name_or_path!r} is not a local model directory; set "
            "model.config_for_planning to a directory with the model's config.json (e.g. "
            "jobs/models/opt-13b)"
        )
    path = Path(given).expanduser()
    for candidate in (path, REPO_ROOT / path):
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelError(
        f"model.config_for_planning={given!r}: no config.json there (nor under {REPO_ROOT}); "
        "give a directory holding the model's config.json"
    )


def hf_config(model_cfg):
    from transformers import AutoConfig

    path = planning_config_dir(model_cfg)
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path / 'config.json'}: not a model config transformers can read "
                         f"({exc})") from None


def meta_model(model_cfg, hf_cfg=None):
    """The causal LM on the meta device, in the job's storage dtype, gradients off."""
    from transformers import AutoModelForCausalLM

    hf_cfg = hf_cfg if hf_cfg is not None else hf_config(model_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=DTYPES[model_cfg.dtype])
    model.requires_grad_(False)
    return model.eval()
