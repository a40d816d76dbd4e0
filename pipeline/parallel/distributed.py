"""What every multi-process backend shares: the process group, the few collectives ZO needs, and
how a forward runs under a delivered perturbation (or as fused evaluations).

Launch is always ``torchrun`` (under SLURM ``srun torchrun``); it sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous. The process group is gloo on CPU and NCCL on CUDA.

Every reduction is deterministic: a float64 sum in rank order, so the step's projected gradient
(and an AGZO basis, a P-GAP range-finder product) is the same number on every rank and at every
world size with the same global batch (up to the fp32 rounding of each rank's own mean).

- up to :data:`GATHERED` elements (loss scalars, a stop flag): one all-gather of every rank's
  values, then the sum;
- larger vectors: chunked, so that the traffic and buffers per rank do not grow with the world
  size: an all-to-all gives rank ``j`` every rank's ``j``-th chunk (``n/W`` each), rank ``j`` sums
  them in rank order, and an all-gather of the summed chunks gives everyone the result. Each rank
  sends and receives about ``2n(W-1)/W`` values and holds ``O(n)``, where the all-gather of whole
  vectors would receive ``n(W-1)`` and hold ``nW``. The sums are the same operations in the same
  order, so the two paths give bitwise the same numbers.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from pipeline.models.objective import batch_loss, batch_losses, candidate_scores

GATHERED = 64  # reductions of at most this many elements use one all-gather


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(device_name: str) -> torch.device:
    """Join (or create) the default process group; returns this rank's device.

    Outside torchrun a one-process group is created, so the sharded backends also run (and are
    tested) at world size 1.
    """
    if not launched_by_torchrun():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda
                                else None)
    return device


class DistributedBackend:
    """Rank bookkeeping, collectives and the forwards; subclasses own the model, its shards, the
    delivery of perturbations (``_delivery``), the fused evaluation (``_fused``, or None) and
    :meth:`_release` (what frees the gathered weights after a forward)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def _release(self) -> None:
        """Free what a forward gathered (fsdp: reshard; zero3: release the partitions). The
        base class gathers nothing, so there is nothing to free."""

    def _forward(self, fn, batch, at=None, ats=None):
        batch = batch.to(self.device)
        context = self._delivery.applying(at) if ats is None else \
            self._fused.evaluating(ats, batch.input_ids.shape[0])
        try:
            with torch.no_grad(), context:
                out = fn(self.model, batch)
        finally:
            self._release()
        return out.cpu() if ats is None else [v.cpu() for v in out]

    def loss(self, batch, at=None) -> torch.Tensor:
        """This rank's batch loss (fp32) at the stored weights, or perturbed by ``at``."""
        return self._forward(batch_loss, batch, at)

    def losses(self, batch, ats) -> list[torch.Tensor]:
        """``[loss(batch, at) for at in ats]``: with ``train.fused_evaluations``, one forward of
        the repeated batch that gathers each unit once, unperturbed (:mod:`.fused`)."""
        if self._fused is None or len(ats) < 2:
            return [self.loss(batch, at) for at in ats]
        return self._forward(lambda m, b: batch_losses(m, b, len(ats)), batch, ats=ats)

    def scores(self, batch) -> torch.Tensor:
        return self._forward(candidate_scores, batch)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over ranks in float64, summed in rank order (bitwise the same on every rank)."""
        local = tensor.detach().to(self.device, torch.float64)
        if local.numel() > GATHERED:
            if local.dim() == 2 and not local.is_contiguous() and local.T.is_contiguous():
                # column-major (the range finder's thin products): reduce in memory order, so
                # flattening copies nothing and the mean keeps the layout
                flat = chunked_mean(local.T.reshape(-1), self.world_size)
                return flat.view(local.T.shape).T.cpu()
            return chunked_mean(local.reshape(-1), self.world_size).view(local.shape).cpu()
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        total = gathered[0].clone()
        for part in gathered[1:]:
            total += part
        return (total / self.world_size).cpu()

    def barrier(self) -> None:
        dist.barrier()

    def close(self, leave_group: bool = True) -> None:
        """Leave the process group (``leave_group=False`` keeps it for a next backend in this
        process: re-creating a gloo group under one torchrun store can fail to connect)."""
        if leave_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def chunked_mean(flat: torch.Tensor, world: int) -> torch.Tensor:
    """The rank-order float64 mean of a 1-D vector over ``world`` ranks, reduced chunk by chunk
    (all-to-all, a sum in rank order, all-gather: see the module docstring)."""
    n = flat.numel()
    size = math.ceil(n / world)
    padded = torch.zeros(size * world, dtype=torch.float64, device=flat.device)
    padded[:n] = flat
    received = torch.empty_like(padded)
    dist.all_to_all_single(received, padded)  # block j: rank j's values of this rank's chunk
    parts = received.view(world, size)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    total /= world
    gathered = torch.empty_like(padded)
    dist.all_gather_into_tensor(gathered, total)
    return gathered[:n]
