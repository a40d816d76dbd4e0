"""Learning evidence: runs at a forward budget, held-out curves, and a table of paired changes.

Runs the runs of a spec file (``jobs/learning/*.yaml``), each a recipe plus overrides, for the
same budget of forward passes (``train.max_forwards``), evaluating ``train.eval_split`` (the
curve, validation by default) every ``eval_every`` steps and ``train.final_split`` (test) before
and after. Then writes into ``--out``:

- ``learning.md``: per run the steps, forwards, time per step, peak memory (VmHWM of the run's
  process), the validation change (what selection uses: in each group the run with the lowest
  validation loss is marked selected), and on the test split the zero-shot and final loss and
  accuracy with the paired changes against zero-shot and against the selected run of the
  reference group (the first, or ``reference:``): mean per-example difference ± paired SE, its
  size in SE (z), and McNemar's exact p for accuracy;
- ``learning.png``: held-out loss and accuracy of the curve split against forward passes, one
  line per run, bands ± the paired SE of the change from zero-shot;
- ``learning.json``: the same rows, machine-readable.

Every run logs to MLflow (``<out>/mlflow.db``, experiment ``experiment:``) as a child of one
parent run (the sweep mechanism of :mod:`pipeline.sweep`), which also gets the three files. The
bench is resumable: a run with a ``summary.json`` is done and skipped; an interrupted run
resumes from its latest checkpoint (``checkpoint.every``), continuing its MLflow run; rerun the
same command. A spec file::

    budget: 1000                 # forward passes per run
    eval_every: 100              # steps between evaluations of the curve split
    experiment: learning-rt      # MLflow experiment
    reference: mezo              # the group the others are paired with (default: the first)
    overrides: {train.threads: 1}          # every run
    runs:                        # a group each; `sweep` expands it into one run per value
      - {name: mezo, recipe: jobs/demo.yaml, sweep: {method.lr: [1.0e-5, 3.0e-5]}}
      - {name: bszo, recipe: jobs/bszo.yaml, method.lr: 1.0e-5}
    grid: {train.seed: [0, 1]}   # optional: every run at every combination

Usage: python bench/learning.py SPEC [--out DIR] [--only NAME,...] [--report] [key=value ...]
(``key=value`` overrides apply to every run, after the spec's.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.heldout import heldout_curve, last_evaluation, plot_heldout
from pipeline.metrics import read_jsonl, write_json
from pipeline.sweep import PARENT_FILE, SWEEP_DIR_ENV

SPEC_KEYS = {"budget", "eval_every", "experiment", "reference", "overrides", "runs", "grid"}
PEAK_FILE = "peak_memory.json"

# Runs `zopipe train` in this process, then records its peak resident memory (VmHWM: this
# process's own high-water mark; ru_maxrss would carry the parent's over exec).
WRAPPER = """
import json, os, sys
from pipeline.cli import main
try:
    main(sys.argv[2:], standalone_mode=False)
finally:
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
    path = sys.argv[1]
    old = json.load(open(path))["peak_rss_kib"] if os.path.exists(path) else 0
    json.dump({"peak_rss_kib": max(hwm, old)}, open(path, "w"))
"""


class SpecError(ValueError):
    """A spec file that cannot be run; the message shows the expected form."""


def _value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**9).strip().removesuffix(
        "...").strip()


def load_spec(path: Path) -> dict:
    """The spec with its runs expanded: ``runs`` becomes ``[(name, group, recipe, [key=value])]``,
    one per combination of the run's ``sweep`` and the spec's ``grid`` (the group is the run's
    name in the spec; the name gets ``-key=value`` suffixes)."""
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read {path}: {exc}") from None
    unknown = set(spec) - SPEC_KEYS if isinstance(spec, dict) else {"(not a mapping)"}
    runs = spec.get("runs") if not unknown else None
    if unknown or not isinstance(runs, list) or not runs or not all(
            isinstance(r, dict) and "name" in r and "recipe" in r for r in runs):
        raise SpecError(f"{path}: expected budget, eval_every and runs: [{{name, recipe, "
                        f"key: value...}}] (unknown keys: {sorted(unknown) or 'none'})")
    if not isinstance(spec.get("budget"), int) or spec["budget"] < 1:
        raise SpecError(f"{path}: budget must be a positive number of forward passes")
    expanded = []
    for run in runs:
        own = run.get("sweep") or {}
        grid = {**(spec.get("grid") or {}), **own}
        if not all(isinstance(v, list) and v for v in grid.values()):
            raise SpecError(f"{path}: grid and sweep map keys to lists of values")
        for vals in itertools.product(*grid.values()):
            combo = dict(zip(grid, vals))
            suffix = "".join(f"-{k.split('.')[-1]}={_value(v)}" for k, v in combo.items())
            keys = {k: v for k, v in run.items() if k not in ("name", "recipe", "sweep")} | combo
            expanded.append((run["name"] + suffix, run["name"], run["recipe"],
                             [f"{k}={_value(v)}" for k, v in keys.items()]))
    names = [n for n, _, _, _ in expanded]
    if len(set(names)) != len(names):
        raise SpecError(f"{path}: run names repeat: {names}")
    spec["runs"] = expanded
    spec["reference"] = spec.get("reference") or runs[0]["name"]
    if spec["reference"] not in {r["name"] for r in runs}:
        raise SpecError(f"{path}: reference {spec['reference']!r} is not a run")
    return spec


def run_one(name: str, recipe: str, overrides: list[str], spec: dict, out: Path) -> None:
    """Train (or resume) one run in ``out/name`` as a child of the bench's MLflow parent run."""
    run_dir = out / name
    every = spec.get("eval_every", 0)
    cmd = [sys.executable, "-c", WRAPPER, str(run_dir / PEAK_FILE), "train", recipe,
           "train.steps=100000000", f"train.max_forwards={spec['budget']}",
           f"train.eval_every={every}", f"checkpoint.every={every or 100}",
           "checkpoint.keep_last=1", f"tracking.experiment={spec.get('experiment', 'learning')}",
           *[f"{k}={_value(v)}" for k, v in (spec.get("overrides") or {}).items()], *overrides,
           "--run-dir", str(run_dir), "--no-progress"]
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[learning] {name}: zopipe {' '.join(cmd[4:])}", flush=True)
    env = {**os.environ, SWEEP_DIR_ENV: str(out)}
    subprocess.run(cmd, check=True, env=env)


def _config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def row(name: str, out: Path, ref: str | None) -> dict | None:
    """One finished run's figures (None while it has no summary), paired with run ``ref``."""
    run_dir = out / name
    if not (run_dir / "summary.json").is_file():
        return None
    s = json.loads((run_dir / "summary.json").read_text())
    cfg = _config(run_dir)
    test, curve = cfg["train"]["final_split"], cfg["train"]["eval_split"]
    val = [r for r in read_jsonl(run_dir / "metrics.jsonl")
           if r.get("split") == curve and "delta_loss" in r]
    peak = run_dir / PEAK_FILE
    out_row = {
        "name": name, "method": s["method"], "tuning": cfg["method"]["tuning"],
        "lr": cfg["method"]["lr"], "eps": cfg["method"]["eps"], "steps": s["steps"],
        "forwards": s["forwards"], "step_seconds": s["train_seconds"] / max(s["steps"], 1),
        "peak_rss_mib": (json.loads(peak.read_text())["peak_rss_kib"] / 1024
                         if peak.is_file() else None),
        "split": test, "zero_shot": s["zero_shot"], "final": s["final"], "vs_zero_shot":
        s["paired"], "curve_split": curve,
        "curve_end": max(val, key=lambda r: r["step"]) if val else None,
    }
    mine = last_evaluation(run_dir, test)
    theirs = last_evaluation(out / ref, test) if ref else None
    if name != ref and mine is not None and theirs is not None:
        out_row["vs_reference"] = mine.against(theirs).as_dict()
    return out_row


def _signed(value: float | None, se: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f} ± {se:.{digits}f}"


def _z(change: dict | None) -> str:
    if not change:
        return "-"
    se = change["delta_loss_se"]
    z = change["delta_loss"] / se if se else math.nan
    return (f"{_signed(change['delta_loss'], se, 4)} ({z:+.1f} SE); "
            f"{_signed(change['delta_accuracy'], change['delta_accuracy_se'], 3)} "
            f"(p={change['mcnemar_p']:.2g})")


def table(rows: list[dict], ref: str | None, best: set[str]) -> str:
    """The markdown table of :func:`row` rows."""
    head = ("| run | method | lr | steps | forwards | s/step | peak MiB | "
            "val. Δ loss (z) | test loss: zero-shot → final | test acc.: zero-shot → final | "
            "test Δ vs zero-shot: loss (z); acc. (McNemar p) | "
            f"test Δ vs {ref}: loss (z); acc. (McNemar p) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        zs, fin, c = r["zero_shot"], r["final"], r["curve_end"]
        val = (f"{c['delta_loss']:+.4f} ({c['delta_loss'] / c['delta_loss_se']:+.1f})"
               if c and c["delta_loss_se"] else "-")
        peak = f"{r['peak_rss_mib']:.0f}" if r["peak_rss_mib"] else "-"
        mark = " (selected)" if r["name"] in best else ""
        lines.append(
            f"| {r['name']}{mark} | {r['method']} ({r['tuning']}) | {r['lr']:g} | {r['steps']} | "
            f"{r['forwards']} | {r['step_seconds']:.2f} | {peak} | {val} | "
            f"{zs['eval_loss']:.4f} → {fin['eval_loss']:.4f} | "
            f"{zs['accuracy']:.3f} → {fin['accuracy']:.3f} | {_z(r['vs_zero_shot'])} | "
            f"{_z(r.get('vs_reference')) if r['name'] != ref else 'reference'} |")
    return "\n".join(lines)


def selected(spec: dict, rows: list[dict]) -> dict[str, str]:
    """group -> its run with the lowest loss at the end of the curve split (the selection
    split, validation unless the spec says otherwise)."""
    by_name = {r["name"]: r for r in rows}
    best: dict[str, str] = {}
    for name, group, _, _ in spec["runs"]:
        r = by_name.get(name)
        if r is None or not r["curve_end"]:
            continue
        if group not in best or r["curve_end"]["eval_loss"] < by_name[best[group]][
                "curve_end"]["eval_loss"]:
            best[group] = name
    return best


def report(spec: dict, out: Path) -> list[dict]:
    """Write learning.md/png/json from the finished runs; returns their rows."""
    done = [n for n, _, _, _ in spec["runs"] if (out / n / "summary.json").is_file()]
    if not done:
        return []
    first = [row(n, out, None) for n in done]
    best = selected(spec, first)
    ref = best.get(spec["reference"])
    rows = [row(n, out, ref) for n in done]
    zs = rows[0]["zero_shot"]
    curve = rows[0]["curve_split"]
    lines = [f"budget {spec['budget']} forward passes per run; {rows[0]['split']} n={zs['n']}; "
             f"(selected): the lowest {curve} loss of its group; reference: {ref}", "",
             table(rows, ref, set(best.values())), ""]
    (out / "learning.md").write_text("\n".join(lines))
    curves = {r["name"]: heldout_curve(out / r["name"], curve) for r in rows}
    plot_heldout(curves, out / "learning.png", curve)
    write_json(out / "learning.json", {"budget": spec["budget"], "reference": ref,
                                       "selected": best, "rows": rows})
    _log_to_parent(out)
    return rows


def _log_to_parent(out: Path) -> None:
    """The bench's files as artifacts of its MLflow parent run (when it has one)."""
    parent = out / PARENT_FILE
    if not parent.is_file():
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db")
    run_id = parent.read_text().strip()
    client.set_tag(run_id, "zo.bench", "learning")
    for name in ("learning.md", "learning.png", "learning.json"):
        client.log_artifact(run_id, str(out / name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--out", type=Path, help="default runs/learning/<spec name>")
    parser.add_argument("--only", help="comma-separated run or group names (default: all)")
    parser.add_argument("--report", action="store_true", help="only rewrite the report")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run")
    args = parser.parse_intermixed_args()
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        parser.exit(2, f"error: {exc}\n")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.exit(2, f"error: overrides are section.key=value, got {bad}\n")
    out = (args.out or Path("runs/learning") / args.spec.stem).resolve()
    only = set(args.only.split(",")) if args.only else None
    todo = [r for r in spec["runs"] if only is None or r[0] in only or r[1] in only]
    started = time.perf_counter()
    for i, (name, _, recipe, overrides) in enumerate(todo, 1):
        if args.report:
            break
        if (out / name / "summary.json").is_file():
            print(f"[learning] {i}/{len(todo)} {name}: done", flush=True)
            continue
        print(f"[learning] {i}/{len(todo)} {name} ({time.perf_counter() - started:.0f} s in)",
              flush=True)
        run_one(name, recipe, overrides + args.overrides, spec, out)
        report(spec, out)
    rows = report(spec, out)
    if rows:
        print((out / "learning.md").read_text())
        print(f"[learning] {out / 'learning.png'}, {out / 'learning.json'}")


if __name__ == "__main__":
    main()
