"""The single-process backend: every parameter is one whole shard (``start = 0``).

A perturbed forward (``loss(batch, at=...)``) sees each module's trainable weights as a transient
perturbed copy swapped in for that module's forward only (:mod:`pipeline.parallel.swap_delivery`),
so the stored weights are never written while measuring and the extra memory is one module's
weights at a time (a large embedding or linear layer: one piece of it). With
``train.fused_evaluations`` the evaluations of ``losses(batch, ats)`` run as one forward of the
repeated batch (:mod:`pipeline.parallel.fused`).
"""

from __future__ import annotations

import torch

from pipeline.models.loading import resolve_device
from pipeline.models.objective import batch_loss, batch_losses, candidate_scores
from pipeline.models.tuning import load_tuned_model, tuned_names
from pipeline.parallel import make_shard, wants_master
from pipeline.parallel.fused import FusedEvaluation
from pipeline.parallel.swap_delivery import SwapDelivery


class SingleBackend:
    rank = 0
    world_size = 1

    def __init__(self, model, names: list[str], device, *, master: bool, fused: bool = False):
        self.model = model
        self.device = torch.device(device)
        params = dict(model.named_parameters())
        self._shards = [
            make_shard(n, params[n].shape, 0, params[n].data.view(-1), master=master)
            for n in names
        ]
        self._delivery = SwapDelivery(model, self._shards, params, piecewise_large=True)
        # installed after the delivery: its wrappers call piecewise's forwards
        self._fused = FusedEvaluation(model, self._shards, params, piecewise_large=True) \
            if fused else None

    @classmethod
    def from_config(cls, cfg) -> SingleBackend:
        device = resolve_device(cfg.model.device)
        model = load_tuned_model(cfg, device)
        names = tuned_names(model, cfg)
        return cls(model, names, device, master=wants_master(cfg),
                   fused=cfg.train.fused_evaluations)

    def shards(self):
        return self._shards

    @torch.no_grad()
    def loss(self, batch, at=None) -> torch.Tensor:
        """This process's batch loss (fp32) at the stored weights, or perturbed by ``at``."""
        with self._delivery.applying(at):
            return batch_loss(self.model, batch.to(self.device)).cpu()

    @torch.no_grad()
    def losses(self, batch, ats) -> list[torch.Tensor]:
        """``[loss(batch, at) for at in ats]``: one forward of the repeated batch when
        ``train.fused_evaluations`` is on, else one forward each."""
        if self._fused is None or len(ats) < 2:
            return [self.loss(batch, at) for at in ats]
        batch = batch.to(self.device)
        with self._fused.evaluating(ats, batch.input_ids.shape[0]):
            return [v.cpu() for v in batch_losses(self.model, batch, len(ats))]

    @torch.no_grad()
    def scores(self, batch) -> torch.Tensor:
        return candidate_scores(self.model, batch.to(self.device)).cpu()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(torch.float64)

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass
