"""Which parameters train: fnmatch patterns over the model's parameter names."""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch

from pipeline.models.loading import ModelError


def select_trainable(model: torch.nn.Module, patterns: list[str]) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` pairs matching any pattern, in the model's order.

    Tied parameters appear once (``named_parameters`` deduplicates them), so a tied embedding and
    LM head receive one perturbation, as they should.
    """
    named = list(model.named_parameters())
    chosen = [(n, p) for n, p in named if any(fnmatchcase(n, pat) for pat in patterns)]
    unused = [pat for pat in patterns if not any(fnmatchcase(n, pat) for n, _ in named)]
    if unused or not chosen:
        examples = ", ".join(n for n, _ in named[:4])
        raise ModelError(
            f"model.trainable: {', '.join(unused) or patterns} matched no parameter; names look "
            f"like {examples}"
        )
    return chosen
