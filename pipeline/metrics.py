"""The run directory's plain files: resolved config, per-step metrics, summary.

``metrics.jsonl`` holds one JSON object per line: per step ``step``, ``loss``, ``projected_grad``,
``lr``, ``forwards``, ``forwards_total``, ``seconds`` (and ``skipped`` when a non-finite loss
skipped the update); per evaluation ``step``, ``split``, ``accuracy``, ``n``, ``stderr`` (binomial),
``eval_loss`` and ``eval_loss_stderr`` (mean per-example loss on the split), and after step 0
the paired change from the zero-shot evaluation of the split: ``delta_loss``, ``delta_loss_se``,
``delta_accuracy``, ``delta_accuracy_se``, ``mcnemar_p`` (see :mod:`pipeline.paired`).
``examples.jsonl`` holds each evaluation's per-example ``loss`` and ``correct`` lists, in split
order.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null marks a skipped value
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
