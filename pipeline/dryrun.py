"""``zopipe train JOB --dry-run``: the real backend and one step's bookkeeping, without a forward.

The job's world size (``parallel.nodes`` x ``parallel.gpus_per_node``) is simulated by PyTorch's
fake process group (``torch.testing._internal.distributed.fake_pg``): this process is rank 0 of
``W``, and every collective returns at once. On it:

1. **The real backend shards the meta-device model** (:mod:`pipeline.models.meta`): FSDP2
   ``fully_shard`` per block and root, as :class:`~pipeline.parallel.fsdp.FSDPBackend` does;
   ZeRO-3 partitions with DeepSpeed's own ``deepspeed.zero.Init`` and ``deepspeed.initialize``
   (:class:`~pipeline.parallel.zero3.Zero3Backend`). DeepSpeed cannot build a model on the meta
   device, so its ``Init`` is pointed at the meta device for both its local and its partition
   storage: DeepSpeed's partitioning code runs unchanged, the partitions hold no memory, and the
   weight initialisation is skipped (a real run loads the weights with ``from_pretrained``).
2. **Shard sizes for every rank** come from the libraries' own partition rules: DeepSpeed's
   partition size ``p.ds_tensor.ds_numel`` with the backend's :func:`owned_range`, and DTensor's
   ``Shard(0)`` chunking; rank 0's are checked against the backend's real ParamShards.
3. **One step of the method** runs on rank 0's shards (as meta views, with meta fp32 masters when
   the job has them), with a loss that computes no forward: it feeds zero activations (the
   micro-batch's rows, one position each, as a layer that sees only the last positions) to the
   pipeline's own forward hooks on ``nn.Linear`` modules (AGZO's and ZO-Act's activation capture,
   ZO-Act's adapters; never the backend's gather hooks) and returns 0. Each layer gets its own
   input tensor, so the sizes of AGZO's basis all-reduces are upper bounds (in a real forward
   q/k/v share one input); their number is exact. The noise blocks
   are recorded, not drawn. Every ``torch.distributed`` collective the step issues is counted with
   its element count; under the fake group an all-gather returns this rank's tensor from every
   rank. A method that calibrates first (ZO-Act) runs its calibration steps, and the step
   reported is its first training step. A perturbed forward writes every shard's perturbation
   once (what the backend's gather does), into meta buffers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pipeline.models.meta import hf_config, meta_model
from pipeline.parallel import trainable_names, wants_master
from pipeline.parallel.comm_count import OUTPUT_FIRST, tensors_in
from pipeline.plan import DTYPE_BYTES
from pipeline.zo import noise
from pipeline.zo.methods import StepContext, build_method

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "all_gather_object",
               "broadcast_object_list", "scatter", "gather", "all_to_all", "all_to_all_single",
               "send", "recv",
               "barrier")


class DryRunError(ValueError):
    """A job that cannot be dry-run as configured; the message says what to change."""


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


ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _fake_group(world: int, rank: int = 0) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise DryRunError("a dry run needs a process without a process group; run it outside "
                           "torchrun")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def _fsdp(cfg, world: int):
    from torch.distributed.tensor import Shard

    from pipeline.parallel.fsdp import FSDPBackend

    model = meta_model(cfg.model)
    names = trainable_names(model, cfg.model.trainable)
    backend = FSDPBackend(model, names, torch.device("cpu"), master=wants_master(cfg))
    params = dict(backend.model.named_parameters())
    per_rank = []
    for name in names:
        d0 = params[name].shape[0]
        row = params[name].numel() // max(d0, 1)
        ranges = []
        for r in range(world):
            rows, first = Shard.local_shard_size_and_offset(d0, world, r)
            ranges.append((first * row if rows else 0, rows * row))
        per_rank.append(ranges)
    return backend, names, per_rank


def _zero3(cfg, world: int):
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from pipeline.parallel.zero3 import (
        Zero3Backend,
        _import_deepspeed,
        default_ds_config,
        owned_range,
        prepare_ds_config,
        read_ds_config,
    )

    deepspeed = _import_deepspeed("cpu")
    _fake_group(world)
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    path = cfg.parallel.ds_config or default_ds_config(cfg.model.dtype)
    ds_config = prepare_ds_config(read_ds_config(path), dtype=cfg.model.dtype,
                                  batch_size=cfg.train.batch_size, world_size=world)
    init = deepspeed.zero.Init(config_dict_or_path=copy.deepcopy(ds_config))
    init.local_device = init.remote_device = torch.device("meta")
    from pipeline.models.loading import DTYPES

    with no_init_weights(), init:
        model = AutoModelForCausalLM.from_config(hf_config(cfg.model),
                                                 dtype=DTYPES[cfg.model.dtype])
    model.tie_weights()  # no_init_weights also skips the tying that post_init does
    model.requires_grad_(False)
    model.eval()
    names = trainable_names(model, cfg.model.trainable)
    with _gpu_dtypes():
        engine, *_ = deepspeed.initialize(model=model, config=copy.deepcopy(ds_config))
    backend = Zero3Backend(engine, names, torch.device("cpu"), master=wants_master(cfg))
    params = dict(backend.model.named_parameters())
    per_rank = [[owned_range(params[n].ds_numel, params[n].ds_tensor.ds_numel, r)
                 for r in range(world)] for n in names]
    return backend, names, per_rank


@contextlib.contextmanager
def _gpu_dtypes():
    """DeepSpeed's CPU accelerator refuses fp16; the simulated ranks are GPUs, which take it."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    original = accelerator.is_fp16_supported
    accelerator.is_fp16_supported = lambda: True
    try:
        yield
    finally:
        accelerator.is_fp16_supported = original


def _single(cfg):
    from pipeline.parallel.single import SingleBackend

    model = meta_model(cfg.model)
    names = trainable_names(model, cfg.model.trainable)
    backend = SingleBackend(model, names, "meta", master=wants_master(cfg))
    params = dict(model.named_parameters())
    return backend, names, [[(0, params[n].numel())] for n in names]


@dataclass
class _Batch:
    attention_mask: torch.Tensor

    def to(self, device):
        del device
        return self


class _DryBackend:
    """The real backend, with a loss that runs no forward (see the module docstring)."""

    def __init__(self, backend, micro_batch: int, shards):
        self._backend = backend
        self._shape = (micro_batch, 1)
        self._shards = shards
        self.forwards = 0

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def loss(self, batch, at=None) -> torch.Tensor:
        del batch
        self.forwards += 1
        if at is not None:  # what the backend's gather would write, shard by shard (on meta)
            for shard in self._shards:
                at.write(shard, torch.empty(shard.numel, dtype=shard.local.dtype, device="meta"))
        for module in self._backend.model.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            pre = [h for h in module._forward_pre_hooks.values() if _ours(h)]
            post = [h for h in module._forward_hooks.values() if _ours(h)]
            if not pre and not post:
                continue
            x = torch.zeros(*self._shape, module.in_features)
            for hook in pre:
                hook(module, (x,))
            y = torch.zeros(*self._shape, module.out_features)
            for hook in post:
                hook(module, (x,), y)
        return torch.zeros((), dtype=torch.float32)


def _stored(p) -> int:
    """Elements this rank stores of ``p``: its ZeRO-3 partition, its FSDP2 local shard, or all."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.ds_numel
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def _ours(hook) -> bool:
    return getattr(hook, "__module__", "").startswith("pipeline.")


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
            numel = sum(t.numel() for t in tensors_in([*sent, *kwargs.values()]))
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
    backend = None
    saved_env = {k: os.environ.get(k) for k in ENV}
    try:
        if backend_name == "fsdp":
            _fake_group(world)
            backend, names, per_rank = _fsdp(cfg, world)
        elif backend_name == "zero3":
            backend, names, per_rank = _zero3(cfg, world)
        else:
            backend, names, per_rank = _single(cfg)
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
        dry = _DryBackend(backend, cfg.train.batch_size // world, method.shards)
        batch = _Batch(torch.ones(cfg.train.batch_size // world, cfg.data.max_length,
                                  dtype=torch.bool))
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
    finally:
        if backend is not None:
            backend.close()
        if dist.is_initialized():  # the backend failed to build on the fake group
            dist.destroy_process_group()
        for key, value in saved_env.items():  # the fake group's rendezvous variables go
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
