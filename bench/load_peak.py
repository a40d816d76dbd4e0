"""Peak host memory per rank while a sharded backend loads the model, as a share of the model.

Each (backend, dtype, path) is a fresh ``torchrun`` of 2 ranks running this file with
``--worker``. A rank imports everything and joins the process group first, then resets its
high-water mark (``echo 5 > /proc/self/clear_refs``: VmHWM restarts from the current RSS;
``ru_maxrss`` cannot be reset, and survives exec from torchrun), builds the backend, and reports
``VmHWM - RSS before``: the peak that loading added, anonymous and file-backed (mapped checkpoint
pages count) alike. The ratio divides it by the model's bytes in its storage dtype (unique
parameters; the demo model is 134.5 M parameters). ``precision.master_weights=none``: fp32
masters are training state, not loading.

Paths: ``new`` is the backend's ``from_config`` as it is now (fsdp: meta-device build, shard,
read each rank's rows; zero3: ``zero.Init`` build, read each rank's partition); ``old`` is what
it did before sharded loading (fsdp: ``from_pretrained`` of the whole model, then
``fully_shard``; zero3: ``from_pretrained`` under ``HfDeepSpeedConfig``, where transformers reads
every checkpoint file whole on rank 0 and gathers each module to copy it in).

Usage: python bench/load_peak.py [JOB.yaml] [key=value ...] [--backends fsdp,zero3]
       [--dtypes fp32,bf16] [--paths old,new] [--nproc-per-node 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _load(cfg, backend: str, path: str):
    from pipeline.parallel import wants_master
    from pipeline.parallel.distributed import init_process_group

    if backend == "fsdp":
        from pipeline.parallel.fsdp import FSDPBackend

        if path == "new":
            return FSDPBackend.from_config(cfg)
        from pipeline.models.tuning import load_tuned_model, tuned_names

        device = init_process_group(cfg.model.device)
        model = load_tuned_model(cfg, device)
        return FSDPBackend(model, tuned_names(model, cfg), device, master=wants_master(cfg))
    from pipeline.parallel.zero3 import Zero3Backend

    if path == "new":
        return Zero3Backend.from_config(cfg)
    return _zero3_from_pretrained(cfg)


def _zero3_from_pretrained(cfg):
    """The zero3 backend as it loaded before sharded loading: ``from_pretrained`` under
    ``HfDeepSpeedConfig`` (transformers builds under ``zero.Init`` and copies the checkpoint in
    module by module, gathered, from rank 0's copy of every file)."""
    import copy

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from pipeline.models.loading import DTYPES, model_path
    from pipeline.models.tuning import tuned_names
    from pipeline.parallel import wants_master
    from pipeline.parallel.zero3 import (
        Zero3Backend,
        _import_deepspeed,
        default_ds_config,
        prepare_ds_config,
        read_ds_config,
    )

    deepspeed = _import_deepspeed(cfg.model.device)
    ds_config = prepare_ds_config(read_ds_config(default_ds_config(cfg.model.dtype)),
                                  dtype=cfg.model.dtype, batch_size=cfg.train.batch_size,
                                  world_size=dist.get_world_size())
    hf_ds_config = HfDeepSpeedConfig(copy.deepcopy(ds_config))
    model = AutoModelForCausalLM.from_pretrained(model_path(cfg.model.name_or_path),
                                                 dtype=DTYPES[cfg.model.dtype])
    model.requires_grad_(False)
    model.eval()
    names = tuned_names(model, cfg)
    engine, *_ = deepspeed.initialize(model=model, config=copy.deepcopy(ds_config))
    engine.eval()
    return Zero3Backend(engine, names, engine.device, master=wants_master(cfg),
                        hf_ds_config=hf_ds_config)


def worker(out: str, backend: str, dtype: str, path: str, job: str, overrides: list[str]) -> None:
    import torch

    from pipeline.config import load_config
    from pipeline.models.loading import DTYPES
    from pipeline.models.meta import meta_model

    torch.set_num_threads(1)
    cfg = load_config(job, [*overrides, f"parallel.backend={backend}", f"model.dtype={dtype}",
                            "precision.master_weights=none", "model.device=cpu"])
    # everything imported and the process group up before the baseline
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from pipeline.models.loading import model_path

    if backend == "zero3":
        from pipeline.parallel.zero3 import _import_deepspeed

        deepspeed = _import_deepspeed("cpu")
    from pipeline.parallel.distributed import init_process_group

    init_process_group("cpu")
    if backend == "zero3":
        import torch.distributed as dist

        deepspeed.init_distributed(dist_backend=dist.get_backend())
    meta = meta_model(replace(cfg.model, config_for_planning=model_path(cfg.model.name_or_path)))
    model_bytes = sum(p.numel() for p in meta.parameters()) * DTYPES[dtype].itemsize
    del meta

    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    built = _load(cfg, backend, path)
    seconds = time.perf_counter() - start
    peak, after = _status_kb("VmHWM"), _status_kb("VmRSS")
    record = {"rank": built.rank, "model_bytes": model_bytes, "before_kb": before,
              "peak_kb": peak, "after_kb": after, "seconds": seconds}
    Path(f"{out}.rank{built.rank}").write_text(json.dumps(record))
    built.close()


def measure(args, backend: str, dtype: str, path: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peak")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc_per_node}", __file__, "--worker", out, backend,
               dtype, path, args.job, *args.overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{backend} {dtype} {path} failed:\n{proc.stderr[-4000:]}")
        return [json.loads(Path(f"{out}.rank{r}").read_text())
                for r in range(args.nproc_per_node)]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        out, backend, dtype, path, job, *overrides = sys.argv[2:]
        worker(out, backend, dtype, path, job, overrides)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", default="jobs/demo.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--nproc-per-node", type=int, default=2)
    parser.add_argument("--backends", default="fsdp,zero3")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--paths", default="old,new")
    args = parser.parse_args()
    ranks = args.nproc_per_node
    print(f"{'backend':8s} {'dtype':5s} {'path':4s} {'model MB':>9s} "
          + " ".join(f"{f'peak/model r{r}':>14s}" for r in range(ranks))
          + f" {'after/model':>11s} {'load s':>7s}", flush=True)
    for backend in args.backends.split(","):
        for dtype in args.dtypes.split(","):
            for path in args.paths.split(","):
                recs = measure(args, backend, dtype, path)
                size = recs[0]["model_bytes"]
                peaks = [(r["peak_kb"] - r["before_kb"]) * 1024 / size for r in recs]
                after = max((r["after_kb"] - r["before_kb"]) * 1024 / size for r in recs)
                print(f"{backend:8s} {dtype:5s} {path:4s} {size / 1e6:9.1f} "
                      + " ".join(f"{p:14.3f}" for p in peaks)
                      + f" {after:11.3f} {max(r['seconds'] for r in recs):7.1f}", flush=True)
    print(f"(peak/model: VmHWM - RSS before the load, per rank, over the model's bytes; "
          f"{ranks} ranks, 1 thread each)")


if __name__ == "__main__":
    main()
