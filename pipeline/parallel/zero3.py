"""DeepSpeed ZeRO-3 backend: ``deepspeed.initialize`` with no optimizer, forward passes only.

The model is built on the meta device, partitioned one unit at a time with
``deepspeed.zero.Init(module=...)`` (:func:`_partition`), and each rank then reads only its
partitions from the checkpoint files (:mod:`pipeline.models.sharded_load`), so no rank ever holds
the whole model, or a whole checkpoint file. Each parameter is then a
placeholder of size 0 plus its partition ``p.ds_tensor``: a flat tensor of ``ps = ceil(N / ws)``
elements, rank ``r`` holding global elements ``[r*ps, min((r+1)*ps, N))``. The tail of the last
partition is padding (uninitialised memory that the all-gather drops); a shard covers only the
owned elements, so padding never receives noise. A rank that owns nothing of a tiny parameter
keeps a 0-length shard, so every rank has the same list of shards.

Each forward all-gathers the partitions module by module. A perturbed forward swaps a transient
perturbed copy of a module's partitions in for DeepSpeed's gather of that module and back right
after it (:mod:`pipeline.parallel.swap_delivery`), so the stored partitions are never written
while measuring; updates go into ``ds_tensor`` in place. For every forward to see the partitions
as they are:

- ``stage3_param_persistence_threshold`` must be 0 (DeepSpeed's default 1e5 keeps small
  parameters gathered for good, and neither a perturbation nor an update would reach them);
- ``stage3_prefetch_bucket_size`` is 0: a prefetched module is gathered before its own hooks run,
  so it would miss its perturbation (the cost: no overlap of a module's gather with the previous
  module's compute on GPUs);
- after every forward, ``DeepSpeedZeRoOffload.partition_all_parameters()`` (the coordinator's
  ``release_and_reset_all``: release every gathered parameter) runs and raises if any parameter
  is still available.

``memory_efficient_linear`` is always turned off: left on, ``zero.Init`` swaps
``torch.nn.functional.linear`` process-wide for a backward-memory saver that rounds differently.

Forwards are collectives: every rank must call :meth:`loss` / :meth:`scores` the same number of
times, in the same order (give every rank the same number of batches).
"""

from __future__ import annotations

import copy
import gc
import importlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.models.sharded_load import skeleton
from pipeline.models.tuning import tuned_names
from pipeline.parallel import make_shard, wants_master
from pipeline.parallel.distributed import DistributedBackend, init_process_group
from pipeline.parallel.fused import FusedEvaluation
from pipeline.parallel.swap_delivery import SwapDelivery

DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


class Zero3ConfigError(ValueError):
    """A DeepSpeed config the zero3 backend cannot run; the message says what to change."""


def default_ds_config(dtype: str) -> Path:
    path = DS_CONFIGS / f"zero3_{dtype}.json"
    if not path.is_file():
        raise Zero3ConfigError(
            f"{path} not found: the default DeepSpeed configs live in the repository's ds_configs/ "
            "directory (not in an installed wheel); set parallel.ds_config to a DeepSpeed JSON file"
        )
    return path


def read_ds_config(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise Zero3ConfigError(f"parallel.ds_config={str(path)!r}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise Zero3ConfigError(f"parallel.ds_config={str(path)!r}: not valid JSON ({exc})") \
            from None
    if not isinstance(data, dict):
        raise Zero3ConfigError(f"parallel.ds_config={str(path)!r}: must hold a JSON object")
    return data


def prepare_ds_config(raw: dict, *, dtype: str, batch_size: int, world_size: int) -> dict:
    """The DeepSpeed config the backend runs with: ``raw`` checked for forward-only ZeRO-3, with
    the batch sizes and precision flags set from the job config."""
    ds = copy.deepcopy(raw)
    zero = ds.setdefault("zero_optimization", {})
    errors = []
    if zero.get("stage") != 3:
        errors.append(f"zero_optimization.stage is {zero.get('stage')!r}; zero3 needs 3")
    if "optimizer" in ds or "scheduler" in ds:
        errors.append("remove the optimizer/scheduler sections: ZO updates the partitions itself, "
                      "and a DeepSpeed optimizer would allocate gradients and fp32 states")
    threshold = zero.setdefault("stage3_param_persistence_threshold", 0)
    if threshold != 0:
        errors.append(f"zero_optimization.stage3_param_persistence_threshold is {threshold}; it "
                      "must be 0 (persistent parameters stay gathered and would not see "
                      "perturbations of their partitions)")
    prefetch = zero.setdefault("stage3_prefetch_bucket_size", 0)
    if prefetch != 0:
        errors.append(f"zero_optimization.stage3_prefetch_bucket_size is {prefetch}; it must be 0 "
                      "(a prefetched module is gathered before its perturbation is written)")
    if int(zero.get("zero_hpz_partition_size", 1)) > 1:
        errors.append("zero_optimization.zero_hpz_partition_size > 1 is not supported (the "
                      "secondary partition copy would not see perturbations)")
    for key in ("zero_quantized_weights", "zero_quantized_nontrainable_weights"):
        if zero.get(key):
            errors.append(f"zero_optimization.{key} is not supported (partitions must be "
                          "floating point to be perturbed)")
    if (zero.get("offload_param") or {}).get("device") == "nvme":
        errors.append("zero_optimization.offload_param.device=nvme is not supported (partitions "
                      "swapped out to NVMe cannot be perturbed in place); use cpu")
    # zero.Init would otherwise replace torch.nn.functional.linear for the whole process with
    # DeepSpeed's autograd Function (matmul, then a separate bias add): it saves memory only in a
    # backward pass, which ZO never runs, and it rounds differently from F.linear in 16 bits.
    zero["memory_efficient_linear"] = False
    if errors:
        raise Zero3ConfigError("DeepSpeed config:\n" + "\n".join(f"  - {e}" for e in errors))

    micro = max(1, batch_size // world_size)
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro * world_size
    if "bfloat16" in ds:  # DeepSpeed's alias of "bf16"
        ds["bf16"] = {**ds.pop("bfloat16"), **ds.get("bf16", {})}
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": dtype == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": dtype == "fp16"}
    return ds


def owned_range(numel: int, partition: int, rank: int) -> tuple[int, int]:
    """``(start, count)`` of the global elements rank ``rank`` holds in its partition of
    ``partition`` elements (``ceil(numel / world size)``); the rest of the partition is padding."""
    start = min(rank * partition, numel)
    return start, max(0, min(partition, numel - start))


def _extensions_dir() -> Path:
    """Where DeepSpeed's JIT-compiled ops (the CPU shm comm op, ~45 s to build) are cached, keyed
    by Python and torch versions so an upgrade never loads a stale build."""
    from pipeline.assets import cache_root

    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    return cache_root() / "torch_extensions" / tag.replace("+", "_")


def _import_deepspeed(device_name: str):
    """Import DeepSpeed (with its CPU accelerator when the model runs on the CPU) and the modules
    that would otherwise pin the process group. Call before ``init_process_group``.

    DeepSpeed picks its accelerator at import time. And a module imported while the default group
    exists can capture it for good: ``torch.distributed.nn.functional`` (imported by
    ``torch._dynamo``, which ``transformers.modeling_utils`` imports) evaluates
    ``group=group.WORLD`` defaults at import, and DeepSpeed's accelerator module keeps two
    references too. A group pinned like that survives ``destroy_process_group()`` and is torn
    down, gloo/NCCL threads and all, only during interpreter shutdown.
    """
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_extensions_dir()))
    import deepspeed

    for name in ("torch.distributed.nn.functional", "transformers.modeling_utils"):
        importlib.import_module(name)
    return deepspeed


def _clear_caches(fn, depth: int = 3) -> None:
    """``cache_clear()`` the ``functools.lru_cache`` inside ``fn``'s decorators (DeepSpeed's
    ``instrument_w_nvtx`` wraps without ``functools.wraps``, so look in closures too)."""
    if fn is None or depth < 0:
        return
    if hasattr(fn, "cache_clear"):
        fn.cache_clear()
        return
    inner = [getattr(fn, "__wrapped__", None)]
    inner += [cell.cell_contents for cell in getattr(fn, "__closure__", None) or ()
              if callable(cell.cell_contents)]
    for f in inner:
        _clear_caches(f, depth - 1)


def _gathered_from(param) -> torch.Tensor:
    """What DeepSpeed gathers of a parameter: this rank's partition."""
    return param.ds_tensor


def _gather_pending(param) -> bool:
    """Whether DeepSpeed is about to gather ``param`` (its module's pre-forward hook is next)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if param.ds_status == ZeroParamStatus.INFLIGHT:
        raise Zero3ConfigError(f"{param.ds_summary()} was prefetched before its perturbation; set "
                               "zero_optimization.stage3_prefetch_bucket_size to 0")
    return param.ds_status == ZeroParamStatus.NOT_AVAILABLE


def _units(model) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """What :func:`_partition` converts one at a time: the modules outside the transformer
    blocks that hold parameters (embeddings, final norm, LM head), and the blocks."""
    from pipeline.parallel.fsdp import _blocks

    blocks = _blocks(model)
    inside = {id(m) for block in blocks for m in block.modules()}
    root = [m for m in model.modules()
            if id(m) not in inside and any(True for _ in m.parameters(recurse=False))]
    return root, blocks


def _partition(model, deepspeed, ds_config: dict, device: torch.device) -> None:
    """Turn the meta-device skeleton into ZeRO-3 parameters, one unit (:func:`_units`) at a time.

    ``deepspeed.zero.Init(module=m)`` partitions an existing module "as if it was constructed in
    the context"; it needs real tensors, and broadcasts each parameter from rank 0 before it
    partitions it (DeepSpeed's ``_zero_init_param``, unconditional; the values are garbage, the
    checkpoint fills the partitions next). So a unit's parameters get full-size storage just
    before it is converted, and lose it right after: a rank holds its partitions so far plus one
    unit. The root units (the embedding, an untied LM head: the largest parameters) go first,
    while few partitions exist, each in its own allocation; the blocks share one reused buffer
    (a fresh allocation per block would leave the heap fragmented by the freed ones). Building
    under a ``zero.Init`` context instead would allocate and broadcast every parameter the
    constructor makes, the ``lm_head`` that is tied away afterwards included. A tied parameter
    is converted once, with the first unit that holds it.
    """
    slots: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((module, name))
    root, blocks = _units(model)
    buffer = torch.empty(0, dtype=torch.uint8, device=device)
    for unit in [*root, *blocks]:
        metas = list({id(p): p for p in unit.parameters() if p.is_meta}.values())
        if not metas:
            continue
        sizes = [-(-p.numel() * p.element_size() // 64) * 64 for p in metas]  # aligned
        if unit not in root:
            if buffer.numel() < sum(sizes):
                buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
            storage = buffer
        else:
            storage = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        offset = 0
        for p, size in zip(metas, sizes):
            view = storage[offset : offset + p.numel() * p.element_size()]
            real = torch.nn.Parameter(view.view(p.dtype).view(p.shape), requires_grad=False)
            offset += size
            for owner, name in slots[id(p)]:
                owner._parameters[name] = real
        deepspeed.zero.Init(module=unit, config_dict_or_path=copy.deepcopy(ds_config))
        del storage
    del buffer
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device)


def _load_partitions(model, checkpoint) -> None:
    """Read each ZeRO-3 parameter's owned elements straight into its partition ``ds_tensor``.

    A partition is the flat element range ``[r * ps, r * ps + owned)`` of the parameter, one
    contiguous byte range of its checkpoint tensor: no rank gathers a parameter or reads another
    rank's part. The padding at the end of the last partition is left as allocated (the
    all-gather drops it). Buffers are not partitioned: every rank fills its own copy.
    """
    for name, p in model.named_parameters():
        part = p.ds_tensor
        start, owned = owned_range(p.ds_numel, part.numel(),
                                   dist.get_rank(group=p.ds_process_group))
        checkpoint.read(name, p.ds_shape, start, part.data.view(-1)[:owned])
    for name, b in model.named_buffers():
        checkpoint.read(name, b.shape, 0, b.data.view(-1))


class Zero3Backend(DistributedBackend):
    def __init__(self, engine, names: list[str], device, *, master: bool, hf_ds_config=None,
                 fused: bool = False):
        super().__init__(device)
        self.engine = engine
        self.model = engine.module
        self._hf_ds_config = hf_ds_config  # transformers reads it through a weakref; keep it
        self._offload = engine.optimizer  # DeepSpeedZeRoOffload: the parameter coordinator
        if not hasattr(self._offload, "partition_all_parameters"):
            raise Zero3ConfigError(
                f"deepspeed.initialize built {type(self._offload).__name__}, not the "
                "optimizer-free DeepSpeedZeRoOffload; remove the optimizer from the DeepSpeed "
                "config"
            )
        self.release()
        params = dict(self.model.named_parameters())
        self._shards = []
        for name in names:
            p = params[name]
            part = p.ds_tensor
            if part.numel() * dist.get_world_size(group=p.ds_process_group) < p.ds_numel:
                raise RuntimeError(f"{name}: partition of {part.numel()} elements is too small")
            start, owned = owned_range(p.ds_numel, part.numel(),
                                       dist.get_rank(group=p.ds_process_group))
            local = part.data.view(-1)[:owned]
            self._shards.append(make_shard(name, p.ds_shape, start, local, master=master))
        self._delivery = SwapDelivery(self.model, self._shards, params,
                                      holder=_gathered_from,
                                      gather_pending=_gather_pending,
                                      restore_after_forward=False,
                                      before_gather=self._gather_waits())
        # fp32 masters live only on their owning rank: a gathered weight cannot be perturbed
        # from them, so those runs evaluate sequentially
        self._fused = FusedEvaluation(self.model, self._shards, params) \
            if fused and not master else None

    @classmethod
    def from_config(cls, cfg) -> Zero3Backend:
        deepspeed = _import_deepspeed(cfg.model.device)
        device = init_process_group(cfg.model.device)
        # DeepSpeed's comm layer wraps our process group now, so that the configs parsed while
        # loading see the real world size.
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        from transformers.integrations import HfDeepSpeedConfig

        path = getattr(cfg.parallel, "ds_config", None) or default_ds_config(cfg.model.dtype)
        ds_config = prepare_ds_config(read_ds_config(path), dtype=cfg.model.dtype,
                                      batch_size=cfg.train.batch_size,
                                      world_size=dist.get_world_size())
        model, checkpoint = skeleton(cfg)
        _partition(model, deepspeed, ds_config, device)
        _load_partitions(model, checkpoint)
        # Made after the build: with it, transformers' from_config would build under zero.Init
        # and gather every module to initialise weights that the checkpoint then overwrites.
        hf_ds_config = HfDeepSpeedConfig(copy.deepcopy(ds_config))
        names = tuned_names(model, cfg)
        engine, *_ = deepspeed.initialize(model=model, config=copy.deepcopy(ds_config))
        engine.eval()
        return cls(engine, names, device, master=wants_master(cfg), hf_ds_config=hf_ds_config,
                   fused=cfg.train.fused_evaluations)

    def shards(self):
        return self._shards

    def release(self) -> None:
        """Partition every gathered parameter (and wait for in-flight prefetches); raises if one
        stays available. Collective-free: it only frees local memory."""
        self._offload.partition_all_parameters()

    def _gather_waits(self):
        """On CUDA: make DeepSpeed's gather stream wait for the perturbed buffers' writes."""
        if self.device.type != "cuda":
            return None
        coordinator = self._offload.get_param_coordinator()
        stream = getattr(coordinator, "_PartitionedParameterCoordinator__allgather_stream", None)
        if stream is None:
            return lambda: torch.cuda.current_stream().synchronize()
        return lambda: stream.wait_stream(torch.cuda.current_stream())

    def _release(self) -> None:
        self.release()

    def close(self, leave_group: bool = True) -> None:
        """Free the model while the interpreter is intact, then leave the process group.

        Every ZeRO parameter holds the process group (``p.ds_process_group``), and DeepSpeed keeps
        the model reachable from two globals that ``engine.destroy()`` leaves alone: the root
        module in ``parameter_offload.FWD_MODULE_STACK``, and every submodule in the class-level
        ``functools.lru_cache`` of ``PartitionedParameterCoordinator.__params_to_release`` (filled
        from the second forward on). Left there, the model, and through it the gloo/NCCL group,
        outlive ``destroy_process_group()`` and are torn down during interpreter shutdown, the
        group's C++ threads in whatever state exit left them in.
        """
        engine = getattr(self, "engine", None)
        if engine is not None:
            from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            self.release()
            engine.destroy()  # removes the ZeRO-3 module hooks
            stack = parameter_offload.FWD_MODULE_STACK
            stack[:] = [m for m in stack if m is not self.model]
            _clear_caches(getattr(partitioned_param_coordinator.PartitionedParameterCoordinator,
                                  "_PartitionedParameterCoordinator__params_to_release", None))
            unset_hf_deepspeed_config()
            self.engine = self.model = self._offload = self._hf_ds_config = None
            self._shards = []
            del engine
            gc.collect()
        super().close(leave_group)
