"""Render, submit and watch SLURM jobs from job configs.

``zopipe slurm render JOB.yaml [key=value ...]`` fills ``slurm/train.sbatch`` (or, with
``--sweep FILE``, ``slurm/sweep.sbatch``) and prints the batch script; ``submit`` also creates the
run directory and hands the script to ``sbatch``; ``status RUN_DIR`` reports the SLURM state, the
step reached and the MLflow run.

Everything about the cluster (partition, account, modules, container, environment, extra
``#SBATCH`` lines) comes from a site config, a small YAML file given with ``--site`` or
``$ZOPIPE_SLURM_SITE``; ``slurm/site.example.yaml`` documents every key. Templates are never
edited per cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.config import ConfigError, JobConfig, load_config
from pipeline.out_dirs import OutDirError, check_writable, created
from pipeline.stopping import STOPPED_FILE

SITE_ENV = "ZOPIPE_SLURM_SITE"
TEMPLATES = Path(__file__).resolve().parent.parent / "slurm"
JOB_ID_FILE = "slurm_job_id"


class SlurmError(ValueError):
    """A SLURM job cannot be rendered or submitted; the message says why and what to do."""


@dataclass
class Site:
    """Cluster settings (see ``slurm/site.example.yaml``)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"
    sbatch: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    srun: list[str] = field(default_factory=list)
    python: str | None = None
    cpus_per_rank: int = 1
    signal_lead: int = 300


def load_site(path: str | Path | None) -> Site:
    """The site config at ``path`` (or ``$ZOPIPE_SLURM_SITE``); defaults when neither is set."""
    path = path or os.environ.get(SITE_ENV)
    if not path:
        return Site()
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SlurmError(f"cannot read the site config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise SlurmError(f"site config {path}: expected a mapping of keys")
    fields = {f.name: f for f in dataclasses.fields(Site)}
    errors = [f"{key}: unknown key; site keys are {', '.join(fields)}"
              for key in raw if key not in fields]
    for key, value in raw.items():
        if key not in fields or value is None:
            continue
        default = getattr(Site(), key)
        if isinstance(default, list):
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            expected = "a list of strings"
        elif isinstance(default, dict):
            ok = isinstance(value, dict)
            expected = "a mapping NAME: value"
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            expected = "a non-negative integer"
        else:
            ok = isinstance(value, str)
            expected = "a string"
        if not ok:
            errors.append(f"{key}: expected {expected}, got {value!r}")
    if errors:
        raise SlurmError(f"site config {path}:\n" + "\n".join(f"  - {e}" for e in errors))
    site = Site(**{k: v for k, v in raw.items() if v is not None})
    site.env = {str(k): str(v) for k, v in site.env.items()}
    return site


@dataclass
class Resources:
    """What the job asks for: ``nproc_per_node`` ranks on each of ``nodes`` nodes."""

    nodes: int = 1
    gpus_per_node: int = 0
    ntasks_per_node: int | None = None  # ranks per node; default: the GPUs per node, or 1
    time: str | None = None
    partition: str | None = None

    @property
    def nproc_per_node(self) -> int:
        return self.ntasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


def _validate(config: str, overrides: list[str], resources: Resources, what: str) -> JobConfig:
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        raise SlurmError(f"{what}: {exc}") from exc
    errors = []
    world = resources.world_size
    if world > 1 and cfg.parallel.backend == "single":
        errors.append(f"{world} ranks need parallel.backend=fsdp or zero3 (single is one process)")
    if cfg.train.batch_size % world:
        errors.append(f"train.batch_size={cfg.train.batch_size} must be a multiple of the "
                      f"{world} ranks")
    if resources.gpus_per_node and cfg.model.device == "cpu":
        errors.append("model.device=cpu with --gpus-per-node: drop one of them")
    if errors:
        raise SlurmError(f"{what}:\n" + "\n".join(f"  - {e}" for e in errors))
    return cfg


def _fill(template: str, values: dict[str, str]) -> str:
    def sub(match: re.Match) -> str:
        return values[match.group(1)]

    missing = set(re.findall(r"{{(\w+)}}", template)) - set(values)
    if missing:
        raise SlurmError(f"template needs {', '.join(sorted(missing))}")
    return re.sub(r"{{(\w+)}}", sub, template)


def _dquote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _site_lines(site: Site) -> str:
    lines = [f"module load {shlex.quote(m)}" for m in site.modules]
    lines += site.setup
    # Double quotes: a value may use the job's environment ($USER, $SLURM_JOB_ID).
    lines += [f'export {name}="{_dquote(value)}"' for name, value in site.env.items()]
    return "\n".join(lines) if lines else "# (no site setup lines)"


def render(config: str | Path, overrides: list[str], run_dir: Path, resources: Resources,
           site: Site, *, sweep: list[list[str]] | None = None, parallel: int = 0,
           job_name: str | None = None, workdir: Path | None = None) -> str:
    """The batch script of a job (or, with ``sweep`` override sets, of a job array).

    ``run_dir`` is the run directory (for a sweep: the sweep directory holding ``task-<i>``).
    Every config, the base one and each sweep task's, is validated first.
    """
    config = Path(config).resolve()
    run_dir = Path(run_dir).resolve()
    cfg = _validate(str(config), overrides, resources, str(config))
    for i, task in enumerate(sweep or []):
        _validate(str(config), overrides + task, resources, f"sweep task {i} ({' '.join(task)})")
    sbatch = [f"#SBATCH --{key}={value}" for key, value in (
        ("partition", resources.partition or site.partition), ("account", site.account),
        ("qos", site.qos), ("gpus-per-node", resources.gpus_per_node or None)) if value]
    sbatch += [f"#SBATCH {line}" for line in site.sbatch]
    values = {
        "job_name": job_name or f"zo-{cfg.method.name}-{cfg.data.task}",
        "nodes": str(resources.nodes),
        "nproc_per_node": str(resources.nproc_per_node),
        "cpus_per_rank": str(site.cpus_per_rank),
        "cpus_per_node": str(resources.nproc_per_node * site.cpus_per_rank),
        "sbatch_lines": "\n".join(sbatch) if sbatch else "# (no site #SBATCH lines)",
        "time": resources.time or site.time,
        "workdir": shlex.quote(str((workdir or Path.cwd()).resolve())),
        "signal_lead": str(site.signal_lead),
        "site_lines": _site_lines(site),
        "config": shlex.quote(str(config)),
        "overrides": " ".join(shlex.quote(o) for o in overrides),
        "run_dir": shlex.quote(str(run_dir)),
        "srun_args": "".join(f" {shlex.quote(a)}" for a in site.srun),
        "python": site.python or shlex.quote(sys.executable),
    }
    name = "train.sbatch" if sweep is None else "sweep.sbatch"
    if not (TEMPLATES / name).is_file():
        raise SlurmError(f"{TEMPLATES / name} not found: the templates ship with the repository; "
                         "install from a clone (pip install -e .)")
    template = (TEMPLATES / name).read_text()
    if sweep is not None:
        values.update(
            sweep_dir=values.pop("run_dir"),
            last_task=str(len(sweep) - 1),
            throttle=f"%{parallel}" if parallel else "",
            task_cases="\n".join(
                f"    {i}) OVERRIDES+=({' '.join(shlex.quote(o) for o in task)}) ;;"
                for i, task in enumerate(sweep)),
        )
    return _fill(template, values)


def default_run_dir(config: str | Path, overrides: list[str], sweep: bool,
                    root: Path = Path("runs")) -> Path:
    cfg = load_config(str(config), overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kind = "sweep-" if sweep else ""
    return (root / f"{stamp}-{kind}{cfg.method.name}-{cfg.data.task}").resolve()


def submit(script: str, run_dir: Path) -> str:
    """Create ``run_dir`` (SLURM opens the log there), ``sbatch`` the script; the job id. A job
    sbatch refuses leaves no run directory behind."""
    try:
        check_writable(run_dir, "give --run-dir a directory you can write in")
    except OutDirError as exc:
        raise SlurmError(str(exc)) from None
    with created(run_dir):
        try:
            proc = subprocess.run(["sbatch", "--parsable"], input=script, text=True,
                                  capture_output=True, check=False)
        except FileNotFoundError as exc:
            raise SlurmError("sbatch not found: run on a SLURM login node, or start the local "
                             "one-node SLURM with sudo slurm/local/start.sh") from exc
        if proc.returncode != 0:
            raise SlurmError(
                f"sbatch refused the job: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    (run_dir / JOB_ID_FILE).write_text(job_id + "\n")
    return job_id


def _slurm_state(job_id: str) -> str:
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i %T %r %M %N"],
                             capture_output=True, text=True, check=False, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return "unknown (squeue unavailable)"
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    if lines:
        return "; ".join(lines)
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                         check=False, timeout=30)
    found = dict(re.findall(r"(JobState|ExitCode|Restarts)=(\S+)", out.stdout))
    if found:
        return " ".join(f"{k}={v}" for k, v in found.items())
    return "not in the queue any more (ended)"


def _run_status(run_dir: Path) -> list[str]:
    from pipeline import checkpoint  # imports torch: only for status

    lines = []
    found = checkpoint.latest(run_dir)
    steps = [json.loads(line).get("step", 0) for line in (run_dir / "metrics.jsonl").open()
             if line.strip()] if (run_dir / "metrics.jsonl").exists() else []
    total = None
    if (run_dir / "config.yaml").exists():
        cfg = load_config(str(run_dir / "config.yaml"), [])
        total = cfg.train.steps
    if (run_dir / "summary.json").exists():
        lines.append(f"finished: {json.loads((run_dir / 'summary.json').read_text())['steps']} "
                     "steps")
    elif (run_dir / STOPPED_FILE).exists():
        lines.append(f"stopped: {json.loads((run_dir / STOPPED_FILE).read_text())}")
    lines.append(f"step: {max(steps, default=0)} of {total if total is not None else '?'}; "
                 f"latest checkpoint: {f'step-{found[0]}' if found else 'none'}")
    lines.append(f"mlflow: {_mlflow_status(run_dir)}")
    return lines


def _mlflow_status(run_dir: Path) -> str:
    from pipeline.tracking import default_tracking_uri, read_run_id

    run_id = read_run_id(run_dir)
    if run_id is None:
        return "no run yet"
    uri = default_tracking_uri(run_dir)
    if (run_dir / "config.yaml").exists():
        uri = load_config(str(run_dir / "config.yaml"), []).tracking.uri or uri
    try:
        from mlflow import MlflowClient

        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except Exception as exc:  # an unreachable server is a status too
        return f"run {run_id} at {uri} (unreadable: {type(exc).__name__})"
    parent = run.data.tags.get("mlflow.parentRunId")
    return (f"run {run_id} {run.info.status} at {uri}" +
            (f", child of {parent}" if parent else ""))


def status(run_dir: Path) -> str:
    """SLURM state, step reached and MLflow run of a run (or each task of a sweep)."""
    run_dir = Path(run_dir).resolve()
    job_file = run_dir / JOB_ID_FILE
    if not (job_file.exists() or (run_dir / "config.yaml").exists()
            or any(run_dir.glob("task-*/config.yaml"))):
        from pipeline.run_dir import RunDirError

        raise RunDirError(f"{run_dir} is not a run directory (no {JOB_ID_FILE}, config.yaml or "
                          "task-*/): pass the run directory that zopipe slurm submit printed")
    job_id = job_file.read_text().strip() if job_file.exists() else None
    lines = [f"run directory: {run_dir}",
             f"slurm job {job_id}: {_slurm_state(job_id)}" if job_id else "slurm job: unknown"]
    tasks = sorted(run_dir.glob("task-*"), key=lambda p: int(p.name.split("-")[1]))
    if tasks:
        for task in tasks:
            lines.append(f"{task.name}:")
            lines += [f"  {line}" for line in _run_status(task)]
    else:
        lines += _run_status(run_dir)
    return "\n".join(lines)
