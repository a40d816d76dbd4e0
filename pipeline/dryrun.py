"""``zopipe train JOB --dry-run``: the real backend and one step's bookkeeping, without a forward.

1. **The real backend shards the meta-device model** on a fake process group of the job's world
   size, this process being rank 0 (:mod:`pipeline.parallel.fake_group`).
2. **Shard sizes for every rank** come from the libraries' own partition rules; rank 0's are
   checked against the backend's real ParamShards.
3. **One step of the method** runs on rank 0's shards (as meta views, with meta fp32 masters when
   the job has them), with a loss that computes no forward (:mod:`pipeline.parallel.dry_loss`):
   the pipeline's own hooks on ``nn.Linear`` modules see zero activations, layers fed one tensor
   in a real forward (q/k/v) one tensor here, so the sizes and number of AGZO's and ZO-Act's
   basis reductions are those of a real run. The noise blocks are recorded, not drawn. Every
   ``torch.distributed`` collective the step issues is counted with its element count; under the
   fake group an all-gather returns this rank's tensor from every rank. A method that calibrates
   first (ZO-Act) runs its calibration steps, and the step reported is its first training step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pipeline.models.meta import meta_model
from pipeline.parallel.dry_loss import DryLoss, dry_batch, shared_inputs
from pipeline.parallel.fake_group import DryRunError, on_fake_group
from pipeline.plan import DTYPE_BYTES
from pipeline.zo import noise
from pipeline.zo.methods import StepContext, build_method

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "all_gather_object",
               "broadcast_object_list", "scatter", "gather", "all_to_all", "all_to_all_single",
               "send", "recv",
               "barrier")
# the collectives whose first argument is the output: what they send is the rest
OUTPUT_FIRST = ("all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single",
                "reduce_scatter_tensor")


@dataclass
class DryRun:
    backend: str
    world: int
    total_params: int
    shard_names: list[str]
    rank_elements: list[int]  # per rank: trainable elements it holds (its shards)
    rank_blocks: list[int]  # per rank: noise blocks one regeneration of its shards draws
    backend_elements: int  # rank 0's elements as the backend's ParamShards report them
    stored_elements: int  # rank 0's storage of every parameter (frozen ones, padding included)
    dtype: str
    forwards: int
    calibration_steps: int
    collectives: list[dict] = field(default_factory=list)  # the reported step's, in order
    noise_blocks: Counter = field(default_factory=Counter)  # (key, block) -> draws in that step

    @property
    def trainable_params(self) -> int:
        return sum(self.rank_elements)


def _stored(p) -> int:
    """Elements this rank stores of ``p``: its ZeRO-3 partition, its FSDP2 local shard, or all."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.ds_numel
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def _tensors_in(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += _tensors_in(v)
    return out


def _meta_view(shard):
    local = torch.empty(shard.numel, dtype=shard.local.dtype, device="meta")
    master = None if shard.master is None else torch.empty(shard.numel, device="meta")
    return dataclasses.replace(shard, local=local, master=master)


@contextlib.contextmanager
def _recording(blocks: Counter, calls: list[dict]):
    """Noise blocks recorded instead of drawn; collectives counted (all-gathers filled with this
    rank's tensor, as if every rank sent the same)."""
    original_apply = noise.apply

    def apply(dst, src, seed, key, start, total, *args, **kwargs):
        """One fused noise pass over ``[start, start + n)``: recorded as the ``BLOCK``-aligned
        pieces it covers, nothing computed (the tensors are on the meta device)."""
        n = dst.numel()
        if n > 0:
            for index in range(start // noise.BLOCK, (start + n - 1) // noise.BLOCK + 1):
                blocks[(key, index)] += 1

    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name, fn):
        def call(*args, **kwargs):
            sent = args[1:] if name in OUTPUT_FIRST else args
            numel = sum(t.numel() for t in _tensors_in([*sent, *kwargs.values()]))
            calls.append({"op": name, "numel": numel})
            out = fn(*args, **kwargs)
            if name == "all_gather" and isinstance(args[0], list):
                for slot in args[0]:
                    slot.copy_(args[1])
            return out

        return call

    noise.apply = apply
    for name, fn in originals.items():
        setattr(dist, name, counting(name, fn))
    try:
        yield
    finally:
        noise.apply = original_apply
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _blocks_of(ranges: list[tuple[int, int]]) -> int:
    """Noise blocks that one regeneration over these ``(start, count)`` ranges draws."""
    return sum((start + n - 1) // noise.BLOCK - start // noise.BLOCK + 1
               for start, n in ranges if n > 0)


def dry_run(cfg, *, max_calibration: int = 64) -> DryRun:
    """Build the job's backend on a fake group of its world size and run one step's bookkeeping."""
    world = cfg.parallel.nodes * cfg.parallel.gpus_per_node
    backend_name = cfg.parallel.backend
    if backend_name == "single" and world > 1:
        raise DryRunError(f"parallel.backend=single runs one rank, but parallel.nodes x "
                         f"gpus_per_node = {world}; set both to 1 or use fsdp/zero3")
    if cfg.train.batch_size % world:
        raise DryRunError(f"train.batch_size={cfg.train.batch_size} must be a multiple of the "
                         f"world size {world}")
    # before the backend: DeepSpeed's zero.Init leaves patched module classes behind it
    inputs = shared_inputs(meta_model(cfg.model))
    with on_fake_group(cfg, world) as build:
        backend, names, per_rank = build.backend, build.names, build.per_rank
        shards = backend.shards()
        mine = [(s.start, s.numel) for s in shards]
        if mine != [ranges[0] for ranges in per_rank]:
            raise RuntimeError("the backend's shards of rank 0 differ from the partition rule")
        rank_elements = [sum(ranges[r][1] for ranges in per_rank) for r in range(world)]
        rank_blocks = [_blocks_of([ranges[r] for ranges in per_rank]) for r in range(world)]
        model_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                           for p in backend.model.parameters())
        stored = sum(_stored(p) for p in backend.model.parameters())
        method = build_method(cfg, [_meta_view(s) for s in shards])
        micro = cfg.train.batch_size // world
        dry = DryLoss(backend, micro, method.shards, inputs)
        batch = dry_batch(micro, cfg.data.max_length)
        blocks: Counter = Counter()
        calls: list[dict] = []
        for step in range(max_calibration + 1):
            blocks.clear()
            calls.clear()
            dry.forwards = 0
            with _recording(blocks, calls):
                stats = method.step(StepContext(step, cfg.train.seed, cfg.method.lr, batch, dry))
            if not stats.extra.get("calibrating"):
                break
    return DryRun(
        backend=backend_name, world=world, total_params=model_params, shard_names=names,
        rank_elements=rank_elements, rank_blocks=rank_blocks,
        backend_elements=sum(s.numel for s in shards), stored_elements=stored,
        dtype=cfg.model.dtype, forwards=dry.forwards,
        calibration_steps=step, collectives=list(calls), noise_blocks=Counter(blocks),
    )


def format_dry_run(run: DryRun, job: str) -> str:
    ops = Counter(c["op"] for c in run.collectives)
    elements = sorted(set(run.rank_elements))
    where = ("one process" if run.backend == "single"
             else f"a fake process group of {run.world} rank(s)")
    lines = [
        f"dry run of {job}: backend {run.backend} on {where}; nothing computed",
        f"parameters: {run.total_params:,} in the model, {run.trainable_params:,} trainable in "
        f"{len(run.shard_names)} shards",
        f"per-rank trainable elements: min {min(run.rank_elements):,}, max "
        f"{max(run.rank_elements):,} ({len(elements)} distinct size(s)); rank 0's backend shards "
        f"hold {run.backend_elements:,}",
        f"rank 0 stores {run.stored_elements:,} elements of the model "
        f"({run.stored_elements * DTYPE_BYTES[run.dtype] / 1024**3:.2f} GiB in {run.dtype})",
        f"per-rank noise blocks per regeneration (2^{noise.BLOCK.bit_length() - 1} elements): "
        f"min {min(run.rank_blocks):,}, max {max(run.rank_blocks):,}",
    ]
    if run.calibration_steps:
        lines.append(f"calibration steps before the first training step: "
                     f"{run.calibration_steps}")
    lines += [
        f"one step on rank 0: {run.forwards} forwards, {sum(run.noise_blocks.values()):,} "
        f"noise blocks drawn ({len(run.noise_blocks):,} distinct)",
        f"collectives of the step (beyond the forwards' parameter gathers): "
        f"{len(run.collectives)}" + (": " + ", ".join(f"{n} x {op}" for op, n in ops.items())
                                     if ops else ""),
    ]
    for c in run.collectives:
        lines.append(f"  {c['op']}: {c['numel']:,} elements")
    return "\n".join(lines)
