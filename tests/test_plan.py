"""zopipe plan and train --dry-run on the shipped 13B+ recipes (model configs only, no weights),
and validation of every shipped job file."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.models.meta import hf_config, meta_model, planning_config_dir
from pipeline.plan import format_plan, make_plan

ROOT = Path(__file__).resolve().parents[1]
# jobs/learning/ holds bench/learning.py specs (recipes plus overrides), not job configs
JOBS = sorted(p for p in (ROOT / "jobs").rglob("*.yaml") if p.parent.name != "learning")
RECIPES = ROOT / "jobs" / "recipes"
# Sizes as published (model cards / papers): OPT 13B and 30B, Llama 3 8B, Qwen3 8.2B and 32.8B.
PUBLISHED = {"opt-13b": 13.0e9, "opt-30b": 30.0e9, "llama-3-8b": 8.0e9, "qwen3-8b": 8.2e9,
             "qwen3-32b": 32.8e9}


def _model_dir(recipe: Path) -> str:
    return Path(yaml.safe_load(recipe.read_text())["model"]["config_for_planning"]).name


BIG = [p for p in sorted(RECIPES.glob("*.yaml")) if PUBLISHED[_model_dir(p)] >= 13e9]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_model_config_builds_on_meta_with_published_size(name):
    model_cfg = load_config(None, [f"model.config_for_planning=jobs/models/{name}"]).model
    model = meta_model(model_cfg, hf_config(model_cfg))
    total = sum(p.numel() for p in model.parameters())
    assert all(p.device.type == "meta" for p in model.parameters())
    assert abs(total - PUBLISHED[name]) / PUBLISHED[name] < 0.02, total


@pytest.mark.parametrize("job", JOBS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_job_validates(job):
    cfg = load_config(job)
    if cfg.model.config_for_planning is not None:
        assert (planning_config_dir(cfg.model) / "config.json").is_file()
    if cfg.parallel.ds_config is not None:
        assert (ROOT / cfg.parallel.ds_config).is_file()
    assert cfg.train.batch_size % (cfg.parallel.nodes * cfg.parallel.gpus_per_node) == 0
    if "recipes" in job.parts:
        head = job.read_text().split("\nmodel:")[0]
        world = cfg.parallel.nodes * cfg.parallel.gpus_per_node
        assert f"{cfg.parallel.nodes} node(s) x {cfg.parallel.gpus_per_node} GPU(s)" in head
        assert f"= {world} rank(s)" in head and "Expected memory per GPU" in head


@pytest.mark.parametrize("recipe", BIG, ids=lambda p: p.stem)
def test_plan_of_13b_recipes_counts_and_scales(recipe):
    cfg = load_config(recipe)
    published = PUBLISHED[_model_dir(recipe)]
    nodes, gpus = cfg.parallel.nodes, cfg.parallel.gpus_per_node
    plan = make_plan(cfg)
    assert abs(plan.total_params - published) / published < 0.02
    if cfg.method.name != "zoact":
        assert plan.trainable_params == plan.total_params
    if cfg.parallel.backend == "single":
        return
    double = make_plan(cfg, nodes=2 * nodes, gpus_per_node=gpus)
    for backend in ("zero3", "fsdp"):
        assert plan.memory[backend]["masters"] == 0  # the default keeps no fp32 master
        for line in ("weights",):
            half = double.memory[backend][line] / plan.memory[backend][line]
            assert half == pytest.approx(0.5, rel=0.01), (backend, line)
        assert double.memory[backend]["gathered"] == plan.memory[backend]["gathered"]
        assert double.total(backend) < plan.total(backend)
    # the recipe's header states the planned memory of its backend
    expected = f"{plan.total(cfg.parallel.backend) / 1024**3:.1f} GiB of 80 GiB"
    assert expected in recipe.read_text()
    assert plan.verdict(cfg.parallel.backend).startswith("fits")
    tiny = make_plan(cfg, nodes=1, gpus_per_node=1, gpu_memory_gib=24)
    assert tiny.verdict(cfg.parallel.backend).startswith("does not fit")


def test_training_plans_in_the_memory_of_inference_and_masters_cost_4_bytes_each():
    """The 13B fp16 zero3 recipe on one 80 GiB GPU: the weights (2 bytes each) plus a few GiB
    (was 75.2 GiB with the fp32 masters of the former default)."""
    recipe = Path("jobs/recipes/opt-13b-mezo-fp16-zero3.yaml")
    plan = make_plan(load_config(recipe), nodes=1, gpus_per_node=1)
    mem = plan.memory["zero3"]
    assert plan.total("zero3") <= 28 * 1024**3, plan.total("zero3") / 1024**3
    assert mem["masters"] == mem["method"] == 0
    assert mem["weights"] == pytest.approx(2 * plan.total_params, rel=1e-3)
    masters = make_plan(load_config(recipe, ["precision.master_weights=fp32"]), nodes=1,
                        gpus_per_node=1)
    assert masters.memory["zero3"]["masters"] == pytest.approx(4 * plan.total_params, rel=1e-3)
    adam = make_plan(load_config(recipe, ["method.name=zo_adam"]), nodes=1, gpus_per_node=1)
    assert adam.memory["zero3"]["method"] == pytest.approx(8 * plan.total_params, rel=1e-3)
    assert "fp32 moments" in format_plan(adam)


DRY = textwrap.dedent("""
    import json, sys
    from pipeline.config import load_config
    from pipeline.dryrun import dry_run
    run = dry_run(load_config(sys.argv[1]))
    print("RESULT " + json.dumps({
        "total": run.total_params, "rank_elements": run.rank_elements,
        "rank_blocks": run.rank_blocks, "backend_elements": run.backend_elements,
        "stored": run.stored_elements, "forwards": run.forwards, "collectives": run.collectives,
        "drawn": sum(run.noise_blocks.values()), "distinct": len(run.noise_blocks)}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("recipe, forwards, bases, gathered", [
    ("opt-13b-mezo-fp16-zero3", 2, 0, 2),  # MeZO: L+ and L-, one all-gather of both
    ("opt-13b-bszo-bf16-fsdp", 3, 0, 3),  # BSZO k=2: L0, L1, L2, one all-gather of k+1
    # AGZO: K=3 basis reductions per distinct layer input, 4 in each of the 40 blocks (q/k/v
    # share theirs, out_proj, fc1, fc2: as in a real forward), then L0 and L+
    ("opt-13b-agzo-bf16-zero3", 2, 3 * 40 * 4, 2),
])
def test_dry_run_of_13b_recipes(recipe, forwards, bases, gathered):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", DRY, str(RECIPES / f"{recipe}.yaml")],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    run = json.loads(line[len("RESULT "):])
    assert run["total"] == 12_853_473_280
    assert sum(run["rank_elements"]) == run["total"]  # every element on exactly one rank
    assert len(run["rank_elements"]) == 4
    assert run["backend_elements"] == run["rank_elements"][0]
    assert run["forwards"] == forwards
    # the planner's weights line is what the real backend stores on rank 0
    cfg = load_config(RECIPES / f"{recipe}.yaml")
    plan = make_plan(cfg)
    assert plan.memory[cfg.parallel.backend]["weights"] == run["stored"] * 2
    # vectors reduce chunk by chunk (all-to-all, then all-gather of the summed chunks); the
    # step's scalars (the losses) in one all-gather
    ops = [c["op"] for c in run["collectives"]]
    assert ops == ["all_to_all_single", "all_gather_into_tensor"] * bases + ["all_gather"]
    assert run["collectives"][-1]["numel"] == gathered
    if bases:
        # AGZO's basis products: r = 1 value per input feature of each distinct layer input
        basis = [c["numel"] for c in run["collectives"][:-1:2]]
        assert basis == [n for n in (5120, 5120, 5120, 20480) for _ in range(3)] * 40
    if recipe.startswith("opt-13b-mezo"):
        # the writes of +εz and -εz for the gathers, and the update, each regenerate z once
        assert run["distinct"] == run["rank_blocks"][0]
        assert run["drawn"] == 3 * run["rank_blocks"][0]


def _tensor_bytes(model) -> int:
    """Bytes of every distinct parameter of a loaded model, with a 4-bit weight's quantization
    state (its absmax, the nested absmax and their code tables)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        state = getattr(p, "quant_state", None)
        parts = [p]
        if state is not None:
            parts += [state.absmax, state.code]
            if state.nested:
                parts += [state.offset, state.state2.absmax, state.state2.code]
        total += sum(t.numel() * t.element_size() for t in parts)
    return total


@pytest.mark.parametrize("job, overrides", [
    ("jobs/demo.yaml", ["model.dtype=fp32"]),
    ("jobs/demo.yaml", ["model.dtype=bf16"]),
    ("jobs/zoact.yaml", ["model.dtype=bf16", "model.quantization=nf4",
                         "model.trainable=[model.norm.weight]"]),
])
def test_plan_weights_line_is_the_loaded_demo_models_tensor_bytes(job, overrides):
    """The planner's weights line against the bytes of the demo model as the pipeline loads it
    (the sharded lines are checked against a dry run's real shards in
    test_dry_run_of_13b_recipes)."""
    from pipeline.assets import ensure_assets
    from pipeline.models.loading import load_model

    model_dir = ensure_assets(progress=False).model_dir
    cfg = load_config(ROOT / job, [f"model.config_for_planning={model_dir}", *overrides])
    planned = make_plan(cfg).memory["single"]["weights"]
    assert planned == _tensor_bytes(load_model(cfg.model, torch.device("cpu")))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_plan_counts_pgaps_factors_as_a_refresh_leaves_them(tiny_model_dir, tiny_batch, dtype):
    """The planner's P-GAP factors (U, V in the storage dtype, S, the step's cores) against the
    tensors a real P-GAP holds after a refresh on the tiny model."""
    from pipeline.models.loading import load_model
    from pipeline.parallel import trainable_names
    from pipeline.parallel.single import SingleBackend
    from pipeline.plan import _pgap_state, inventory
    from pipeline.zo.methods import StepContext
    from pipeline.zo.methods.pgap import PGAP

    cfg = load_config(ROOT / "jobs/pgap.yaml", [f"model.name_or_path={tiny_model_dir}",
                                                f"model.dtype={dtype}", "method.pgap_rank=4",
                                                "method.pgap_q=2"])
    model = load_model(cfg.model, torch.device("cpu"))
    params = inventory(meta_model(cfg.model, hf_config(cfg.model)), cfg.model.trainable)
    factors, refresh = _pgap_state(cfg, params, "single", 1)
    backend = SingleBackend(model, trainable_names(model, cfg.model.trainable), "cpu",
                            master=False)
    pgap = PGAP(cfg.method, backend.shards())
    pgap.step(StepContext(0, 0, 0.0, tiny_batch, backend))
    held = sum(t.numel() * t.element_size() for f in pgap.factors.values() for t in f)
    held += sum(z.numel() * z.element_size() for z in pgap._cores.values())
    assert factors == held and refresh > 0
    assert make_plan(cfg).memory["single"]["method"] == factors + refresh


def test_plan_cli_prints_memory_and_verdict():
    result = CliRunner().invoke(main, ["plan", str(RECIPES / "opt-13b-mezo-fp16-zero3.yaml"),
                                       "--nodes", "2", "--gpus-per-node", "8"])
    assert result.exit_code == 0, result.output
    assert "12.853 B total" in result.output
    assert "= 16 rank(s)" in result.output
    assert "zero3*" in result.output and "fits" in result.output


def test_plan_of_a_zoact_job_whose_model_weights_are_all_frozen():
    """jobs/zoact.yaml trains no model weight (``model.trainable: []``): the plan counts C only."""
    result = CliRunner().invoke(main, ["plan", "jobs/zoact.yaml",
                                       "model.config_for_planning=jobs/models/opt-13b"])
    assert result.exit_code == 0, result.output
    assert "12.853 B total" in result.output and "M trainable (ZO-Act coefficients" in result.output


def test_plan_counts_zoact_fp32_activations_for_its_training_micro_batches():
    """On a 16-bit base ZO-Act's forwards are fp32 from the first adapted layer on, a training
    batch in ``zoact_micro_batches`` parts: the plan's activations follow the larger of a part
    and an evaluation batch (4 bytes a value), and do not move for an fp32 base."""
    def acts(*overrides):
        cfg = load_config(RECIPES / "opt-13b-zoact-nf4.yaml",
                          ["train.batch_size=16", "train.eval_batch_size=2", *overrides])
        return make_plan(cfg).memory["single"]["activations"]

    halves, whole = acts(), acts("method.zoact_micro_batches=1")
    assert acts("method.zoact_micro_batches=2") == halves
    assert 1.9 < whole / halves < 2.0  # the logits and one upcast weight piece stay
    assert acts("method.zoact_micro_batches=8") == acts("method.zoact_micro_batches=16")  # eval's 2
    fp32 = ["model.quantization=none", "model.dtype=fp32"]
    assert acts(*fp32) == acts(*fp32, "method.zoact_micro_batches=1")


@pytest.mark.parametrize("args, code, message", [
    (["model.config_for_planning=jobs/models/nope"], 1, "model.config_for_planning="),
    (["model.config_for_planning=null"], 1, "model.config_for_planning is not set"),
    (["--nodes", "0"], 2, "'--nodes'"),
    (["parallel.nodes=0"], 2, "parallel.nodes: 0 is too small"),
    (["parallel.backend=single"], 1, "parallel.backend=single runs on one GPU"),
])
def test_plan_bad_input_gives_clear_errors(args, code, message):
    job = str(RECIPES / "opt-13b-mezo-fp16-zero3.yaml")
    result = CliRunner().invoke(main, ["plan", job, *args])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("recipe, args, message", [
    ("opt-13b-mezo-fp16-zero3", ["train.batch_size=6"],
     "train.batch_size=6 must be a multiple of the world size 4"),
    ("opt-13b-bszo-bf16-fsdp", ["model.config_for_planning=jobs/models/nope"],
     "model.config_for_planning='jobs/models/nope': no config.json there"),
])
def test_dry_run_bad_input_is_a_clear_error(recipe, args, message):
    job = str(RECIPES / f"{recipe}.yaml")
    result = CliRunner().invoke(main, ["train", job, *args, "--dry-run"])
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert "RANK" not in os.environ  # the fake group's variables do not leak


def test_plan_counts_the_load_peak_per_rank():
    from pipeline.models.sharded_load import CHUNK_BYTES

    cfg = load_config(RECIPES / "opt-13b-bszo-bf16-fsdp.yaml")
    plan = make_plan(cfg)
    model_bytes = plan.total_params * 2
    for backend in ("fsdp", "zero3"):
        weights, load = plan.memory[backend]["weights"], plan.load[backend]
        # the rank's shards plus one parameter (fsdp) or one unit (zero3) at full size, never
        # the model; through the host only the staging buffer
        assert weights < load["device"] < weights + 0.06 * model_bytes, backend
        assert load["host"] == CHUNK_BYTES
    # the largest local shard of OPT-13B on 4 ranks: a quarter of the 50272 x 5120 embedding
    assert plan.load["fsdp"]["device"] - plan.memory["fsdp"]["weights"] == 12568 * 5120 * 2
    # zero3's largest unit is a block (12 h^2 weights plus biases and norms) at full size
    assert plan.load["zero3"]["device"] - plan.memory["zero3"]["weights"] > 12 * 5120**2 * 2
    single = make_plan(load_config(RECIPES / "opt-13b-zoact-nf4.yaml"))
    assert single.load["single"]["host"] == single.memory["single"]["weights"]
    out = CliRunner().invoke(main, ["plan", str(RECIPES / "opt-13b-bszo-bf16-fsdp.yaml")]).output
    assert "while loading, peak (not in total)" in out and "  host" in out


@pytest.mark.parametrize("spec", sorted((ROOT / "jobs" / "learning").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_learning_spec_expands_to_valid_configs(spec):
    import importlib.util

    path = ROOT / "bench" / "learning.py"
    loader = importlib.util.spec_from_file_location("learning_bench", path)
    bench = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(bench)
    expanded = bench.load_spec(spec)
    shared = [f"{k}={bench._value(v)}" for k, v in (expanded.get("overrides") or {}).items()]
    raw = yaml.safe_load(spec.read_text())["runs"]  # one run per point of each run's sweep
    assert len(expanded["runs"]) == sum(math.prod(len(v) for v in r.get("sweep", {}).values())
                                        for r in raw)
    for _name, _group, recipe, overrides in expanded["runs"]:
        cfg = load_config(ROOT / recipe, [*shared, *overrides])
        for item in overrides:  # each run's own settings reach its config
            key, value = item.split("=", 1)
            section, field = key.split(".")
            assert getattr(getattr(cfg, section), field) == yaml.safe_load(value), item
