"""Every method at an equal budget of forward passes: accuracy, step time and peak memory vs MeZO.

Each method runs its recipe in ``jobs/`` (the demo model, SmolLM2-135M, on Rotten Tomatoes) for
``--budget`` forward passes (``train.max_forwards``: BSZO's 3-forward steps get fewer steps than
MeZO's 2-forward ones), each in a fresh process, one after the other. Printed per method:

- validation accuracy after the budget, with its standard error (binomial, n = ``--n-val``), and
  the zero-shot accuracy of the same split for reference;
- steps taken and forwards used;
- step time: training seconds / steps (calibration and refresh steps included), and its ratio
  to MeZO's;
- peak memory of the whole process (CPU: ``ru_maxrss``; on a GPU the run's own
  ``max_memory_allocated`` is not exposed, so the same RSS figure), and its ratio to MeZO's.

Every run is also logged to MLflow (experiment ``method-comparison``) under ``--out``.

Usage: python bench/compare_methods.py [--budget 96] [--n-val 500] [--methods mezo,agzo,...]
Runs are sequential; on 2 CPU cores budget 96 takes about 3 minutes per method.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

JOBS = {"mezo": "jobs/demo.yaml", "agzo": "jobs/agzo.yaml", "zoact": "jobs/zoact.yaml",
        "bszo": "jobs/bszo.yaml", "pgap": "jobs/pgap.yaml", "zo_adam": "jobs/zo_adam.yaml",
        "lozo": "jobs/lozo.yaml"}

# Runs `zopipe train` in this process and writes its peak RSS (KiB) next to the run.
WRAPPER = """
import json, resource, sys
from pipeline.cli import main
try:
    main(sys.argv[2:], standalone_mode=False)
finally:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    open(sys.argv[1], "w").write(json.dumps({"peak_rss_kib": peak}))
"""


def run_method(method: str, args, root: Path, zero_shot: bool) -> dict:
    run_dir = root / method
    peak_file = root / f"{method}.peak.json"
    overrides = [f"train.max_forwards={args.budget}", "train.steps=1000000",
                 "train.final_split=validation", f"data.n_val={args.n_val}",
                 f"train.eval_zero_shot={str(zero_shot).lower()}", "train.eval_batch_size=16",
                 "checkpoint.every=0", "checkpoint.keep_last=1",
                 f"tracking.uri=sqlite:///{root.resolve()}/mlflow.db",
                 "tracking.experiment=method-comparison", *args.overrides]
    cmd = [sys.executable, "-c", WRAPPER, str(peak_file), "train", JOBS[method], *overrides,
           "--run-dir", str(run_dir), "--no-progress"]
    print(f"[compare] {method}: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["peak_rss_mib"] = json.loads(peak_file.read_text())["peak_rss_kib"] / 1024
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=96, help="forward passes per method")
    parser.add_argument("--n-val", type=int, default=500, help="validation examples")
    parser.add_argument("--methods", default=",".join(JOBS), help="comma-separated, mezo first")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every method")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in JOBS]
    if unknown or methods[:1] != ["mezo"]:
        parser.error(f"methods must start with mezo and be among {sorted(JOBS)}; got {methods}")
    root = args.out.resolve()
    if root.exists() and any(root.iterdir()):
        parser.error(f"{root} is not empty: pass a new --out")
    root.mkdir(parents=True)

    rows = {m: run_method(m, args, root, zero_shot=(m == "mezo")) for m in methods}
    base = rows["mezo"]
    base_step = base["train_seconds"] / base["steps"]
    zs = base["zero_shot"]
    print(f"\nbudget {args.budget} forward passes per method, {base['model']} on {base['task']}, "
          f"validation n={args.n_val}; zero-shot {zs['accuracy']:.3f} ± {zs['stderr']:.3f}\n")
    print("| method | val. accuracy ± SE | steps | forwards | step time (s) | step time / MeZO "
          "| peak RSS (MiB) | peak / MeZO |")
    print("|---|---|---|---|---|---|---|---|")
    table = []
    for m, s in rows.items():
        step = s["train_seconds"] / max(s["steps"], 1)
        final = s["final"]
        row = {"method": m, "accuracy": final["accuracy"], "stderr": final["stderr"],
               "steps": s["steps"], "forwards": s["forwards"], "step_seconds": step,
               "step_ratio": step / base_step, "peak_rss_mib": s["peak_rss_mib"],
               "peak_ratio": s["peak_rss_mib"] / base["peak_rss_mib"]}
        table.append(row)
        print(f"| {m} | {final['accuracy']:.3f} ± {final['stderr']:.3f} | {s['steps']} | "
              f"{s['forwards']} | {step:.2f} | {row['step_ratio']:.2f} | "
              f"{s['peak_rss_mib']:.0f} | {row['peak_ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"budget": args.budget, "n_val": args.n_val,
                                         "zero_shot": zs, "rows": table}, indent=2))
    assert all(math.isfinite(r["accuracy"]) for r in table)


if __name__ == "__main__":
    main()
