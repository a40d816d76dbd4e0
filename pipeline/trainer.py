"""The training loop: ZO steps, evaluations, and the run directory's files."""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from pipeline.evaluation import Accuracy, evaluate
from pipeline.metrics import MetricsLog, write_json
from pipeline.zo.methods import StepContext


class Trainer:
    def __init__(self, cfg, run_dir: Path, backend, method, data, *, progress: bool = True):
        self.cfg = cfg
        self.run_dir = run_dir
        self.backend = backend
        self.method = method
        self.data = data
        self.progress = progress and backend.rank == 0
        self.log = MetricsLog(run_dir / "metrics.jsonl")

    def _evaluate(self, step: int, split: str) -> Accuracy:
        t = self.cfg.train
        acc = evaluate(self.backend, self.data, split, t.eval_batch_size, progress=self.progress)
        self.log.write({"step": step, **acc.as_dict()})
        return acc

    def train(self) -> dict:
        t = self.cfg.train
        started = time.perf_counter()
        zero_shot = self._evaluate(0, t.final_split) if t.eval_zero_shot else None
        if zero_shot is not None:
            tqdm.write(f"zero-shot accuracy: {zero_shot}")

        forwards = skipped = 0
        train_start = time.perf_counter()
        bar = tqdm(total=t.steps, desc="train", unit="step", disable=not self.progress)
        for step in range(t.steps):
            tic = time.perf_counter()
            batch = self.data.train_batch(step, t.batch_size, t.seed)
            ctx = StepContext(step, t.seed, self.cfg.method.lr, batch, self.backend)
            stats = self.method.step(ctx)
            seconds = time.perf_counter() - tic
            forwards += stats.forwards
            skipped += stats.skipped
            record = {
                "step": step + 1,
                "loss": stats.loss,
                "projected_grad": stats.projected_grad,
                "lr": ctx.lr,
                "forwards": stats.forwards,
                "seconds": seconds,
            }
            if stats.skipped:
                record["skipped"] = True
                tqdm.write(f"step {step + 1}: non-finite loss, update skipped")
            self.log.write(record)
            bar.set_postfix(loss=f"{stats.loss:.4f}")
            bar.update(1)
            if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.steps:
                tqdm.write(f"step {step + 1}: {self._evaluate(step + 1, t.eval_split)}")
        bar.close()
        train_seconds = time.perf_counter() - train_start

        final = self._evaluate(t.steps, t.final_split)
        summary = {
            "method": self.cfg.method.name,
            "model": self.cfg.model.name_or_path,
            "task": self.cfg.data.task,
            "steps": t.steps,
            "forwards": forwards,
            "skipped_steps": skipped,
            "zero_shot": zero_shot.as_dict() if zero_shot else None,
            "final": final.as_dict(),
            "train_seconds": train_seconds,
            "steps_per_second": t.steps / train_seconds if train_seconds > 0 else None,
            "wall_seconds": time.perf_counter() - started,
        }
        write_json(self.run_dir / "summary.json", summary)
        self.log.close()
        return summary
