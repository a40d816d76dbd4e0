"""Perturbation by swapping a transient perturbed copy in for one module at a time.

For every module that owns trainable parameters directly, a forward pre-hook (prepended, so it
runs before any other) fills a fresh buffer with the perturbed values of each such parameter's
shard (:meth:`pipeline.zo.perturbation.Perturbation.write`) and points the tensor the module's
forward (or the backend's gather) reads at it with ``tensor.data = buffer``; a second hook points
it back. The stored values are never written, so the restore is exact in every dtype, and at any
time at most the buffers of the modules in flight exist (one module's weights, plus its
ancestors' own parameters, which are small).

- single backend: the tensor is the parameter itself and it is swapped back after the module's
  forward (a forward hook); a plain embedding or linear layer whose weight is larger than
  :data:`pipeline.parallel.piecewise.PIECE_BYTES` is not swapped but computes its perturbed
  forward from pieces of the perturbed weight (:mod:`pipeline.parallel.piecewise`), so the
  largest module's copy is not held either;
- ZeRO-3: the tensor is the parameter's partition ``p.ds_tensor``, swapped in only when DeepSpeed
  is about to gather it (``NOT_AVAILABLE``) and swapped back right after DeepSpeed's own
  pre-forward hook has gathered it; the gathered copy carries the perturbation for the rest of
  the forward. Prefetching must be off (a prefetched parameter would be gathered before this hook
  runs: it is refused), and on CUDA the gather stream is made to wait for the buffer's writes.

A parameter owned by several modules (a tied LM head) is perturbed at each use, with the same
values.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from pipeline.parallel import piecewise
from pipeline.parallel.delivery import Delivery
from pipeline.zo.shards import ParamShard


def the_parameter(param: torch.nn.Parameter) -> torch.Tensor:
    """The single backend's holder: the forward reads the parameter itself."""
    return param


def _swap_in_hook(delivery, own, _module, _args) -> None:
    delivery._swap_in(own)


def _swap_out_hook(delivery, _module, *_rest) -> None:
    delivery._swap_out()


class SwapDelivery(Delivery):
    def __init__(self, model: torch.nn.Module, shards: list[ParamShard],
                 params: dict[str, torch.nn.Parameter], *,
                 holder: Callable[[torch.nn.Parameter], torch.Tensor] = the_parameter,
                 gather_pending: Callable[[torch.nn.Parameter], bool] | None = None,
                 restore_after_forward: bool = True,
                 before_gather: Callable[[], None] | None = None,
                 piecewise_large: bool = False):
        super().__init__(shards)
        self._holder = holder
        self._pending = gather_pending
        self._before_gather = before_gather
        self._stack: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        by_id = {id(params[s.name]): s for s in shards}
        self._handles = []
        for module in model.modules():
            own = [(p, by_id[id(p)]) for p in module.parameters(recurse=False) if id(p) in by_id]
            if not own:
                continue
            named = {n: by_id[id(p)] for n, p in module.named_parameters(recurse=False)
                     if id(p) in by_id}
            if piecewise_large and piecewise.qualifies(module, named.get("weight")):
                piecewise.install(module, self, named)
                continue
            # module-level functions, not lambdas: a model with these hooks still pickles
            self._handles.append(module.register_forward_pre_hook(
                partial(_swap_in_hook, self, own), prepend=True))
            if restore_after_forward:
                self._handles.append(module.register_forward_hook(partial(_swap_out_hook, self)))
            else:
                self._handles.append(module.register_forward_pre_hook(
                    partial(_swap_out_hook, self)))

    def _swap_in(self, own: list[tuple[torch.nn.Parameter, ParamShard]]) -> None:
        swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._stack.append(swapped)
        if self.active is None:
            return
        for param, shard in own:
            if self._pending is not None and not self._pending(param):
                continue
            tensor = self._holder(param)
            buffer = torch.empty_like(tensor)
            self.write(shard, buffer.view(-1)[: shard.numel])
            swapped.append((tensor, tensor.data))
            tensor.data = buffer
        if swapped and self._before_gather is not None:
            self._before_gather()

    def _swap_out(self) -> None:
        if not self._stack:
            return
        for tensor, stored in reversed(self._stack.pop()):
            tensor.data = stored

    def release(self) -> None:
        while self._stack:
            self._swap_out()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
