"""A backend whose loss runs no forward, for ``--dry-run``: the pipeline's hooks still fire.

:class:`DryLoss` wraps a real backend (built by :mod:`pipeline.parallel.fake_group`). Its
``loss`` feeds zero activations (the micro-batch's rows, one position each, as a layer that sees
only the last positions) to the pipeline's own forward hooks on ``nn.Linear`` modules (AGZO's and
ZO-Act's activation capture, ZO-Act's adapters; never the backend's gather hooks) and returns 0.
A perturbed forward (``at``) writes every shard's perturbation once, into meta buffers: what
the backend's gather does.

Layers that a real forward feeds the same tensor (q/k/v, gate/up) get one tensor here too, so
:class:`~pipeline.zo.activations.RowCapture` groups them as in a real run and AGZO's and ZO-Act's
basis reductions have their real number and sizes. Which layers share an input comes from one
forward of the job's model on the meta device (:func:`shared_inputs`: no weights, no compute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def shared_inputs(model: torch.nn.Module) -> dict[str, int]:
    """``{module name: input index}`` for every ``nn.Linear`` of a meta-device ``model``: layers
    with the same index are fed the same tensor in a forward."""
    index: dict[int, int] = {}
    kept: list[torch.Tensor] = []  # alive, so that no two inputs share an id()
    found: dict[str, int] = {}

    def hook_for(name):
        def hook(module, args):
            del module
            x = args[0]
            if id(x) not in index:
                index[id(x)] = len(kept)
                kept.append(x)
            found[name] = index[id(x)]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    ids = torch.zeros(1, 2, dtype=torch.long, device="meta")
    try:
        with torch.no_grad():
            # No attention mask and a cache: transformers then checks neither the mask nor the
            # position ids for padding or packed sequences, which asks a meta tensor for values.
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return found


@dataclass
class _Batch:
    attention_mask: torch.Tensor

    def to(self, device):
        del device
        return self


def dry_batch(rows: int, length: int) -> _Batch:
    """A micro-batch of ``rows`` examples of ``length`` real tokens (only its mask is read)."""
    return _Batch(torch.ones(rows, length, dtype=torch.bool))


class DryLoss:
    """The real backend, with a loss that runs no forward (see the module docstring)."""

    def __init__(self, backend, micro_batch: int, shards, inputs: dict[str, int]):
        self._backend = backend
        self._shape = (micro_batch, 1)
        self._shards = shards
        self._inputs = inputs
        self.forwards = 0

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def losses(self, batch, ats) -> list[torch.Tensor]:
        return [self.loss(batch, at) for at in ats]

    def loss(self, batch, at=None) -> torch.Tensor:
        del batch
        self.forwards += 1
        if at is not None:
            for shard in self._shards:
                at.write(shard, torch.empty(shard.numel, dtype=shard.local.dtype, device="meta"))
        fed: dict[int, torch.Tensor] = {}
        for name, module in self._backend.model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            pre = [h for h in module._forward_pre_hooks.values() if _ours(h)]
            post = [h for h in module._forward_hooks.values() if _ours(h)]
            if not pre and not post:
                continue
            key = self._inputs.get(name, ("own", name))
            if key not in fed:
                fed[key] = torch.zeros(*self._shape, module.in_features)
            x = fed[key]
            for hook in pre:
                hook(module, (x,))
            y = torch.zeros(*self._shape, module.out_features)
            for hook in post:
                hook(module, (x,), y)
        return torch.zeros((), dtype=torch.float32)


def _ours(hook) -> bool:
    return getattr(hook, "__module__", "").startswith("pipeline.")
