"""Training curves: loss and accuracy against cumulative forward passes.

Both functions take records in the ``metrics.jsonl`` format (see :mod:`pipeline.metrics`): step
records (``step``, ``loss``, ``forwards`` or ``forwards_total``) and evaluation records (``step``,
``split``, ``accuracy``, ``stderr``). Forward passes, not steps, are the x axis, so methods that
spend a different number of forwards per step compare fairly. Drawing uses matplotlib's Agg canvas
directly (no pyplot, no global backend switch), so it works on headless nodes and in threads.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_MAX_WINDOW = 200


@dataclass
class Curves:
    """One run's points, x in cumulative forward passes."""

    loss_x: list[float] = field(default_factory=list)
    loss_y: list[float] = field(default_factory=list)
    # split -> (x, accuracy, stderr)
    evals: dict[str, tuple[list[float], list[float], list[float]]] = field(default_factory=dict)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def curves(records: Iterable[Mapping[str, Any]], metric: str = "accuracy") -> Curves:
    """Loss and per-split ``metric`` points of one run's records.

    A step that appears twice (a resumed run that appended recomputed steps) counts once, the last
    record winning. An evaluation sits at the forward count of its step (0 at step 0).
    """
    steps: dict[int, Mapping[str, Any]] = {}
    evals: dict[tuple[str, int], Mapping[str, Any]] = {}
    for rec in records:
        step = rec.get("step")
        if not isinstance(step, int):
            continue
        if "split" in rec:
            evals[(str(rec["split"]), step)] = rec
        else:
            steps[step] = rec

    out = Curves()
    order = sorted(steps)
    totals: list[float] = []
    running = 0.0
    for step in order:
        rec = steps[step]
        total = _finite(rec.get("forwards_total"))
        if total is None:
            running += _finite(rec.get("forwards")) or 0.0
            total = running
        else:
            running = total
        totals.append(total)
        loss = _finite(rec.get("loss"))
        if loss is not None:
            out.loss_x.append(total)
            out.loss_y.append(loss)

    def forwards_at(step: int) -> float | None:
        if step <= 0:
            return 0.0
        i = bisect.bisect_right(order, step) - 1
        return totals[i] if i >= 0 else None

    for (split, step) in sorted(evals, key=lambda k: (k[0], k[1])):
        rec = evals[(split, step)]
        x, y = forwards_at(step), _finite(rec.get(metric))
        if x is None or y is None:
            continue
        xs, ys, errs = out.evals.setdefault(split, ([], [], []))
        xs.append(x)
        ys.append(y)
        errs.append(_finite(rec.get("stderr")) or 0.0)
    return out


def moving_average(values: list[float], window: int | None = None) -> list[float]:
    """Trailing mean over ``window`` points (the first points average what exists so far)."""
    if not values:
        return []
    if window is None:
        window = min(_MAX_WINDOW, max(1, round(len(values) / 25)))
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.set(xlabel="forward passes", ylabel="loss", title="training loss")
    acc_ax.set(xlabel="forward passes", ylabel="accuracy", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(True, alpha=0.3)
    return fig, loss_ax, acc_ax


def save_figure(fig, out_png: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically (a temporary file, then a rename)."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out_png)
    return out_png


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")


_SPLIT_STYLES = {"test": "-", "validation": "--"}


def _draw(loss_ax, acc_ax, c: Curves, color: str | None, label: str | None, raw_alpha: float):
    drew_loss = drew_acc = False
    if c.loss_x:
        loss_ax.plot(c.loss_x, c.loss_y, color=color, alpha=raw_alpha, linewidth=0.8,
                     label=None if label else "raw")
        smooth_label = f"{label} (moving avg)" if label else "moving average"
        loss_ax.plot(c.loss_x, moving_average(c.loss_y), color=color, linewidth=1.8,
                     label=smooth_label)
        drew_loss = True
    for split, (xs, ys, errs) in sorted(c.evals.items()):
        name = f"{label} {split}" if label else split
        acc_ax.errorbar(xs, ys, yerr=errs, color=color, linestyle=_SPLIT_STYLES.get(split, ":"),
                        marker="o", markersize=4, capsize=3, label=name)
        drew_acc = True
    return drew_loss, drew_acc


def plot_run_curves(metrics_records: Iterable[Mapping[str, Any]], out_png: str | Path) -> Path:
    """One run's loss (raw, light, plus moving average) and accuracy per split -> ``out_png``."""
    fig, loss_ax, acc_ax = _figure()
    drew_loss, drew_acc = _draw(loss_ax, acc_ax, curves(metrics_records), "C0", None, 0.25)
    for ax, drew in ((loss_ax, drew_loss), (acc_ax, drew_acc)):
        if drew:
            ax.legend(fontsize="small")
        else:
            _no_data(ax)
    return save_figure(fig, out_png)


def plot_comparison(
    runs: Mapping[str, Iterable[Mapping[str, Any]]], out_png: str | Path, metric: str = "accuracy"
) -> Path:
    """Several runs (label -> records) on shared axes, one color per run -> ``out_png``."""
    fig, loss_ax, acc_ax = _figure()
    any_loss = any_acc = False
    for i, (label, records) in enumerate(runs.items()):
        drew_loss, drew_acc = _draw(loss_ax, acc_ax, curves(records, metric), f"C{i % 10}", label,
                                    0.12)
        any_loss |= drew_loss
        any_acc |= drew_acc
    acc_ax.set_ylabel(metric)
    acc_ax.set_title(metric)
    for ax, drew in ((loss_ax, any_loss), (acc_ax, any_acc)):
        if drew:
            ax.legend(fontsize="x-small")
        else:
            _no_data(ax)
    return save_figure(fig, out_png)
