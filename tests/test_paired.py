"""Paired read-outs: the statistics against hand-computed values, and where they are recorded."""

import math

import pytest

from pipeline.config import load_config
from pipeline.evaluation import Evaluation
from pipeline.paired import describe, mcnemar_exact, mean_and_se, paired
from pipeline.tracking import Tracker


def test_mcnemar_exact_against_the_binomial_tail():
    # b=10, c=2: 2 * P[Bin(12, 1/2) <= 2] = 2 * (1 + 12 + 66) / 4096
    assert math.isclose(mcnemar_exact(10, 2), 158 / 4096)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert math.isclose(mcnemar_exact(0, 6), 2 / 64)


def test_paired_differences_and_their_standard_error():
    before, after = [1.0, 2.0, 3.0, 4.0], [0.5, 1.9, 2.6, 3.8]
    p = paired(before, after, [True, False, False, True], [True, True, True, False])
    # d = [-0.5, -0.1, -0.4, -0.2]: mean -0.3, sd sqrt(0.1 / 3), SE sd / 2
    assert math.isclose(p.delta_loss, -0.3)
    assert math.isclose(p.delta_loss_se, math.sqrt(0.1 / 3) / 2)
    assert (p.b, p.c, p.n) == (2, 1, 4)
    assert math.isclose(p.delta_accuracy, 0.25)
    assert math.isclose(p.delta_accuracy_se, mean_and_se([0, 1, 1, -1])[1])
    assert math.isclose(p.loss_z, -0.3 / p.delta_loss_se)
    assert "Δ -0.3000 ± 0.0913 (paired, n=4, -3.3 SE)" in describe(p)[0]
    # The unpaired SE of either mean is ~7 times the paired one: the pairing is the point.
    assert mean_and_se(after)[1] > 7 * p.delta_loss_se


def test_evaluations_pair_only_over_the_same_examples():
    a = Evaluation("test", (0.5, 0.25), (True, False))
    b = Evaluation("test", (0.25, 0.25), (True, True))
    assert b.against(a).delta_loss == -0.125 and b.against(a).b == 1
    assert Evaluation.from_examples(b.examples()) == b
    assert a.as_dict()["eval_loss"] == 0.375 and a.as_dict()["accuracy"] == 0.5
    with pytest.raises(ValueError, match="not the same examples"):
        b.against(Evaluation("validation", (0.5, 0.25), (True, False)))


def test_tracker_logs_held_out_loss_and_paired_change(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(None, [f"tracking.uri={uri}", "tracking.system_metrics=false"])
    change = paired([0.5, 0.75], [0.25, 0.5], [True, False], [True, True])
    with Tracker.start(cfg, tmp_path / "run") as tracker:
        tracker.log_eval({"step": 0, "split": "test", "accuracy": 0.5, "stderr": 0.35,
                          "eval_loss": 0.625, "eval_loss_stderr": 0.125})
        tracker.log_eval({"step": 4, "split": "test", "accuracy": 1.0, "stderr": 0.0,
                          "eval_loss": 0.375, "eval_loss_stderr": 0.125,
                          "delta_loss": -0.25, "delta_loss_se": 0.0, "delta_accuracy": 0.5,
                          "delta_accuracy_se": 0.5, "mcnemar_p": 1.0})
        tracker.log_summary({"steps": 4, "zero_shot": {"accuracy": 0.5, "eval_loss": 0.625},
                             "final": {"accuracy": 1.0, "eval_loss": 0.375},
                             "paired": change.as_dict()})
        run_id = tracker.run_id
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    assert metrics["test_loss"] == 0.375 and metrics["test_delta_loss"] == -0.25
    assert metrics["zero_shot_loss"] == 0.625 and metrics["final_loss"] == 0.375
    assert metrics["final_delta_loss"] == -0.25 and metrics["final_mcnemar_p"] == 1.0
    assert metrics["final_delta_accuracy"] == 0.5
