"""``zopipe`` end to end through click's runner, on the real packaged model and data."""

import json
import math
import os
import shutil
import subprocess

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.metrics import read_jsonl

SMALL = ["data.n_train=32", "data.n_val=16", "data.n_test=24", "train.batch_size=4",
         "train.eval_batch_size=12"]


def test_validate_names_every_problem_without_traceback():
    result = CliRunner().invoke(main, ["validate", "jobs/demo.yaml", "method.name=nope",
                                       "train.steps=-1"])
    assert result.exit_code == 2
    assert "method.name: 'nope' is not allowed" in result.output
    assert "train.steps: -1 is too small" in result.output
    assert "Traceback" not in result.output


def test_validate_and_print_config_of_the_demo():
    runner = CliRunner()
    ok = runner.invoke(main, ["validate", "jobs/demo.yaml"])
    assert ok.exit_code == 0 and "OK" in ok.output
    printed = runner.invoke(main, ["print-config", "jobs/demo.yaml", "method.lr=2e-6"])
    resolved = yaml.safe_load(printed.output)
    assert resolved["method"]["lr"] == 2e-6 and resolved["data"]["task"] == "rotten_tomatoes"


def test_missing_data_dir_is_a_clear_error_and_leaves_no_run_directory(tmp_path):
    result = CliRunner().invoke(
        main, ["train", "jobs/demo.yaml", f"data.data_dir={tmp_path / 'nope'}",
               "--run-dir", str(tmp_path / "runs" / "run"), "--no-progress"]
    )
    assert result.exit_code == 1
    assert "no such directory" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # no run directory, no runs/, no lock file


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _error_line(result):
    """The output of a refused command: exactly one ``Error:`` line (no traceback)."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output or result.exception
    assert lines[0].startswith("Error: ")
    return lines[0]


def _make_read_only(path, request):
    """``path`` made unwritable even for root, whom modes do not stop (chattr +i), else skip."""
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
        request.addfinalizer(lambda: subprocess.run(["chattr", "-i", str(path)], check=False))
    else:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        request.addfinalizer(lambda: path.chmod(mode))
    if os.access(path, os.W_OK):
        pytest.skip("cannot make a path read-only here")


def _run_config(tmp_path, *overrides):
    """A demo config whose model does not exist: a command that loads it fails differently."""
    printed = CliRunner().invoke(main, ["print-config", "jobs/demo.yaml",
                                        f"model.name_or_path={tmp_path / 'no-model'}",
                                        *overrides])
    return printed.output


@pytest.mark.parametrize("where", ["under a file", "inside a read-only directory",
                                   "a read-only directory"])
def test_a_run_directory_that_cannot_be_written_is_refused_before_anything_loads(
        tmp_path, request, where):
    (tmp_path / "a-file").write_text("")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    _make_read_only(read_only, request)
    run_dir = {"under a file": tmp_path / "a-file" / "run",
               "inside a read-only directory": read_only / "run",
               "a read-only directory": read_only}[where]
    before = _tree(tmp_path)
    result = CliRunner().invoke(main, ["train", "jobs/demo.yaml",
                                       f"model.name_or_path={tmp_path / 'no-model'}",
                                       "--run-dir", str(run_dir)])
    line = _error_line(result)  # the run directory's error, not the missing model's
    assert "use a run directory you can write in" in line
    assert ("a-file is not a directory" if where == "under a file" else
            f"{read_only} (no write permission, or a read-only file system)") in line
    assert _tree(tmp_path) == before


def test_resume_is_refused_before_loading_when_the_run_files_cannot_be_written(tmp_path,
                                                                               request):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(_run_config(tmp_path))
    _make_read_only(run_dir / "config.yaml", request)  # a teammate's run, say
    line = _error_line(CliRunner().invoke(main, ["resume", str(run_dir)]))
    assert f"cannot write {run_dir / 'config.yaml'}" in line
    assert _tree(tmp_path) == ["run", "run/config.yaml"]


def test_resume_of_a_directory_that_is_not_a_run_is_one_line(tmp_path):
    line = _error_line(CliRunner().invoke(main, ["resume", str(tmp_path)]))
    assert line == (f"Error: {tmp_path} is not a run directory (no config.yaml): pass the "
                    "directory that zopipe train or zopipe slurm submit printed")
    assert list(tmp_path.iterdir()) == []


def test_replay_checks_its_output_and_method_before_loading(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "update_log.jsonl").write_text("")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("another model's weights\n")
    (run_dir / "config.yaml").write_text(_run_config(tmp_path))
    line = _error_line(CliRunner().invoke(main, ["replay", str(run_dir), "--out", str(out)]))
    assert line == (f"Error: {out} is not empty; give --out a new (or empty) directory you can "
                    "write in")
    assert (out / "model.safetensors").read_text() == "another model's weights\n"

    (run_dir / "config.yaml").write_text(_run_config(tmp_path, "method.name=zoact"))
    line = _error_line(CliRunner().invoke(main, ["replay", str(run_dir), "--out",
                                                 str(tmp_path / "new")]))
    assert "zoact runs cannot be replayed" in line and "zopipe export" in line
    assert not (tmp_path / "new").exists()


def test_compare_checks_where_the_plot_goes_before_reading_runs(tmp_path):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "run").mkdir()
    line = _error_line(CliRunner().invoke(main, ["compare", str(tmp_path / "run"), "--png",
                                                 str(tmp_path / "a-file" / "c.png")]))
    assert line == (f"Error: {tmp_path / 'a-file'} is not a directory; give --png a path you "
                    "can write")


@pytest.mark.slow
def test_train_then_eval_on_the_real_model(tmp_path):
    runner = CliRunner()
    run_dir = tmp_path / "run"
    result = runner.invoke(
        main, ["train", "jobs/demo.yaml", "train.steps=2", *SMALL, "--run-dir", str(run_dir),
               "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "zero-shot accuracy:" in result.output and "final accuracy:" in result.output
    assert "held-out test loss" in result.output and "(paired, n=24" in result.output

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["forwards"] == 4
    assert summary["zero_shot"]["n"] == 24 and summary["final"]["n"] == 24
    assert 0.0 <= summary["final"]["accuracy"] <= 1.0

    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["forwards"] == 2 for r in steps)
    assert all(math.isfinite(r["projected_grad"][0]) and r["lr"] == 1e-5 for r in steps)
    assert [(r["step"], r["split"]) for r in evals] == [(0, "test"), (2, "test")]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"] == 2

    # The same model and data evaluated by `zopipe eval` give the run's zero-shot accuracy.
    ev = runner.invoke(main, ["eval", "jobs/demo.yaml", *SMALL, "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.output.strip().splitlines()[-1])["accuracy"] == summary["zero_shot"][
        "accuracy"]

    # The run directory now belongs to this run: another config is refused, naming what differs.
    again = runner.invoke(main, ["train", "jobs/demo.yaml", "--run-dir", str(run_dir)])
    assert again.exit_code == 1 and "data.n_train: 32 -> 1000" in again.output


def test_forward_budget_stops_before_the_step_that_would_start_past_it(tiny_job, tmp_path):
    """BSZO takes 3 forwards a step: a budget of 7 runs steps starting at 0, 3 and 6 forwards."""
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["train", "jobs/demo.yaml", *tiny_job, "method.name=bszo", "train.steps=50",
               "train.max_forwards=7", "train.eval_zero_shot=false", "tracking.enabled=false",
               "--run-dir", str(run_dir), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "forward budget reached: 9 forward passes in 3 steps" in result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["forwards"] == 9
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["forwards_total"] for r in steps] == [3, 6, 9]


def test_slurm_status_of_a_directory_that_is_not_a_run_is_one_line_and_non_zero(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run\n")
    result = CliRunner().invoke(main, ["slurm", "status", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path.resolve()} is not a run directory (no slurm_job_id, config.yaml or "
        "task-*/): pass the run directory that zopipe slurm submit printed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing created
