"""Rank worker: a sharded backend's load against the full load, and what it allocates.

argv: OUT_DIR BACKEND MODEL_DIR; run under torchrun. For each case (fp32, bf16, and on fsdp bf16
with LoRA) the rank builds the backend with ``from_config`` while :class:`Allocations` counts
every tensor that torch ops create on it, then compares, bitwise, what it holds with the old
path's: on fsdp the full ``from_pretrained`` load (plus peft) then ``FSDPBackend.__init__``'s
``fully_shard``, on zero3 the owned flat slice of the fully loaded parameter (which is what
``from_pretrained`` under ``HfDeepSpeedConfig`` partitions). It saves ``rank<r>.pt``: per case
the names that differ (parameters, buffers, ParamShards), the allocation totals, and the sizes
the test bounds them with.
"""

import math
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.config import load_config


class Allocations(TorchDispatchMode):
    """Counts the tensors torch ops create (results that alias no input) off the meta device:
    their total bytes and the largest element count. A DTensor result counts its local tensor."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        for ret, t in zip(func._schema.returns, results):
            if ret.alias_info is not None or not isinstance(t, torch.Tensor):
                continue
            local = getattr(t, "_local_tensor", t)
            if local.device.type != "meta":
                self.bytes += local.numel() * local.element_size()
                self.largest = max(self.largest, local.numel())
        return out


def _config(model_dir, backend, dtype, tuning):
    return load_config(None, [f"model.name_or_path={model_dir}", f"parallel.backend={backend}",
                              f"model.dtype={dtype}", "model.device=cpu", f"method.tuning={tuning}",
                              "precision.master_weights=fp32", "train.batch_size=2"])


def _bits(t):
    return t.detach().reshape(-1).view(torch.uint8)


def _differ(a: dict, b: dict) -> list[str]:
    if list(a) != list(b):
        return ["<names>"]
    return [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(_bits(a[n]), _bits(b[n]))]


def _fsdp_case(model_dir, dtype, tuning) -> dict:
    from pipeline.models.tuning import load_tuned_model, tuned_names
    from pipeline.parallel.fsdp import FSDPBackend

    cfg = _config(model_dir, "fsdp", dtype, tuning)
    with Allocations() as new_alloc:
        new = FSDPBackend.from_config(cfg)
    model = load_tuned_model(cfg, torch.device("cpu"))
    old = FSDPBackend(model, tuned_names(model, cfg), new.device, master=True)
    local = {n: p.to_local() for n, p in new.model.named_parameters()}
    result = {
        "params": _differ(local, {n: p.to_local() for n, p in old.model.named_parameters()}),
        "buffers": _differ(dict(new.model.named_buffers()), dict(old.model.named_buffers())),
        "shards": _differ({s.name: s.local for s in new.shards()},
                          {s.name: s.local for s in old.shards()})
        + _differ({s.name: s.master for s in new.shards()},
                  {s.name: s.master for s in old.shards()})
        + [s.name for s, o in zip(new.shards(), old.shards()) if s.start != o.start],
        "n_shards": len(new.shards()),
        "adapters": sum(".lora_A." in n or ".lora_B." in n for n in local),
        "adapter_bytes": sum(p.numel() * p.element_size() for n, p in new.model.named_parameters()
                             if ".lora_A." in n or ".lora_B." in n),
        # the ParamShards view the model's storage (a write through one is seen by the other)
        "shards_alias": all(s.local.untyped_storage().data_ptr()
                            == local[s.name].untyped_storage().data_ptr() for s in new.shards()),
        "new_bytes": new_alloc.bytes, "new_largest": new_alloc.largest,
        "local_bytes": sum(t.numel() * t.element_size() for t in local.values()),
        "masters_bytes": sum(4 * s.numel for s in new.shards()),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in new.model.buffers()),
        # FSDP2 pads every local shard to ceil(d0 / world) rows
        "padded_bytes": sum(-(-p.shape[0] // 2) * (p.numel() // p.shape[0]) * p.element_size()
                            for p in new.model.parameters()),
        "largest_padded": max(-(-p.shape[0] // 2) * (p.numel() // p.shape[0])
                              for p in new.model.parameters()),
        "largest_full": max(p.numel() for p in new.model.parameters()),
        "model_bytes": sum(p.numel() * p.element_size() for p in new.model.parameters()),
    }
    if tuning == "full":
        result["tied"] = new.model.lm_head.weight is new.model.model.embed_tokens.weight
    return result


def _zero3_case(model_dir, dtype) -> dict:
    import torch.distributed as dist

    from pipeline.models.loading import load_model
    from pipeline.parallel.zero3 import Zero3Backend, _units, owned_range

    cfg = _config(model_dir, "zero3", dtype, "full")
    # before the backend: while its HfDeepSpeedConfig lives, from_pretrained partitions too
    full = load_model(cfg.model, torch.device("cpu"))
    with Allocations() as alloc:
        backend = Zero3Backend.from_config(cfg)
    want = dict(full.named_parameters())
    got, expected = {}, {}
    rank = dist.get_rank()
    for name, p in backend.model.named_parameters():
        start, owned = owned_range(p.ds_numel, p.ds_tensor.numel(), rank)
        got[name] = p.ds_tensor.view(-1)[:owned]
        expected[name] = want[name].reshape(-1)[start : start + owned]
    root, blocks = _units(backend.model)
    numel = {id(p): p.ds_numel for p in backend.model.parameters()}

    def full_bytes(*units):
        unique = {id(p): p for u in units for p in u.parameters()}.values()  # tied: once
        return sum(numel[id(p)] * p.element_size() for p in unique)

    result = {
        "params": _differ(got, expected),
        "buffers": _differ(dict(backend.model.named_buffers()), dict(full.named_buffers())),
        "shards": _differ({s.name: s.local for s in backend.shards()},
                          {s.name: got[s.name] for s in backend.shards()}),
        "n_shards": len(backend.shards()),
        "tied": backend.model.lm_head.weight is backend.model.model.embed_tokens.weight,
        "new_bytes": alloc.bytes,
        "partition_bytes": sum(p.ds_tensor.numel() * p.element_size()
                               for p in backend.model.parameters()),
        "masters_bytes": sum(4 * s.numel for s in backend.shards()),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in backend.model.buffers()),
        "root_full_bytes": full_bytes(*root),
        "block_full_bytes": max(full_bytes(b) for b in blocks),
        "model_bytes": sum(math.prod(p.ds_shape) * p.element_size()
                           for p in backend.model.parameters()),
    }
    return result, backend


def main() -> None:
    out, backend, model_dir = sys.argv[1:]
    torch.set_num_threads(1)
    results = {}
    if backend == "fsdp":
        for dtype, tuning in [("fp32", "full"), ("bf16", "full"), ("bf16", "lora")]:
            results[f"{dtype}-{tuning}"] = _fsdp_case(model_dir, dtype, tuning)
        import torch.distributed as dist

        rank = dist.get_rank()
        dist.destroy_process_group()
    else:
        from pipeline.parallel.zero3 import _import_deepspeed

        _import_deepspeed("cpu")
        for dtype in ["fp32", "bf16"]:
            results[f"{dtype}-full"], built = _zero3_case(model_dir, dtype)
            rank = built.rank
            # one process group for both cases: re-creating it under torchrun's store could
            # hang or fail to connect
            built.close(leave_group=dtype == "bf16")
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save(results, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
