"""The training loop: ZO steps, evaluations, checkpoints, stop requests and the run's files.

Everything a step's update depends on is a function of (run seed, step) plus the weights and the
method state, so resuming from ``step-N`` replays steps N+1.. bitwise as an uninterrupted run
would. Each step appends to ``metrics.jsonl`` and ``update_log.jsonl``; a resumed run first drops
the records after its checkpoint (see :mod:`pipeline.run_dir`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.evaluation import Evaluation, evaluate
from pipeline.metrics import MetricsLog, write_json
from pipeline.paired import RECORD_KEYS, Paired, describe
from pipeline.stopping import STOPPED_FILE
from pipeline.zo.methods import StepContext


class NonFiniteError(RuntimeError):
    """Too many non-finite losses in a row."""


class Stopped(Exception):
    """A stop request was honoured at a step boundary, after a checkpoint."""

    def __init__(self, step: int, exit_code: int):
        super().__init__(f"stopped at step {step}")
        self.step = step
        self.exit_code = exit_code


@dataclass
class TrainerState:
    step: int = 0
    forwards: int = 0
    skipped: int = 0
    nonfinite_streak: int = 0
    train_seconds: float = 0.0
    # wall time of earlier sessions of this run, up to their last checkpoint (cumulative)
    wall_seconds: float = 0.0
    zero_shot: dict | None = None
    # split -> per-example zero-shot values (Evaluation.examples()), to pair later evaluations
    zero_shot_examples: dict | None = None


class Trainer:
    def __init__(self, cfg, run_dir: Path, backend, method, data, *, tracker, stop,
                 state: TrainerState | None = None, progress: bool = True):
        self.cfg = cfg
        self.run_dir = run_dir
        self.backend = backend
        self.method = method
        self.data = data
        self.tracker = tracker
        self.stop = stop
        self.state = state or TrainerState()
        self.writer = backend.rank == 0
        self.progress = progress and self.writer
        self.metrics = MetricsLog(run_dir / "metrics.jsonl") if self.writer else None
        self.updates = MetricsLog(run_dir / "update_log.jsonl") if self.writer else None
        self.examples = MetricsLog(run_dir / "examples.jsonl") if self.writer else None

    def _write(self, log: MetricsLog | None, record: dict) -> None:
        if log is not None:
            log.write(record)

    def _say(self, message: str) -> None:
        if self.writer:
            tqdm.write(message)

    def _stop_requested(self) -> bool:
        """A stop request on any rank stops all ranks at the same step."""
        wanted = self.stop.requested()
        if self.backend.world_size == 1:
            return wanted
        return self.backend.all_reduce_mean(torch.tensor([float(wanted)])).item() > 0

    def _zero_shot(self, split: str) -> Evaluation | None:
        saved = (self.state.zero_shot_examples or {}).get(split)
        return Evaluation.from_examples(saved) if saved else None

    def _evaluate(self, step: int, split: str) -> tuple[Evaluation, Paired | None]:
        """Evaluate ``split``, log it with its paired change from the zero-shot evaluation of the
        same split (when there is one), and keep its per-example values in examples.jsonl."""
        t = self.cfg.train
        ev = evaluate(self.backend, self.data, split, t.eval_batch_size, progress=self.progress)
        base = self._zero_shot(split) if step > 0 else None
        change = ev.against(base) if base is not None else None
        record = {"step": step, **ev.as_dict()}
        if change is not None:
            record.update({k: getattr(change, k) for k in RECORD_KEYS})
        self._write(self.metrics, record)
        self._write(self.examples, {"step": step, **ev.examples()})
        self.tracker.log_eval(record)
        return ev, change

    def _evaluate_zero_shot(self, splits: list[str]) -> None:
        s = self.state
        s.zero_shot_examples = {}
        for split in dict.fromkeys(splits):
            ev, _ = self._evaluate(0, split)
            s.zero_shot_examples[split] = ev.examples()
            if split == self.cfg.train.final_split:
                s.zero_shot = ev.as_dict()
            self._say(f"zero-shot {ev}")

    def _report(self, step: int, ev: Evaluation, change: Paired | None) -> None:
        self._say(f"step {step}: {ev}")
        if change is not None:
            for line in describe(change, "  vs zero-shot:"):
                self._say(line)

    def _wall(self) -> float:
        """Wall seconds of the whole run so far: earlier sessions plus this one."""
        return self._wall_before + time.perf_counter() - self._started

    def _checkpoint(self) -> None:
        c = self.cfg.checkpoint
        self.state.wall_seconds = self._wall()
        checkpoint.save(self.run_dir, self.state.step, self.backend, self.method,
                        asdict(self.state), self.cfg.to_yaml(), keep_last=c.keep_last)

    def _step(self, step: int) -> float:
        """One ZO step and its records; ``step`` counts from 0, records from 1."""
        t = self.cfg.train
        tic = time.perf_counter()
        batch = self.data.train_batch(step, t.batch_size, t.seed, self.backend.rank,
                                      self.backend.world_size)
        ctx = StepContext(step, t.seed, self.cfg.method.lr, batch, self.backend)
        stats = self.method.step(ctx)
        seconds = time.perf_counter() - tic
        s = self.state
        s.step, s.forwards, s.train_seconds = step + 1, s.forwards + stats.forwards, (
            s.train_seconds + seconds)
        s.skipped += stats.skipped
        s.nonfinite_streak = s.nonfinite_streak + 1 if stats.skipped else 0
        record = {"step": step + 1, "loss": stats.loss, "projected_grad": stats.projected_grad,
                  "lr": ctx.lr, "forwards": stats.forwards, "forwards_total": s.forwards,
                  "seconds": seconds}
        if stats.skipped:
            record["skipped"] = True
        self._write(self.metrics, record)
        self._write(self.updates, {"step": step + 1, "seeds": stats.seeds,
                                   "projected_grad": stats.projected_grad, "lr": ctx.lr,
                                   "skipped": stats.skipped, **stats.extra})
        self.tracker.log_step(record)
        if stats.skipped:
            self._say(f"step {step + 1}: non-finite loss, update skipped "
                       f"({s.nonfinite_streak} in a row, {s.skipped} in all)")
        if s.nonfinite_streak >= t.max_nonfinite_steps:
            raise NonFiniteError(
                f"{s.nonfinite_streak} non-finite losses in a row up to step {step + 1}: the "
                "weights are unchanged by those steps. Lower method.lr or method.eps, or use "
                "model.dtype=fp32 / precision.master_weights=fp32, then resume"
            )
        return stats.loss

    def train(self) -> dict:
        t, s = self.cfg.train, self.state
        self._started, self._wall_before = time.perf_counter(), s.wall_seconds
        curve = [t.eval_split] if t.eval_every else []
        if s.step == 0 and t.eval_zero_shot and s.zero_shot is None:
            self._evaluate_zero_shot([t.final_split, *curve])

        last_curve = None
        bar = tqdm(total=t.steps, initial=min(s.step, t.steps), desc="train", unit="step",
                   disable=not self.progress)
        try:
            for step in range(s.step, t.steps):
                if t.max_forwards and s.forwards >= t.max_forwards:
                    self._say(f"forward budget reached: {s.forwards} forward passes in {step} "
                              "steps (train.max_forwards)")
                    break
                loss = self._step(step)
                bar.set_postfix(loss=f"{loss:.4f}")
                bar.update(1)
                every = self.cfg.checkpoint.every
                if self._stop_requested():
                    self._checkpoint()
                    if self.writer:
                        write_json(self.run_dir / STOPPED_FILE,
                                   {"step": s.step, "exit_code": self.stop.exit_code})
                    raise Stopped(s.step, self.stop.exit_code)
                if every and s.step % every == 0 and s.step < t.steps:
                    self._checkpoint()
                if t.eval_every and s.step % t.eval_every == 0 and s.step < t.steps:
                    self._report(s.step, *self._evaluate(s.step, t.eval_split))
                    last_curve = s.step
        finally:
            bar.close()
        if not (checkpoint.checkpoint_root(self.run_dir) / f"step-{s.step}").exists():
            self._checkpoint()

        if curve and t.eval_split != t.final_split and last_curve != s.step:
            self._report(s.step, *self._evaluate(s.step, t.eval_split))  # the curve's last point
        final, change = self._evaluate(s.step, t.final_split)
        summary = {
            "method": self.cfg.method.name,
            "model": self.cfg.model.name_or_path,
            "task": self.cfg.data.task,
            "steps": s.step,
            "forwards": s.forwards,
            "skipped_steps": s.skipped,
            "zero_shot": s.zero_shot,
            "final": final.as_dict(),
            "paired": change.as_dict() if change is not None else None,
            "train_seconds": s.train_seconds,
            "steps_per_second": s.step / s.train_seconds if s.train_seconds > 0 else None,
            "wall_seconds": self._wall(),  # cumulative over resumes, like train_seconds
        }
        if self.writer:
            write_json(self.run_dir / "summary.json", summary)
            self.tracker.log_summary(summary)
            self.tracker.log_artifacts(self.run_dir)
        return summary

    def close(self) -> None:
        for log in (self.metrics, self.updates, self.examples):
            if log is not None:
                log.close()
