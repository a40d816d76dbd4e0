"""16-bit storage without masters: perturbed forwards never write the weights, so a step at
learning rate 0 is bitwise exact in every dtype and for every weight-space method; updates land by
stochastic rounding, replay bitwise and are bitwise the same at any world size given the same
projected gradients; NaN steps are skipped."""

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import checkpoint
from pipeline.config import MethodConfig, load_config
from pipeline.metrics import read_jsonl
from pipeline.models.objective import batch_loss
from pipeline.parallel import make_shard, trainable_names
from pipeline.parallel.delivery import UndeliveredPerturbation
from pipeline.parallel.single import SingleBackend
from pipeline.parallel.swap_delivery import SwapDelivery
from pipeline.sharding_check import _load_whole, run_check
from pipeline.zo.directions import Term
from pipeline.zo.methods import METHODS, StepContext
from pipeline.zo.methods.lozo import factors, low_rank_pieces
from pipeline.zo.noise import gaussian
from pipeline.zo.perturbation import Perturbation
from pipeline.zo.shards import ParamShard

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_METHODS = ["mezo", "bszo", "zo_adam", "lozo", "agzo", "pgap", "zo_sgd_mmt", "zo_sgd_sign"]
SMALL = {"pgap_q": 2, "pgap_rank": 4}  # a refresh costs 2q forwards


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view(torch.uint8)


def _words(t: torch.Tensor) -> torch.Tensor:
    """A 16-bit tensor's bit patterns, one per element."""
    return t.detach().clone().view(torch.int16)


def _backend(model, dtype):
    model.to(DTYPES[dtype])
    return SingleBackend(model, trainable_names(model, ["*"]), "cpu", master=False)


@pytest.mark.parametrize("method", WEIGHT_METHODS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_lr_zero_leaves_every_weight_bitwise_without_masters(tiny_model, tiny_batch, dtype,
                                                             method):
    backend = _backend(tiny_model, dtype)
    zo = METHODS[method](MethodConfig(name=method, **SMALL), backend.shards())
    before = {n: _bits(p) for n, p in tiny_model.named_parameters()}
    losses = []
    for step in range(3):
        stats = zo.step(StepContext(step, 0, 0.0, tiny_batch, backend))
        assert not stats.skipped
        losses.append(stats.loss)
    assert all(torch.equal(before[n], _bits(p)) for n, p in tiny_model.named_parameters())
    assert all(math.isfinite(v) for v in losses)


def _loss_with_weights(model, batch, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of ``model`` with its parameters set to ``values``, then put back."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.data.copy_(values[n].view(p.shape))
    try:
        with torch.no_grad():
            return batch_loss(model, batch)
    finally:
        for n, p in model.named_parameters():
            p.data.copy_(saved[n])


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_a_perturbed_forward_sees_exactly_the_perturbed_weights_and_writes_nothing(
        tiny_model, tiny_batch, dtype):
    backend = _backend(tiny_model, dtype)
    shards = backend.shards()
    eps = 1e-2

    def lozo_like(shard, offset, numel):  # a structured direction on matrices, dense elsewhere
        if len(shard.shape) == 2:
            u, v = factors(shard, 3, 4, 2)
            return low_rank_pieces(u, v, shard.start + offset, numel)
        return [(0, gaussian(3, shard.key, shard.start + offset, numel, shard.total))]

    at_list = [Perturbation.dense(11, eps), Perturbation.along(lozo_like, -eps),
               Perturbation([Term(eps, seed=11), Term(-0.5 * eps, seed=12)])]
    before = {n: _bits(p) for n, p in tiny_model.named_parameters()}
    loss0 = backend.loss(tiny_batch)
    for at in at_list:
        seen = {}
        for s in shards:
            seen[s.name] = torch.empty_like(s.local)
            at.write(s, seen[s.name])
        assert all(not torch.equal(seen[s.name], s.local) for s in shards)
        got = backend.loss(tiny_batch, at)
        assert got != loss0
        assert torch.equal(got, _loss_with_weights(tiny_model, tiny_batch, seen))
        assert all(torch.equal(before[n], _bits(p)) for n, p in tiny_model.named_parameters())


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_large_embeddings_and_linears_are_perturbed_in_pieces_as_the_whole_weight(
        monkeypatch, tiny_model, tiny_batch, dtype):
    """With a piece size below every weight, the tied embedding / LM head and the linear layers
    compute their perturbed forward from pieces (looked-up rows; row chunks of 3 rows): the loss
    is that of the whole perturbed weights (the embedding bitwise, the chunked products to
    rounding), the stored weights are untouched, and no piece reaches a weight's full size."""
    from pipeline.parallel import piecewise

    monkeypatch.setattr(piecewise, "PIECE_BYTES", 3 * 32 * 4 // 2)  # a few rows of any weight
    backend = _backend(tiny_model, dtype)
    assert isinstance(tiny_model.lm_head.forward, functools.partial)  # the piecewise path
    sizes = []
    real_empty = torch.empty

    def recording_empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        sizes.append(t.numel())
        return t

    at = Perturbation.dense(11, 1e-2)
    seen = {}
    for s in backend.shards():
        seen[s.name] = torch.empty_like(s.local)
        at.write(s, seen[s.name])
    before = {n: _bits(p) for n, p in tiny_model.named_parameters()}
    monkeypatch.setattr(torch, "empty", recording_empty)
    got = backend.loss(tiny_batch, at)
    monkeypatch.setattr(torch, "empty", real_empty)
    want = _loss_with_weights(tiny_model, tiny_batch, seen)
    tol = {"fp32": 1e-6, "bf16": 2e-2, "fp16": 2e-3}[dtype]
    assert got != backend.loss(tiny_batch)
    torch.testing.assert_close(got, want, rtol=tol, atol=0)
    assert all(torch.equal(before[n], _bits(p)) for n, p in tiny_model.named_parameters())
    largest = max(p.numel() for p in tiny_model.parameters())
    assert sizes and max(sizes) < largest


def test_a_piecewise_head_bounds_its_output_parts_as_well_as_its_weight_pieces(monkeypatch):
    """An LM head's part of the output per weight chunk is tokens x rows: bounded by
    PIECE_BYTES like the weight piece (with 16 MiB pieces the fp16 demo head's output parts were
    26 MiB, the whole of MeZO's excess over inference), and the result is still the product
    with the whole perturbed weight."""
    from conftest import recording_linear_outputs

    from pipeline.parallel import piecewise

    monkeypatch.setattr(piecewise, "PIECE_BYTES", 4096)
    head = torch.nn.Linear(4, 4096, bias=False).requires_grad_(False)  # rows of 16 B
    params = dict(head.named_parameters())
    shard = make_shard("weight", head.weight.shape, 0, head.weight.data.view(-1), master=False)
    delivery = SwapDelivery(head, [shard], params, piecewise_large=True)
    x = torch.randn(2, 8, 4)  # 16 tokens: 64 B of output per weight row
    at = Perturbation.dense(3, 1e-2)
    whole = torch.empty_like(head.weight)
    at.write(shard, whole.view(-1))
    with recording_linear_outputs() as parts, delivery.applying(at):
        got = head(x)
    torch.testing.assert_close(got, x @ whole.T, rtol=1e-6, atol=1e-6)
    assert len(parts) == 4096 // 64 and max(parts) <= 4096


def test_a_weight_read_outside_its_module_is_an_error_not_a_silent_unperturbed_forward():
    class Odd(torch.nn.Module):  # reads its child's weight without calling the child
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3, bias=False)

        def forward(self, x):
            return x @ self.lin.weight.T

    model = Odd().requires_grad_(False)
    params = dict(model.named_parameters())
    shard = ParamShard("lin.weight", (3, 4), 0, params["lin.weight"].data.view(-1))
    delivery = SwapDelivery(model, [shard], params)
    with pytest.raises(UndeliveredPerturbation, match="lin.weight"):
        with delivery.applying(Perturbation.dense(1, 1e-2)):
            model(torch.ones(2, 4))
    with delivery.applying(None):  # an unperturbed forward needs nothing
        model(torch.ones(2, 4))


@pytest.mark.parametrize("method", ["mezo", "bszo", "lozo", "zo_adam"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_16bit_updates_move_the_weights_and_replay_bitwise(tiny_model, tiny_batch, dtype,
                                                           method):
    """lr 1e-3 at ε 1e-3: the stored 16-bit weights change (by stochastic rounding, not rounded
    away) and re-applying the logged steps to the initial weights gives them bitwise."""
    backend = _backend(tiny_model, dtype)
    cfg = MethodConfig(name=method, lr=1e-3)
    zo = METHODS[method](cfg, backend.shards())
    start = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    records = []
    for step in range(3):
        stats = zo.step(StepContext(step, 0, cfg.lr, tiny_batch, backend))
        records.append({"step": step + 1, "seeds": stats.seeds, "lr": cfg.lr,
                        "projected_grad": stats.projected_grad, "skipped": stats.skipped,
                        **stats.extra})
    trained = {n: _bits(p) for n, p in tiny_model.named_parameters()}
    changed = sum(int((trained[n] != _bits(start[n])).view(-1, 1).any(1).sum()) for n in start)
    assert changed > 0
    for n, p in tiny_model.named_parameters():
        p.data.copy_(start[n])
    again = METHODS[method](cfg, backend.shards())
    for record in records:
        again.replay(record)
    assert all(torch.equal(trained[n], _bits(p)) for n, p in tiny_model.named_parameters())


# One method config per way an update is written: the fused single-direction pass (mezo),
# several directions summed block by block (mezo2), low-rank pieces of U Vᵀ (lozo, V redrawn at
# step 2), an estimate fed to an elementwise rule with fp32 moments (zo_adam).
UPDATE_PATHS = {
    "mezo": {"name": "mezo"}, "mezo2": {"name": "mezo", "n_directions": 2},
    "lozo": {"name": "lozo", "lozo_nu": 2}, "zo_adam": {"name": "zo_adam"},
}


def _rank_slices(shards, cuts: int, local_index: bool = False) -> list[list[ParamShard]]:
    """Each whole shard cut into ``cuts`` uneven flat slices, as ``cuts`` ranks would own them
    (slices cross rows, like ZeRO-3's); ``local_index`` keys each slice's noise and rounding
    bits by its local index (start 0) instead of the global one: the bug to catch."""
    ranks = [[] for _ in range(cuts)]
    for s in shards:
        bounds = [0, *sorted({(s.numel * r) // cuts + r % 2 for r in range(1, cuts)}), s.numel]
        for r, (a, b) in enumerate(zip(bounds, bounds[1:])):
            start = 0 if local_index else a
            ranks[r].append(make_shard(s.name, s.shape, start, s.local[a:b], master=False))
    return ranks


@pytest.mark.parametrize("path", UPDATE_PATHS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_16bit_updates_of_rank_slices_are_bitwise_the_whole_and_local_indices_are_caught(
        tiny_model, tiny_batch, dtype, path):
    """The world-size invariance of a 16-bit update given the same projected gradients: three
    ranks' slices, each updated by its own method from the logged steps, give bitwise the
    single process's weights; slices keyed by their local index do not (the comparison would
    catch a rank that draws its noise or rounding bits by local index)."""
    backend = _backend(tiny_model, dtype)
    cfg = MethodConfig(lr=1e-4, **UPDATE_PATHS[path])
    zo = METHODS[cfg.name](cfg, backend.shards())
    start = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    records = []
    for step in range(3):
        stats = zo.step(StepContext(step, 0, cfg.lr, tiny_batch, backend))
        records.append({"seeds": stats.seeds, "lr": cfg.lr, "projected_grad": stats.projected_grad,
                        **stats.extra})
    whole = {n: _words(p) for n, p in tiny_model.named_parameters()}
    moved = sum(int((whole[n] != _words(start[n])).sum()) for n in start)
    assert moved > 0.05 * sum(p.numel() for p in start.values())

    def replayed(local_index: bool) -> dict[str, torch.Tensor]:
        for n, p in tiny_model.named_parameters():
            p.data.copy_(start[n])
        for rank in _rank_slices(backend.shards(), 3, local_index):
            method = METHODS[cfg.name](cfg, rank)
            for record in records:
                method.replay(record)
        return {n: _words(p) for n, p in tiny_model.named_parameters()}

    assert all(torch.equal(whole[n], b) for n, b in replayed(False).items())
    wrong = replayed(True)
    differ = sum(int((whole[n] != wrong[n]).sum()) for n in whole)
    assert differ > 0.1 * moved


def test_nan_loss_from_fp16_overflow_leaves_weights_bitwise_and_is_counted(tiny_job,
                                                                           tiny_model_dir,
                                                                           tmp_path):
    """ε = 1e5 overflows fp16 (max 65504): every perturbed forward is non-finite, each step is
    skipped and counted, and the stored weights stay the loaded ones, bitwise."""
    from transformers import AutoModelForCausalLM

    from pipeline.train import run

    cfg = load_config("jobs/demo.yaml", [*tiny_job, "model.dtype=fp16", "method.eps=1e5",
                                         "train.steps=3", "train.eval_zero_shot=false",
                                         "tracking.enabled=false", "checkpoint.every=0"])
    summary = run(cfg, tmp_path / "run", progress=False)
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert summary["skipped_steps"] == 3 and [r.get("skipped") for r in records] == [True] * 3
    saved = load_file(str(checkpoint.latest(tmp_path / "run")[1] / "shards-rank0.safetensors"))
    assert not any(k.startswith("master::") for k in saved)  # the default keeps no master
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16)
    for name, p in base.named_parameters():
        assert torch.equal(saved[name].view(p.shape), p.detach()), name


def _deepspeed_fp16() -> bool:
    """Whether DeepSpeed's accelerator here has fp16 (its CPU accelerator has it only with
    AVX512-FP16; otherwise it refuses fp16 configs: "Type fp16 is not supported on your
    device")."""
    code = ("import os; os.environ.setdefault('DS_ACCELERATOR', 'cpu'); "
            "from deepspeed.accelerator import get_accelerator; "
            "print(get_accelerator().is_fp16_supported())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return out.stdout.strip().endswith("True")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_lr_zero_is_bitwise_without_masters_on_2_ranks(dtype, tiny_job, tiny_model_dir,
                                                       tmp_path):
    from transformers import AutoModelForCausalLM

    backends = ("fsdp", "zero3") if dtype == "bf16" or _deepspeed_fp16() else ("fsdp",)
    extra = ["method.lr=0", f"model.dtype={dtype}"]
    report = run_check("jobs/demo.yaml", [*tiny_job, *extra], 2, 2, tmp_path, backends)
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=DTYPES[dtype])
                .named_parameters())
    for backend in ("single", *backends):
        final = _load_whole(sorted((tmp_path / backend).glob("final-rank*.safetensors")))
        assert final and all(torch.equal(s.local.view(s.shape), base[s.name].detach())
                             for s in final), backend
        if backend != "single":
            assert report[backend]["perturbation"] == 0.0
            assert report[backend]["probe_loss"] == 0.0  # the gathered weights are perturbed
            assert report[backend]["stored_unchanged"]
    for backend in backends:  # real steps: finite losses (a NaN step would change nothing too)
        steps = [json.loads(line) for line in (tmp_path / backend / "steps.jsonl").open()]
        assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)


@pytest.mark.slow
def test_16bit_updates_on_2_ranks_are_bitwise_the_single_process_ones(tiny_job, tiny_model_dir,
                                                                      tmp_path):
    """Non-zero learning rate, no masters, bf16 and fp16 on fsdp and zero3 at 2 gloo ranks
    against one process.

    Bitwise by construction: every rank measures the whole global batch (a run's ranks measure
    their halves, whose fp32 means differ from the whole's by fp32 rounding, magnified in the
    projected gradient by 1/2ε), so the projected gradients are the single process's exactly and
    the stored 16-bit weights after 3 steps must be too, for every update path
    (tests/workers/update_steps.py); a rank drawing noise or rounding bits by its local index
    would differ (the in-process test above shows that such a comparison catches it)."""
    from transformers import AutoModelForCausalLM

    runs = {"single": "bf16,fp16", "fsdp": "bf16,fp16",
            "zero3": "bf16,fp16" if _deepspeed_fp16() else "bf16"}
    worker = Path(__file__).parent / "workers" / "update_steps.py"
    for backend, dtypes in runs.items():
        cmd = [str(worker), str(tmp_path / backend), "3", dtypes, json.dumps(UPDATE_PATHS),
               "jobs/demo.yaml", *tiny_job, "method.lr=1e-4", "tracking.enabled=false",
               f"parallel.backend={backend}"]
        if backend != "single":
            cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *cmd]
        subprocess.run([sys.executable, *cmd], check=True, timeout=600)

    def final(backend, dtype, path):
        return _load_whole(sorted((tmp_path / backend / dtype).glob(f"{path}-rank*.safetensors")))

    for dtype in ("bf16", "fp16"):
        ref = json.loads((tmp_path / "single" / dtype / "records.json").read_text())
        assert set(ref) == set(UPDATE_PATHS)
        base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=DTYPES[dtype])
                    .named_parameters())
        backends = [b for b in ("fsdp", "zero3") if dtype in runs[b]]
        for path in UPDATE_PATHS:
            one = final("single", dtype, path)
            # the weights moved (by stochastic rounding) in both ranks' halves of every matrix
            for s in one:
                if len(s.shape) == 2:
                    moved = s.local.view(torch.int16) != _words(base[s.name]).view(-1)
                    half = s.total // 2
                    assert moved[:half].any() and moved[half:].any(), (dtype, path, s.name)
            for backend in backends:
                got = json.loads((tmp_path / backend / dtype / "records.json").read_text())
                assert got[path] == ref[path], (backend, dtype, path)  # losses and gradients
                two = final(backend, dtype, path)
                assert [s.name for s in two] == [s.name for s in one]
                assert all(torch.equal(a.local.view(torch.int16), b.local.view(torch.int16))
                           for a, b in zip(one, two)), (backend, dtype, path)
