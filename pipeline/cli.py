"""``zopipe``: the command line. Options live in the config; the CLI adds only a few flags.

Every command takes a job file plus ``section.key=value`` overrides. Errors a user can fix (a bad
config, missing data, an unreachable registry) print one message and exit non-zero, without a
traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pipeline.config import ConfigError, load_config

EXIT_CONFIG = 2


def _user_errors() -> tuple[type[Exception], ...]:
    from pipeline.assets import AssetError
    from pipeline.data.loading import DataError
    from pipeline.models.loading import ModelError
    from pipeline.train import RunDirError

    return (AssetError, DataError, ModelError, RunDirError)


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


@main.command()
@config_arg
@overrides_arg
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the run writes its files (default: runs/<time>-<method>-<task>).")
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in batch logs).")
def train(config, overrides, run_dir, no_progress):
    """Fine-tune with a ZO method: CONFIG [section.key=value ...]."""
    from pipeline.train import default_run_dir, run

    cfg = _config(config, overrides)
    run_dir = run_dir or default_run_dir(cfg)
    summary = _guarded(run, cfg, run_dir, progress=not no_progress)
    click.echo(_summary_text(summary, run_dir))


def _summary_text(summary: dict, run_dir: Path) -> str:
    def acc(entry):
        if not entry:
            return "not measured"
        return f"{entry['accuracy']:.3f} ± {entry['stderr']:.3f} (n={entry['n']}, {entry['split']})"

    lines = [
        f"run directory: {run_dir}",
        f"method {summary['method']} on {summary['task']}: {summary['steps']} steps, "
        f"{summary['forwards']} forward passes, {summary['wall_seconds']:.0f} s",
        f"zero-shot accuracy: {acc(summary['zero_shot'])}",
        f"final accuracy:     {acc(summary['final'])}",
    ]
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
    """Accuracy of the configured model (model.name_or_path) on a split of the task."""
    from pipeline.evaluation import evaluate
    from pipeline.train import build

    cfg = _config(config, overrides)
    backend, _, data = _guarded(build, cfg)
    acc = evaluate(backend, data, split, cfg.train.eval_batch_size)
    click.echo(json.dumps(acc.as_dict()) if as_json else f"accuracy: {acc}")


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
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path),
              help="Cache directory (default: $ZOPIPE_CACHE or ~/.cache/zo-pipeline).")
def assets(cache):
    """Prepare the packaged demo model and data (idempotent)."""
    from pipeline.assets import ensure_assets

    paths = _guarded(ensure_assets, cache)
    click.echo(f"model: {paths.model_dir}\ndata:  {paths.rotten_tomatoes_csv}")


if __name__ == "__main__":
    main()
