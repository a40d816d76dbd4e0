"""Typed job configuration: one dataclass per component, YAML files plus dotted overrides.

A job file is a YAML mapping of sections (``model``, ``data``, ``method``, ``precision``,
``train``, ``parallel``, ``checkpoint``, ``tracking``) to keys. ``key=value`` overrides
(``method.lr=1e-6``) are parsed as YAML scalars and applied on top. :func:`load_config` validates
everything and raises one :class:`ConfigError` that lists every problem with its fix.

Field metadata carries what validation needs: ``choices`` (a list, or a zero-argument callable
returning one for registries), ``min`` / ``min_exclusive`` bounds, and ``help``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEMO_MODEL = "smollm2-135m"


def _opt(default: Any, help: str, **meta: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def _methods() -> list[str]:
    from pipeline.zo.methods import METHODS

    return sorted(METHODS)


def _tasks() -> list[str]:
    from pipeline.data.tasks import TASKS

    return sorted(TASKS)


@dataclass
class ModelConfig:
    name_or_path: str = _opt(
        DEMO_MODEL,
        f"Hugging Face model id or local directory; '{DEMO_MODEL}' is the packaged demo model",
    )
    dtype: str = _opt("fp32", "storage dtype of the weights", choices=["fp32", "bf16", "fp16"])
    trainable: list[str] = _opt(
        ["*"], "fnmatch patterns of parameter names to train (e.g. '*.self_attn.q_proj.weight'); "
        "used by method.tuning=full only (lora trains the adapter, coefficients ZO-Act's C)"
    )
    device: str = _opt("auto", "where the model runs", choices=["auto", "cpu", "cuda"])
    config_for_planning: str | None = _opt(
        None, "directory with the model's config.json for zopipe plan and train --dry-run (no "
        "weights, nothing downloaded; relative paths also resolve from the repository root); "
        "default: model.name_or_path when it is a local directory"
    )
    quantization: str = _opt(
        "none", "bitsandbytes base: nf4 / fp4 (4-bit) or int8; the quantized base is frozen, so "
        "it needs method.tuning=lora or coefficients (single backend)",
        choices=["none", "nf4", "fp4", "int8"],
    )


@dataclass
class DataConfig:
    task: str = _opt("rotten_tomatoes", "task name from the task registry", choices=_tasks)
    n_train: int = _opt(1000, "training examples sampled (MeZO protocol: 1000)", min=1)
    n_val: int = _opt(500, "validation examples (MeZO protocol: 500)", min=1)
    n_test: int = _opt(1000, "test examples (MeZO protocol: 1000)", min=1)
    split_seed: int = _opt(0, "seed of the train/validation/test sampling", min=0)
    max_length: int = _opt(256, "prompt tokens kept (longer prompts are cut from the left)", min=8)
    data_dir: str | None = _opt(
        None, "directory with train/validation/test .jsonl/.json/.csv files instead of the hub"
    )


@dataclass
class MethodConfig:
    name: str = _opt("mezo", "ZO method", choices=_methods)
    lr: float = _opt(1e-6, "learning rate η (constant)", min=0.0)
    eps: float = _opt(1e-3, "perturbation scale ε", min_exclusive=0.0)
    weight_decay: float = _opt(0.0, "λ, skipped for biases and norms", min=0.0)
    n_directions: int = _opt(1, "directions averaged per step", min=1)
    two_sided: bool = _opt(True, "two-sided (L+ - L-)/2ε, or one-sided (L+ - L0)/ε")
    bszo_k: int = _opt(
        2, "BSZO: subspace dimension k, dense directions per step (BSZO does not use "
        "n_directions or two_sided; it is one-sided by construction)", min=1,
    )
    bszo_m: int = _opt(0, "BSZO: observations per step m >= k (0 = k+1)", min=0)
    bszo_variant: str = _opt(
        "bszo", "BSZO: bszo (Alg. 1, the extra observations reuse cached forwards) or bszo_b "
        "(Alg. 2, one new forward per extra observation along Σ's top eigenvector)",
        choices=["bszo", "bszo_b"],
    )
    bszo_alpha: float = _opt(0.1, "BSZO: EMA rate α of the adaptive noise σe² (0 = fixed σe)",
                             min=0.0)
    bszo_sigma: float = _opt(0.0, "BSZO: prior σp = initial noise σe0 (0 = sqrt(n / 1e6), n the "
                             "trainable parameter count); the BSZO recipe also sets eps=1e-4",
                             min=0.0)
    adam_beta1: float = _opt(0.9, "ZO-Adam: β1 (first-moment decay), < 1", min=0.0)
    adam_beta2: float = _opt(0.999, "ZO-Adam: β2 (second-moment decay), < 1", min=0.0)
    adam_eps: float = _opt(1e-8, "ZO-Adam: ε added to sqrt(v̂)", min_exclusive=0.0)
    sgd_momentum: float = _opt(0.9, "zo_sgd_mmt: momentum β of m ← β m + ĝ, < 1", min=0.0)
    lozo_rank: int = _opt(
        2, "LOZO: rank r of the perturbation U Vᵀ of each 2-D weight (LOZO is two-sided with one "
        "direction per step: n_directions and two_sided are not used)", min=1,
    )
    lozo_nu: int = _opt(50, "LOZO: V is redrawn every ν steps", min=1)
    agzo_rank: int = _opt(1, "AGZO: rank r of each linear layer's activation basis A", min=1)
    agzo_iters: int = _opt(3, "AGZO: subspace iterations K for A (one all-reduce each)", min=1)
    agzo_max_rows: int = _opt(
        2048, "AGZO: activation rows (tokens, padding masked) kept per distinct layer input and "
        "step, over all ranks; sampled with the step seed when there are more", min=1,
    )
    match_mezo_norm: bool = _opt(
        False, "AGZO: scale Δ = R Aᵀ by sqrt(in / r) so its norm matches MeZO's z (MeZO "
        "learning rates then transfer); AGZO uses two_sided (set false: one-sided, 2 forwards)",
    )
    pgap_refresh_every: int = _opt(100, "P-GAP: steps between refreshes T of the factors "
                                   "(q probes, then a truncated SVD per 2-D weight)", min=1)
    pgap_q: int = _opt(10, "P-GAP: dense two-sided probes q per refresh (P-GAP is two-sided "
                       "with one direction per step: n_directions and two_sided are not used)",
                       min=1)
    pgap_rank: int = _opt(128, "P-GAP: rank r of each 2-D weight's factors (capped by its dims)",
                          min=1)
    pgap_delta: float = _opt(2.0, "P-GAP: δ, the aligned core's projection ⟨S̃, Z⟩ = ±√δ‖S̃‖",
                             min=0.0)
    pgap_power_iters: int = _opt(1, "P-GAP: power iterations of the randomized range finder "
                                 "(2 all-reduces per weight each)", min=0)
    tuning: str = _opt(
        "full", "what trains: full (the model.trainable weights), lora (peft LoRA adapters) or "
        "coefficients (ZO-Act's C, method.name=zoact)", choices=["full", "lora", "coefficients"],
    )
    lora_r: int = _opt(8, "LoRA rank r (MeZO's LoRA setting: 8)", min=1)
    lora_alpha: float = _opt(16.0, "LoRA scale α (the update is α/r · B A; MeZO: 16)",
                             min_exclusive=0.0)
    lora_targets: list[str] = _opt(
        ["q_proj", "v_proj"], "LoRA target modules (peft target_modules; MeZO: q and v)"
    )
    zoact_rank: int = _opt(1, "ZO-Act: rank r of each targeted layer's basis V and "
                           "coefficients C", min=1)
    zoact_q: int = _opt(1, "ZO-Act: perturbed forwards q per step (ZO-Act uses eps as μ and is "
                        "one-sided: two_sided and n_directions are not used)", min=1)
    zoact_targets: list[str] = _opt(
        ["*.self_attn.*_proj", "*.mlp.*_proj"],
        "ZO-Act: fnmatch patterns of the nn.Linear module names that get coefficients",
    )
    zoact_calib_batches: int = _opt(
        4, "ZO-Act: training batches whose activations define V (the unperturbed forwards of the "
        "first steps; C trains from the last of them on)", min=1,
    )
    zoact_micro_batches: int = _opt(
        0, "ZO-Act: forwards each batch is evaluated in (consecutive examples, loss averaged "
        "over rows); 0: 2 on a 16-bit or 4-bit base, whose fp32 flow then holds the activation "
        "bytes of one 16-bit forward, else 1. On fsdp/zero3 each part gathers the weights again",
        min=0,
    )
    zoact_calib_iters: int = _opt(30, "ZO-Act: subspace iterations computing V", min=1)
    zoact_max_rows: int = _opt(
        8192, "ZO-Act: activation rows kept per distinct layer input over the whole "
        "calibration, over all ranks", min=1,
    )
    noise: str = _opt("gaussian", "distribution of the dense directions z: gaussian (the "
                      "papers') or rademacher (±1, SPSA's original)",
                      choices=["gaussian", "rademacher"])
    cache_noise: bool = _opt(
        False, "keep the step's noise in memory (4 bytes per trainable element and direction) "
        "when it fits: one generation per step instead of three, same result bitwise",
    )


@dataclass
class PrecisionConfig:
    master_weights: str = _opt(
        "none",
        "none: the stored weights are the only copy (16-bit updates land by stochastic "
        "rounding); fp32: keep an fp32 master of the trainable weights (+4 bytes per element, "
        "updates land in the master, the stored weights are its round-to-nearest cast)",
        choices=["none", "fp32"],
    )


@dataclass
class TrainConfig:
    steps: int = _opt(1000, "ZO steps", min=0)
    max_forwards: int = _opt(
        0, "forward-pass budget: stop before the first step that starts at or past it (0 = none);"
        " compares methods at equal cost", min=0)
    batch_size: int = _opt(16, "examples per step (global)", min=1)
    seed: int = _opt(0, "run seed: data order and every direction derive from it", min=0)
    eval_every: int = _opt(0, "evaluate on eval_split every N steps (0 = only before/after)", min=0)
    eval_split: str = _opt("validation", "split of the periodic evaluations",
                           choices=["validation", "test"])
    final_split: str = _opt("test", "held-out split of the zero-shot and final accuracy",
                            choices=["validation", "test"])
    eval_zero_shot: bool = _opt(True, "evaluate before the first step")
    eval_batch_size: int = _opt(32, "examples per evaluation forward", min=1)
    threads: int = _opt(0, "torch CPU threads (0 = torch's default)", min=0)
    fused_evaluations: bool = _opt(
        False, "run a step's evaluations of one batch (MeZO's ±εz, BSZO's L0 and k points) as "
        "ONE forward of the batch repeated, each slice with its own weights: fsdp/zero3 then "
        "gather the model once per step instead of once per evaluation (S times the activation "
        "memory); false: one forward each")
    max_nonfinite_steps: int = _opt(
        10, "stop with an error after this many non-finite losses in a row", min=1
    )


@dataclass
class CheckpointConfig:
    every: int = _opt(100, "save a checkpoint every N steps (0: only at the end and on stop)",
                      min=0)
    keep_last: int = _opt(2, "complete checkpoints kept (0: all)", min=0)


@dataclass
class ParallelConfig:
    backend: str = _opt(
        "single",
        "single (one process), fsdp (PyTorch FSDP2) or zero3 (DeepSpeed ZeRO-3); the sharded "
        "backends run under torchrun (zopipe train --nproc-per-node N)",
        choices=["single", "fsdp", "zero3"],
    )
    ds_config: str | None = _opt(
        None, "DeepSpeed config for zero3 (default ds_configs/zero3_<dtype>.json)"
    )
    nodes: int = _opt(1, "nodes the job is sized for (zopipe plan, train --dry-run)", min=1)
    gpus_per_node: int = _opt(
        1, "GPUs (ranks) per node the job is sized for (zopipe plan, train --dry-run)", min=1
    )


@dataclass
class TrackingConfig:
    enabled: bool = _opt(True, "log the run to MLflow (global rank 0 only)")
    uri: str | None = _opt(
        None,
        "MLflow tracking URI; default sqlite:///<runs root>/mlflow.db, an http:// server on a "
        "cluster",
    )
    experiment: str = _opt("zo-pipeline", "MLflow experiment name")
    system_metrics: bool = _opt(True, "log CPU/GPU/memory system metrics")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}``, e.g. for tracking params."""
        return {f"{s}.{k}": v for s, keys in self.to_dict().items() for k, v in keys.items()}


class ConfigError(ValueError):
    """Every problem found in a configuration, one line each."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {e}" for e in errors))


def _sections() -> dict[str, type]:
    return typing.get_type_hints(JobConfig)


def _check_type(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``hint``; ints and numeric strings are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return True, None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _check_type(value, inner[0])
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(_check_type(v, item)[0] for v in value):
            return False, value
        return True, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        try:  # PyYAML reads 1e-5 (no dot) as a string
            number = float(value)
        except (TypeError, ValueError):
            return False, value
        return math.isfinite(number), number
    if hint is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config type {hint}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _validate_value(key: str, value: Any, meta: dict[str, Any], errors: list[str]) -> None:
    choices: Iterable[Any] | Callable[[], Iterable[Any]] | None = meta.get("choices")
    if choices is not None:
        allowed = list(choices() if callable(choices) else choices)
        if value not in allowed:
            errors.append(f"{key}: {value!r} is not allowed; choose one of {', '.join(allowed)}")
    if "min" in meta and value < meta["min"]:
        errors.append(f"{key}: {value!r} is too small; it must be >= {meta['min']}")
    if "min_exclusive" in meta and value <= meta["min_exclusive"]:
        errors.append(f"{key}: {value!r} is too small; it must be > {meta['min_exclusive']}")


def build(raw: dict[str, Any]) -> JobConfig:
    """Build and validate a :class:`JobConfig` from a nested mapping."""
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"the config must be a mapping of sections, got {type(raw).__name__}"])
    sections = _sections()
    for name in raw:
        if name not in sections:
            errors.append(f"{name}: unknown section; sections are {', '.join(sections)}")
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        given = raw.get(name) or {}
        if not isinstance(given, dict):
            errors.append(f"{name}: must be a mapping of keys, got {given!r}")
            given = {}
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in given:
            if key not in fields:
                errors.append(
                    f"{name}.{key}: unknown key; {name} keys are {', '.join(fields)}"
                )
        values: dict[str, Any] = {}
        for key, f in fields.items():
            if key not in given:
                continue
            ok, value = _check_type(given[key], hints[key])
            if not ok:
                errors.append(
                    f"{name}.{key}: expected {_type_name(hints[key])}, got {given[key]!r}"
                )
                continue
            if value is not None:
                _validate_value(f"{name}.{key}", value, dict(f.metadata), errors)
            values[key] = value
        built[name] = cls(**values)
    if not errors:
        from pipeline.combinations import combination_errors

        errors += combination_errors(JobConfig(**built))
    if errors:
        raise ConfigError(errors)
    return JobConfig(**built)


def parse_overrides(overrides: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """``["a.b=1", ...]`` -> nested dict, plus the errors of malformed items."""
    nested: dict[str, Any] = {}
    errors: list[str] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            errors.append(f"{item!r}: overrides are section.key=value, e.g. method.lr=1e-6")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        nested.setdefault(parts[0], {})[parts[1]] = value
    return nested, errors


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, keys in extra.items():
        if isinstance(out.get(section), dict) and isinstance(keys, dict):
            out[section].update(keys)
        else:
            out[section] = keys
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such config file"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML ({exc})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: must hold a mapping of sections"])
    return data


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> JobConfig:
    """Read a job file (or the defaults when ``path`` is None), apply overrides, validate."""
    raw = read_yaml(path) if path is not None else {}
    extra, errors = parse_overrides(overrides)
    try:
        cfg = build(merge(raw, extra))
    except ConfigError as exc:
        raise ConfigError(errors + exc.errors) from None
    if errors:
        raise ConfigError(errors)
    return cfg
