"""Held-out learning curves of run directories, with paired standard-error bands.

A run with ``train.eval_every`` evaluates ``train.eval_split`` at step 0 and every N steps; each
record after step 0 carries its paired change from step 0 (:mod:`pipeline.paired`). A curve is
those records against the forward passes spent by their step, so methods that spend different
numbers of forwards per step compare at equal cost. Bands are ``value ± paired SE`` of the change
from zero-shot: every curve of one split starts at the same zero-shot point, and the band says how
far the change from it is resolved (the unpaired SE of a mean over examples is mostly the spread
of the examples, the same for every run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.evaluation import Evaluation
from pipeline.metrics import read_jsonl
from pipeline.plots import save_figure


@dataclass
class Curve:
    """One run's evaluations of one split, in step order."""

    steps: list[int] = field(default_factory=list)
    forwards: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    loss_se: list[float] = field(default_factory=list)  # paired SE of the change from step 0
    accuracy: list[float] = field(default_factory=list)
    accuracy_se: list[float] = field(default_factory=list)


def heldout_curve(run_dir: Path, split: str) -> Curve:
    """The evaluations of ``split`` in ``run_dir/metrics.jsonl`` (a step evaluated twice, by a
    resumed run, counts once: the last record wins)."""
    forwards: dict[int, float] = {0: 0.0}
    evals: dict[int, dict] = {}
    for rec in read_jsonl(Path(run_dir) / "metrics.jsonl"):
        if rec.get("split") == split:
            evals[rec["step"]] = rec
        elif "forwards_total" in rec:
            forwards[rec["step"]] = rec["forwards_total"]
    curve = Curve()
    for step in sorted(evals):
        rec = evals[step]
        curve.steps.append(step)
        curve.forwards.append(forwards.get(step, float("nan")))
        curve.loss.append(rec["eval_loss"])
        curve.loss_se.append(rec.get("delta_loss_se") or 0.0)
        curve.accuracy.append(rec["accuracy"])
        curve.accuracy_se.append(rec.get("delta_accuracy_se") or 0.0)
    return curve


def last_evaluation(run_dir: Path, split: str) -> Evaluation | None:
    """The per-example values of the last evaluation of ``split`` in ``run_dir/examples.jsonl``."""
    path = Path(run_dir) / "examples.jsonl"
    if not path.is_file():
        return None
    found = [r for r in read_jsonl(path) if r["split"] == split]
    return Evaluation.from_examples(max(found, key=lambda r: r["step"])) if found else None


def plot_heldout(curves: dict[str, Curve], out_png: str | Path, split: str) -> Path:
    """Held-out loss and accuracy against forward passes, one line per run, paired-SE bands."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for i, (label, c) in enumerate(curves.items()):
        color = f"C{i % 10}"
        for ax, ys, ses in ((loss_ax, c.loss, c.loss_se), (acc_ax, c.accuracy, c.accuracy_se)):
            ax.plot(c.forwards, ys, color=color, marker="o", markersize=3, label=label)
            ax.fill_between(c.forwards, [y - s for y, s in zip(ys, ses)],
                            [y + s for y, s in zip(ys, ses)], color=color, alpha=0.18,
                            linewidth=0)
    loss_ax.set(xlabel="forward passes", ylabel=f"{split} loss (mean per example)",
                title=f"held-out loss ({split})")
    acc_ax.set(xlabel="forward passes", ylabel=f"{split} accuracy",
               title=f"held-out accuracy ({split})")
    fig.suptitle("bands: ± paired SE of the change from zero-shot", fontsize="small")
    for ax in (loss_ax, acc_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    return save_figure(fig, out_png)
