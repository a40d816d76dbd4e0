"""How far two runs of one recipe are apart: per step, per evaluated example, per weight.

Runs of the same command agree bitwise on one machine with one thread count; on another CPU (its
vector ISA picks other BLAS/oneDNN/compiled kernels, its core count another reduction order) they
agree only to rounding. This prints by how much: the first step whose loss differs and the
largest loss and projected-gradient differences, per evaluation the largest per-example loss
difference, the accuracies and how many examples changed their verdict, and the largest weight
difference of the last checkpoints.

Usage: python bench/run_diff.py RUN_A RUN_B
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file

from pipeline import checkpoint
from pipeline.metrics import read_jsonl


def steps_diff(a: Path, b: Path) -> str:
    sa, sb = ([r for r in read_jsonl(d / "metrics.jsonl") if "loss" in r] for d in (a, b))
    pairs = list(zip(sa, sb))
    first = next((x["step"] for x, y in pairs if x["loss"] != y["loss"]), None)
    loss = max(abs(x["loss"] - y["loss"]) for x, y in pairs)
    grad = max(abs(x["projected_grad"][0] - y["projected_grad"][0])
               / max(abs(y["projected_grad"][0]), 1e-30) for x, y in pairs)
    return (f"{len(pairs)} steps: first differing loss at step {first}; max |Δ loss| {loss:.3g}, "
            f"max relative Δ projected gradient {grad:.3g}")


def evals_diff(a: Path, b: Path) -> list[str]:
    lines = []
    theirs = {(r["step"], r["split"]): r for r in read_jsonl(b / "examples.jsonl")}
    for x in read_jsonl(a / "examples.jsonl"):
        y = theirs.get((x["step"], x["split"]))
        if y is None:
            continue
        loss = max(abs(p - q) for p, q in zip(x["loss"], y["loss"]))
        flips = sum(p != q for p, q in zip(x["correct"], y["correct"]))
        n = len(x["correct"])
        lines.append(f"eval at step {x['step']} ({x['split']}, n={n}): accuracy "
                     f"{sum(x['correct']) / n:.3f} vs {sum(y['correct']) / n:.3f}, "
                     f"{flips} verdicts differ, max |Δ example loss| {loss:.3g}")
    return lines


def weights_diff(a: Path, b: Path) -> str | None:
    found = [checkpoint.latest(d) for d in (a, b)]
    if None in found or found[0][0] != found[1][0]:
        return None
    wa, wb = (load_file(str(path / "shards-rank0.safetensors")) for _, path in found)
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    return f"weights at step {found[0][0]}: max |Δθ| {diff:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args()
    print(steps_diff(args.run_a, args.run_b))
    for line in evals_diff(args.run_a, args.run_b):
        print(line)
    weights = weights_diff(args.run_a, args.run_b)
    if weights:
        print(weights)


if __name__ == "__main__":
    main()
