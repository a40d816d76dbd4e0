"""``zopipe check-sharding``: the world-size-invariance harness.

Runs the same few MeZO steps on ``single`` (one process) and on ``fsdp`` and ``zero3`` (under
torchrun with N ranks), then compares, element by element at their global offsets:

- the perturbation each rank writes for its shard (what its forwards see at ``θ + εz``) against
  the single-process one (must be 0),
- the loss of a perturbed forward of the whole global batch on every rank (the gathered,
  perturbed weights are bitwise those of the single process, so this must differ by 0), and
  whether that forward left the stored shards as they were (it must),
- the per-step losses and projected gradients,
- the final parameters.

A worker writes, per rank, the perturbation and the final shards (safetensors with
global offsets) and its step records; the driver assembles and compares them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.metrics import read_jsonl
from pipeline.zo.methods import StepContext
from pipeline.zo.perturbation import Perturbation
from pipeline.zo.shard_io import load_shards, save_shards
from pipeline.zo.shards import ParamShard

PROBE_SEED = 12345


def worker(config: str | None, overrides: list[str], out: Path, steps: int) -> None:
    """One rank: record its perturbation, run ``steps`` MeZO steps, save the shards."""
    from pipeline.train import build

    cfg = load_config(config, overrides)
    backend, method, data = build(cfg)
    shards = backend.shards()
    at = Perturbation.dense(PROBE_SEED, cfg.method.eps)
    applied = []
    for s in shards:
        seen = torch.empty_like(s.local)
        at.write(s, seen)
        applied.append(ParamShard(s.name, s.shape, s.start, (seen.float() - s.local.float()).cpu()))
    out.mkdir(parents=True, exist_ok=True)
    save_shards(applied, out / f"perturbation-rank{backend.rank}.safetensors")
    stored = [s.local.detach().clone() for s in shards]
    whole = data.train_batch(0, cfg.train.batch_size, cfg.train.seed, 0, 1)
    probe = {"probe_loss": backend.loss(whole, at).item()}
    probe["stored_unchanged"] = all(torch.equal(a.view(torch.uint8), s.local.view(torch.uint8))
                                    for a, s in zip(stored, shards))
    records = []
    for step in range(steps):
        batch = data.train_batch(step, cfg.train.batch_size, cfg.train.seed, backend.rank,
                                 backend.world_size)
        stats = method.step(StepContext(step, cfg.train.seed, cfg.method.lr, batch, backend))
        records.append({"step": step + 1, "loss": stats.loss,
                        "projected_grad": stats.projected_grad})
    save_shards(shards, out / f"final-rank{backend.rank}.safetensors")
    (out / f"probe-rank{backend.rank}.json").write_text(json.dumps(probe))
    if backend.rank == 0:
        (out / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    backend.close()


def _assemble(ref: list[ParamShard], files: list[Path]) -> list[ParamShard]:
    """Whole parameters rebuilt from saved slices, shaped like the reference shards."""
    out = [ParamShard(s.name, s.shape, 0, torch.zeros(s.total, dtype=s.local.dtype)) for s in ref]
    load_shards(out, files)
    return out


def _max_diff(a: list[ParamShard], b: list[ParamShard]) -> float:
    return max((x.local.double() - y.local.double()).abs().max().item() for x, y in zip(a, b))


def run_check(config: str | None, overrides: list[str], nproc: int, steps: int, out: Path,
              backends: tuple[str, ...] = ("fsdp", "zero3")) -> dict[str, dict[str, float]]:
    """Run every backend and return ``{backend: {perturbation, probe_loss, loss, projected_grad,
    params}}``, maximum absolute differences against the single-process run, and
    ``stored_unchanged`` (every rank's stored shards untouched by a perturbed forward)."""
    base = [*overrides, "tracking.enabled=false"]
    runs = {"single": (["parallel.backend=single"], 1)}
    runs.update({b: ([f"parallel.backend={b}"], nproc) for b in backends})
    for name, (extra, n) in runs.items():
        cmd = ["-m", "pipeline.sharding_check", str(out / name), str(steps), config or "-",
               *base, *extra]
        if n > 1:
            cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *cmd]
        subprocess.run([sys.executable, *cmd], check=True)

    def shards_of(name: str, prefix: str) -> list[Path]:
        return sorted((out / name).glob(f"{prefix}-rank*.safetensors"))

    ref_files = shards_of("single", "perturbation")
    ref_perturb = _load_whole(ref_files)
    ref_final = _load_whole(shards_of("single", "final"))
    ref_steps = read_jsonl(out / "single" / "steps.jsonl")

    def probes(name: str) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((out / name).glob("probe-rank*.json"))]

    ref_probe = probes("single")[0]["probe_loss"]
    report = {}
    for name in backends:
        got_steps = read_jsonl(out / name / "steps.jsonl")
        report[name] = {
            "probe_loss": max(abs(p["probe_loss"] - ref_probe) for p in probes(name)),
            "stored_unchanged": all(p["stored_unchanged"] for p in probes(name)),
            "perturbation": _max_diff(ref_perturb, _assemble(ref_perturb,
                                                             shards_of(name, "perturbation"))),
            "loss": max(abs(a["loss"] - b["loss"]) for a, b in zip(ref_steps, got_steps)),
            "projected_grad": max(abs(a["projected_grad"][0] - b["projected_grad"][0])
                                  for a, b in zip(ref_steps, got_steps)),
            "params": _max_diff(ref_final, _assemble(ref_final, shards_of(name, "final"))),
        }
    return report


def _load_whole(files: list[Path]) -> list[ParamShard]:
    from safetensors import safe_open

    with safe_open(str(files[0]), "pt") as f:
        layout = json.loads(f.metadata()["layout"])
        dtypes = {k: f.get_slice(k).get_dtype() for k in layout}
    shards = []
    for name, entry in layout.items():
        total = 1
        for d in entry["shape"]:
            total *= d
        dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtypes[name]]
        shards.append(ParamShard(name, tuple(entry["shape"]), 0, torch.zeros(total, dtype=dtype)))
    load_shards(shards, files)
    return shards


if __name__ == "__main__":
    out_dir, n_steps, job, *rest = sys.argv[1:]
    torch.set_num_threads(1)
    worker(None if job == "-" else job, rest, Path(out_dir), int(n_steps))
