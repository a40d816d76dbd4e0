"""SLURM: rendered batch scripts, and jobs on a real one-node SLURM (slurm/local/start.sh).

The job tests submit with ``zopipe slurm submit`` exactly as a user would: a 2-rank gloo run to
completion, the same run preempted by USR2 (checkpoint, requeue, resume: bitwise the same weights,
one MLflow run) and a 2-task sweep array (2 child runs under one parent run).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from pipeline import checkpoint
from pipeline.metrics import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}


def zopipe(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def render(*args, check=True):
    """``zopipe slurm render ...`` in this process (the CLI imports torch: seconds per start)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        result = CliRunner().invoke(main, ["slurm", "render", *map(str, args)])
    finally:
        os.chdir(cwd)
    if check:
        assert result.exit_code == 0, result.output
    result.returncode = result.exit_code
    return result


# -- rendering (no SLURM needed) -----------------------------------------------------------------


def test_render_multi_node_script(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({
        "partition": "gpu", "account": "proj", "modules": ["cuda/12.4"],
        "setup": ["source /opt/venv/bin/activate"], "env": {"HF_HOME": "/scratch/$USER/hf"},
        "sbatch": ["--exclusive"], "srun": ["--container-image=/img.sqsh"], "cpus_per_rank": 4,
        "signal_lead": 600}))
    run_dir = tmp_path / "run"
    out = render("jobs/demo.yaml", "parallel.backend=fsdp", "method.lr=2e-6",
                 "train.batch_size=64", "--nodes", 4, "--gpus-per-node", 8, "--time", "12:00:00",
                 "--partition", "big", "--site", site, "--run-dir", run_dir).stdout
    lines = out.splitlines()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=32",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --partition=big", "#SBATCH --account=proj",
                 "#SBATCH --exclusive", "#SBATCH --time=12:00:00", "#SBATCH --signal=B:USR2@600",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={run_dir}/slurm-%j.out", f"#SBATCH --chdir={ROOT}",
                 "module load cuda/12.4", "source /opt/venv/bin/activate",
                 'export HF_HOME="/scratch/$USER/hf"', "NPROC_PER_NODE=8",
                 f"RUN_DIR={run_dir}", f"CONFIG={ROOT}/jobs/demo.yaml",
                 "OVERRIDES=(parallel.backend=fsdp method.lr=2e-6 train.batch_size=64)"):
        assert line in lines, line
    assert "--partition=gpu" not in out  # the flag beats the site config
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in out
    launch = " ".join(out[out.index("srun "):].split("&\n")[0].split())
    for part in ("srun --kill-on-bad-exit=1", '--ntasks="$SLURM_NNODES" --ntasks-per-node=1',
                 "--container-image=/img.sqsh", "-m torch.distributed.run",
                 '--nnodes="$SLURM_NNODES"', '--nproc-per-node="$NPROC_PER_NODE"',
                 "--rdzv-backend=c10d", '--rdzv-endpoint="$head_node:$rdzv_port"',
                 '--rdzv-id="$SLURM_JOB_ID"', "-m pipeline.cli train"):
        assert part in launch, part
    assert "trap " in out and 'touch "$RUN_DIR/STOP"' in out and "scontrol requeue" in out
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" in out and "# export NCCL_SOCKET_IFNAME" in out
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0


def test_render_sweep_array(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("grid:\n  method.lr: [1.0e-6, 1.0e-5]\n  method.eps: [1.0e-3, 1.0e-2]\n"
                     "runs:\n  - {method.lr: 1.0e-7, train.steps: 80}\n")
    out = render("jobs/demo.yaml", "--sweep", sweep, "--parallel", 2,
                 "--run-dir", tmp_path / "sw").stdout
    assert "#SBATCH --array=0-4%2" in out.splitlines()
    assert f"#SBATCH --output={tmp_path}/sw/slurm-%A_%a.out" in out
    cases = re.findall(r"^\s+(\d)\) OVERRIDES\+=\((.*)\) ;;$", out, re.M)
    assert cases == [("0", "method.lr=1.0e-06 method.eps=0.001"),
                     ("1", "method.lr=1.0e-06 method.eps=0.01"),
                     ("2", "method.lr=1.0e-05 method.eps=0.001"),
                     ("3", "method.lr=1.0e-05 method.eps=0.01"),
                     ("4", "method.lr=1.0e-07 train.steps=80")]
    assert 'RUN_DIR=$ZOPIPE_SWEEP_DIR/task-$SLURM_ARRAY_TASK_ID' in out
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0


def test_render_refuses_bad_jobs_with_one_message(tmp_path):
    proc = render("jobs/demo.yaml", "method.lr=abc", "--run-dir", tmp_path,
                  check=False)
    assert proc.returncode == 2 and "method.lr" in proc.stderr and "Traceback" not in proc.stderr
    proc = render("jobs/demo.yaml", "--ntasks-per-node", 3, check=False)
    assert proc.returncode == 2 and "parallel.backend=fsdp or zero3" in proc.stderr
    assert "multiple of the 3 ranks" in proc.stderr
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("grid:\n  method.lr: [1.0e-6, -1]\n")
    proc = render("jobs/demo.yaml", "--sweep", sweep, check=False)
    assert proc.returncode == 2 and "sweep task 1 (method.lr=-1)" in proc.stderr
    site = tmp_path / "site.yaml"
    site.write_text("partitoin: gpu\ncpus_per_rank: many\n")
    proc = render("jobs/demo.yaml", "--site", site, check=False)
    assert proc.returncode == 2 and "partitoin: unknown key" in proc.stderr
    assert "cpus_per_rank: expected a non-negative integer" in proc.stderr


def test_submit_without_sbatch_is_one_line_and_leaves_no_run_directory(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli import main

    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sbatch on it
    result = CliRunner().invoke(main, ["slurm", "submit", str(ROOT / "jobs/demo.yaml"),
                                       "--run-dir", str(tmp_path / "runs" / "run")])
    assert result.exit_code == 1, result.output or result.exception
    assert result.output.startswith("Error: sbatch not found: run on a SLURM login node")
    assert [p.name for p in tmp_path.iterdir()] == ["bin"]  # no run directory, no runs/


def test_site_example_is_valid():
    from pipeline.slurm import load_site

    site = load_site(ROOT / "slurm" / "site.example.yaml")
    assert site.partition and site.modules and site.srun and site.cpus_per_rank > 1


# -- a real SLURM -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_slurm():
    if os.geteuid() != 0:
        pytest.skip("the local SLURM needs root (slurm/local/start.sh installs and starts it)")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and apt-get is unavailable to install it")
    proc = subprocess.run([str(ROOT / "slurm/local/start.sh")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    os.environ["SLURM_CONF"] = os.environ.get("ZOPIPE_SLURM_DIR", "/tmp/zopipe-slurm") + \
        "/slurm.conf"


@pytest.fixture(scope="module")
def job_args(tiny_model_dir):
    return [f"model.name_or_path={tiny_model_dir}", "data.n_train=64", "data.n_val=16",
            "data.n_test=32", "train.batch_size=8", "method.lr=1e-3", "train.threads=1",
            "train.eval_zero_shot=false", f"train.steps={STEPS}", "checkpoint.every=0",
            "tracking.system_metrics=false"]


def submit(*args):
    out = zopipe("slurm", "submit", "jobs/demo.yaml", *args, "--time", "10:00").stdout
    job_id = re.search(r"^submitted job (\d+)$", out, re.M).group(1)
    run_dir = Path(re.search(r"^run directory: (.+)$", out, re.M).group(1))
    assert run_dir.is_absolute()
    return job_id, run_dir


def job_fields(job_id):
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True,
                         text=True).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", record)) for record in out.split("\n\n")
            if "JobState=" in record]


def wait_job(job_id, log_glob, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = job_fields(job_id)
        if records and all(r["JobState"] in TERMINAL for r in records):
            return records
        time.sleep(1)
    logs = "\n".join(p.read_text()[-3000:] for p in log_glob)
    pytest.fail(f"job {job_id} not done after {timeout} s: {job_fields(job_id)}\n{logs}")


def losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def final_shards(run_dir):
    step, path = checkpoint.latest(run_dir)
    assert step == STEPS
    return {p.name: load_file(str(p)) for p in sorted(path.glob("shards-rank*.safetensors"))}


def mlflow_client(run_dir):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent}/mlflow.db")


@pytest.fixture(scope="module")
def reference(local_slurm, job_args, tmp_path_factory):
    """A 2-rank gloo run of the demo recipe (tiny model), submitted and run to completion."""
    job_id, run_dir = submit(*job_args, "parallel.backend=fsdp", "--ntasks-per-node", 2,
                             "--run-dir", tmp_path_factory.mktemp("ref") / "run")
    records = wait_job(job_id, run_dir.glob("slurm-*.out"))
    return job_id, run_dir, records


@pytest.mark.slow
def test_submit_runs_to_completion(reference):
    job_id, run_dir, records = reference
    log = (run_dir / f"slurm-{job_id}.out").read_text()
    assert records[0]["JobState"] == "COMPLETED" and records[0]["ExitCode"] == "0:0", log
    assert records[0]["Restarts"] == "0"
    assert "1 node(s) x 2 rank(s)" in log
    assert sorted(p.name for p in checkpoint.latest(run_dir)[1].glob("shards-*")) == [
        "shards-rank0.safetensors", "shards-rank1.safetensors"]
    assert len(losses(run_dir)) == STEPS and all(x == x for x in losses(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and 0 <= summary["final"]["accuracy"] <= 1
    client = mlflow_client(run_dir)
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED" and run.data.tags["slurm.job_id"] == job_id
    status = zopipe("slurm", "status", run_dir).stdout
    assert f"slurm job {job_id}: JobState=COMPLETED" in status
    assert f"step: {STEPS} of {STEPS}" in status and f"{run.info.run_id} FINISHED" in status


@pytest.mark.slow
def test_usr2_checkpoints_requeues_and_resumes_bitwise(reference, job_args, tmp_path):
    _, ref_dir, _ = reference
    job_id, run_dir = submit(*job_args, "parallel.backend=fsdp", "--ntasks-per-node", 2,
                             "--run-dir", tmp_path / "run")
    log = run_dir / f"slurm-{job_id}.out"
    deadline = time.monotonic() + 240
    while len(losses(run_dir) if (run_dir / "metrics.jsonl").exists() else []) < 3:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], check=True)
    while "requeueing" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    client = mlflow_client(run_dir)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"  # before the requeued job restarts
    stopped_at = int(re.search(r"stopped at step (\d+)", log.read_text()).group(1))
    assert 3 <= stopped_at < STEPS

    records = wait_job(job_id, [log])
    text = log.read_text()
    assert records[0]["JobState"] == "COMPLETED" and records[0]["Restarts"] == "1", text
    assert f"resuming {run_dir} from step-{stopped_at}" in text
    assert losses(run_dir) == losses(ref_dir)
    ours, ref = final_shards(run_dir), final_shards(ref_dir)
    assert ours.keys() == ref.keys() and len(ours) == 2
    for name in ref:
        assert all(ours[name][k].equal(ref[name][k]) for k in ref[name]), name
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags.get("zo.resumed") == "true"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow
def test_sweep_array_groups_child_runs_under_one_parent(local_slurm, job_args, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("grid:\n  method.lr: [1.0e-3, 1.0e-4]\n")
    args = [a for a in job_args if not a.startswith(("train.steps", "method.lr"))]
    job_id, sweep_dir = submit(*args, "train.steps=4", "--sweep", sweep,
                               "--run-dir", tmp_path / "sweep")
    records = wait_job(job_id, sweep_dir.glob("slurm-*.out"))
    logs = "\n".join(p.read_text() for p in sweep_dir.glob("slurm-*.out"))
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1"], logs
    assert all(r["JobState"] == "COMPLETED" for r in records), logs

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{sweep_dir}/mlflow.db")
    parent_id = (sweep_dir / "mlflow_parent_run_id").read_text().strip()
    parent = client.get_run(parent_id)
    assert parent.data.tags["slurm.array_job_id"] == job_id
    runs = client.search_runs([parent.info.experiment_id])
    children = [r for r in runs if r.info.run_id != parent_id]
    assert len(runs) == 3 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent_id}
    assert sorted(float(r.data.params["method.lr"]) for r in children) == [1e-4, 1e-3]
    assert all(r.info.status == "FINISHED" for r in children)
    for task in (0, 1):
        run_id = (sweep_dir / f"task-{task}" / "mlflow_run_id").read_text().strip()
        assert run_id in {r.info.run_id for r in children}


def test_a_refused_submit_leaves_no_run_directory(local_slurm, tmp_path):
    run_dir = tmp_path / "runs" / "run"
    proc = zopipe("slurm", "submit", "jobs/demo.yaml", "--partition", "no-such-partition",
                  "--run-dir", run_dir, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("Error: sbatch refused the job:"), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_local_slurm_scripts_refuse_without_root():
    if os.geteuid() != 0 or not shutil.which("runuser"):
        pytest.skip("needs root and runuser to run the scripts as another user")
    for script in ("start.sh", "stop.sh"):
        proc = subprocess.run(["runuser", "-u", "nobody", "--", str(ROOT / "slurm/local" / script)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and "must run as root" in proc.stderr, proc.stderr
