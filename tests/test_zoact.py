"""ZO-Act: the coefficient adapter, the calibrated basis V, the estimate of ∇C, Adam on C,
state, replay and 2 ranks.

The 2-rank test runs tests/workers/method_steps.py under torchrun.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from conftest import make_batch, run_method_ranks

from pipeline.config import MethodConfig
from pipeline.models.adapters import CoefficientAdapter
from pipeline.models.objective import batch_loss
from pipeline.parallel import trainable_names
from pipeline.parallel.single import SingleBackend
from pipeline.zo.activations import linear_modules
from pipeline.zo.methods import METHODS, StepContext
from pipeline.zo.methods.zoact import ZOAct

MLP = ["*.mlp.*_proj"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _setup(model, **method):
    backend = SingleBackend(model, trainable_names(model, ["model.norm.weight"]), "cpu",
                            master=False)
    return backend, ZOAct(MethodConfig(name="zoact", **method), backend.shards())


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids).logits


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_adapter_with_zero_c_is_bitwise_identity_and_adds_c_vt_x(tiny_model, tiny_batch):
    assert METHODS["zoact"] is ZOAct
    plain = _logits(tiny_model, tiny_batch)
    gen = torch.Generator().manual_seed(0)
    modules = linear_modules(tiny_model, patterns=["*_proj"])
    adapters = [CoefficientAdapter(m, torch.linalg.qr(torch.randn(m.in_features, 2,
                                                                  generator=gen)).Q,
                                   torch.zeros(m.out_features, 2)).attach()
                for m in modules.values()]
    assert torch.equal(_logits(tiny_model, tiny_batch), plain)
    layer = modules["model.layers.0.mlp.down_proj"]
    x = torch.randn(3, 5, layer.in_features, generator=gen)
    adapter = next(a for a in adapters if a.module is layer)
    adapter.set(torch.randn(layer.out_features, 2, generator=gen))
    with torch.no_grad():
        got = layer(x)
        want = x @ adapter.merged_weight(layer.weight).T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a in adapters:
        a.detach()
    assert torch.equal(_logits(tiny_model, tiny_batch), plain)


def _inputs(model, batches, names):
    """Masked input rows of each named Linear over several batches (plain hooks, the oracle)."""
    seen = {n: [] for n in names}
    handles = []
    current = {}
    for name, module in linear_modules(model, names=set(names)).items():
        def hook(mod, args, _name=name):
            x = args[0]
            seen[_name].append(x.reshape(-1, x.shape[-1])[current["mask"]].clone())
        handles.append(module.register_forward_pre_hook(hook))
    for batch in batches:
        current["mask"] = batch.attention_mask.bool().reshape(-1)
        with torch.no_grad():
            batch_loss(model, batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(rows).double() for n, rows in seen.items()}


def test_v_is_the_top_eigenvectors_of_the_calibration_activations(tiny_model):
    batches = [make_batch(seed=1), make_batch(seed=2)]
    backend, method = _setup(tiny_model, zoact_rank=2, zoact_calib_batches=2)  # 30 iterations
    method.calibrate(backend, batches)
    truth = _inputs(tiny_model, batches, method.names)
    assert set(method.names) == set(linear_modules(tiny_model, patterns=method.cfg.zoact_targets))
    for name, x in truth.items():
        vals, vecs = torch.linalg.eigh(x.T @ x)
        vals, vecs = vals.flip(0), vecs.flip(1)
        assert vals[1] > 1.01 * vals[2], name  # a gap: the eigenvectors are well defined
        v = method.V[name].double()
        assert v.shape == (x.shape[1], 2)
        for k in range(2):
            assert abs(_cos(v[:, k], vecs[:, k])) > 1 - 1e-6, (name, k)
        assert torch.equal(method.C[name], torch.zeros(method.C[name].shape))


def test_calibration_steps_then_training_steps(tiny_model):
    batches = [make_batch(seed=1), make_batch(seed=2), make_batch(seed=3)]
    twin = _copy(tiny_model)  # before any adapter is attached
    backend, method = _setup(tiny_model, zoact_calib_batches=2, zoact_q=2)
    first = method.step(StepContext(0, 0, 1e-2, batches[0], backend))
    assert first.forwards == 1 and first.extra == {"calibrating": True} and not method.calibrated
    second = method.step(StepContext(1, 0, 1e-2, batches[1], backend))
    assert second.forwards == 3 and len(second.projected_grad) == 2 and method.calibrated
    assert second.loss == pytest.approx(backend.loss(batches[1]).item(), abs=0.05)
    # V is that of the two steps' batches, as an explicit calibration computes it
    other_backend, other = _setup(twin, zoact_calib_batches=2, zoact_q=2)
    other.calibrate(other_backend, batches[:2])
    assert all(torch.equal(method.V[n], other.V[n]) for n in method.names)
    assert any(c.abs().sum() > 0 for c in method.C.values())


def _copy(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# -- the estimator ----------------------------------------------------------------------------
#
# With all layers' coefficients as one vector of D = Σ out·r entries, exact directional
# derivatives c = <∇C, Z> (the forward difference adds O(μ)) and q = 1, ĝ = <∇C, Z> Z:
# E[ĝ] = ∇C, E‖ĝ‖² = (D + 2)‖∇C‖². The mean of N estimates then has a cosine to ∇C of about
# 1/sqrt(1 + K/N), K = D + 1; the test allows twice the expected error norm (cos > 1/sqrt(1 +
# 4K/N)). Along ∇C, <ĝ, ∇C>/‖∇C‖² = <∇C, Z>²/‖∇C‖² has variance 2: the scale of the mean is 1
# with standard deviation sqrt(2/N); the test allows 4.

def test_estimate_converges_to_the_autograd_gradient_of_c(tiny_model, tiny_batch):
    backend, method = _setup(tiny_model, zoact_targets=MLP, eps=1e-3)
    method.calibrate(backend, [tiny_batch])
    gen = torch.Generator().manual_seed(4)
    for name in method.names:  # a fixed C away from 0
        method.C[name].copy_(torch.randn(method.C[name].shape, generator=gen) * 0.05)
    method._set(None)
    coefs = {}
    for name, adapter in method.adapters.items():
        coefs[name] = adapter.coef
        adapter.coef = coefs[name].clone().requires_grad_(True)
    loss = batch_loss(tiny_model, tiny_batch)
    true = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        loss, [method.adapters[n].coef for n in method.names])]).double()
    for name, adapter in method.adapters.items():
        adapter.coef = coefs[name]
    c_before = {n: c.clone() for n, c in method.C.items()}
    weights = _params(tiny_model)
    steps = 400
    total = torch.zeros_like(true)
    for step in range(steps):
        stats = method.step(StepContext(step, 0, 0.0, tiny_batch, backend))
        assert stats.forwards == 2
        est = method.estimate(stats.seeds, stats.projected_grad)
        total += torch.cat([est[n].reshape(-1) for n in method.names]).double()
    mean = total / steps
    k = true.numel() + 1
    bound = 1 / math.sqrt(1 + 4 * k / steps)
    cos = _cos(mean, true)
    assert cos > bound, (cos, bound)
    scale = (mean @ true / true.norm() ** 2).item()
    assert abs(scale - 1) < 4 * math.sqrt(2 / steps), scale
    # lr 0: C unchanged bitwise, and the model's weights were never written
    assert all(torch.equal(c_before[n], method.C[n]) for n in method.names)
    assert all(torch.equal(w, p) for w, p in zip(weights.values(), _params(tiny_model).values()))


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_model, tiny_batch):
    backend, method = _setup(tiny_model, zoact_calib_batches=1, zoact_q=4, eps=1e-3)
    start = backend.loss(tiny_batch).item()
    losses = [method.step(StepContext(step, 0, 2e-2, tiny_batch, backend)).loss
              for step in range(30)]
    end = backend.loss(tiny_batch).item()
    assert losses[0] == pytest.approx(start, abs=1e-6)
    assert end < start - 0.05, (start, end, losses)


def test_state_dict_round_trip_resumes_bitwise_and_replay_reproduces_c(tiny_model, tiny_batch):
    batch2 = make_batch(seed=5)
    twin = _copy(tiny_model)
    backend, method = _setup(tiny_model, zoact_calib_batches=1, zoact_q=2)
    for step in range(3):
        method.step(StepContext(step, 7, 1e-2, tiny_batch, backend))
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    size = buf.tell()
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    twin_backend, resumed = _setup(twin, zoact_calib_batches=1, zoact_q=2)
    resumed.load_state_dict(state)
    _, replayer = _setup(_copy(twin), zoact_calib_batches=1, zoact_q=2)
    replayer.load_state_dict(state)
    records = []
    for step in range(3, 6):
        a = method.step(StepContext(step, 7, 1e-2, batch2, backend))
        b = resumed.step(StepContext(step, 7, 1e-2, batch2, twin_backend))
        assert a.loss == b.loss and a.projected_grad == b.projected_grad
        records.append({"step": step + 1, "seeds": a.seeds, "projected_grad": a.projected_grad,
                        "lr": 1e-2, "skipped": a.skipped, **a.extra})
    assert all(torch.equal(method.C[n], resumed.C[n]) for n in method.names)
    assert all(torch.equal(method.V[n], resumed.V[n]) for n in method.names)
    assert size < 200_000  # kilobytes
    for record in records:
        replayer.replay(record)
    assert all(torch.equal(method.C[n], replayer.C[n]) for n in method.names)
    with pytest.raises(RuntimeError, match="basis V"):
        _setup(_copy(twin))[1].replay(records[0])


def test_non_finite_loss_skips_and_keeps_c(tiny_model, tiny_batch):
    backend, method = _setup(tiny_model, zoact_calib_batches=1)
    method.step(StepContext(0, 0, 1e-2, tiny_batch, backend))
    before = {n: c.clone() for n, c in method.C.items()}
    tiny_model.model.norm.weight.fill_(float("nan"))
    stats = method.step(StepContext(1, 0, 1e-2, tiny_batch, backend))
    assert stats.skipped and math.isnan(stats.loss)
    assert all(torch.equal(before[n], method.C[n]) for n in method.names)
    assert all(torch.equal(a.coef, method.C[n]) for n, a in method.adapters.items())


# -- 16-bit and 4-bit bases -------------------------------------------------------------------

def _low_precision_base(tiny_model, tiny_model_dir, kind):
    """``(low, reference)``: a base stored in ``kind`` and the same weights as an fp32 model."""
    if kind == "nf4":
        import bitsandbytes as bnb

        from pipeline.models.quantization import load_quantized

        low = load_quantized(str(tiny_model_dir), "nf4", torch.bfloat16, torch.device("cpu"))
        reference = type(low).from_pretrained(tiny_model_dir, dtype=torch.float32)
        modules = dict(reference.named_modules())
        for name, module in low.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data,
                                                        module.weight.quant_state)
                modules[name].weight.data.copy_(weight.float())
    else:
        reference = _copy(tiny_model).to(torch.bfloat16).float()  # weights bf16 can hold
        low = _copy(reference).to(getattr(torch, kind))
    for model in (low, reference):
        model.requires_grad_(False)
        model.eval()
    return low, reference


@pytest.mark.parametrize("kind", ["bfloat16", "float16", "nf4"])
def test_projected_gradient_on_a_low_precision_base_matches_fp32(kind, tiny_model,
                                                                  tiny_model_dir, tiny_batch):
    """The probe's μ-sized change reaches the loss: on a base stored in bf16, fp16 or NF4, the
    projected gradients of 32 steps are within 0.5 % (relative L2) of those of the same weights
    computed in fp32 (V and C the same). Before, the adapter added its term to the 16-bit
    output and the base rounded it on: 13 % (bf16), 1.2 % (fp16), 84 % (NF4)."""
    low, reference = _low_precision_base(tiny_model, tiny_model_dir, kind)
    ref_backend, ref = _setup(reference, zoact_calib_batches=1, eps=1e-3)
    ref.calibrate(ref_backend, [tiny_batch])
    backend, method = _setup(low, zoact_calib_batches=1, eps=1e-3)
    method.load_state_dict(ref.state_dict())
    want, got = [], []
    for step in range(32):  # lr 0: C stays, each step a new direction
        want += ref.step(StepContext(step, 0, 0.0, tiny_batch, ref_backend)).projected_grad
        got += method.step(StepContext(step, 0, 0.0, tiny_batch, backend)).projected_grad
    want, got = torch.tensor(want), torch.tensor(got)
    assert ((got - want).norm() / want.norm()).item() < 5e-3


def test_calibration_step_on_a_bf16_base_measures_l0_as_the_probes(tiny_model, tiny_batch):
    """The last calibration forward runs before the adapters exist (plain bf16); the step then
    measures L(C = 0) again in the probes' fp32 arithmetic, so f - L0 is the probe's alone."""
    low = _copy(tiny_model).to(torch.bfloat16)
    backend, method = _setup(low, zoact_calib_batches=1, eps=1e-3)
    stats = method.step(StepContext(0, 0, 0.0, tiny_batch, backend))
    assert stats.forwards == 3  # calibration L0, L0 with the adapters, one probe
    assert stats.loss == method._loss(backend, tiny_batch).item()  # at C: the adapted model's


@pytest.mark.parametrize("parts", [0, 1, 3])
def test_fp32_flow_evaluates_each_batch_in_micro_batches(parts, tiny_model, tiny_batch):
    """On a 16-bit base each evaluation of the batch runs in ``zoact_micro_batches`` forwards
    (0: 2), so the fp32 activations take the bytes of a 16-bit forward; the loss is the row-
    weighted mean of the parts', the whole batch's loss to fp32 rounding."""
    low = _copy(tiny_model).to(torch.float16)
    backend, method = _setup(low, zoact_calib_batches=1, eps=1e-3, zoact_micro_batches=parts)
    calls = []
    low.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    method.step(StepContext(0, 0, 0.0, tiny_batch, backend))
    calls.clear()
    stats = method.step(StepContext(1, 0, 0.0, tiny_batch, backend))
    per_eval = parts or 2
    n = tiny_batch.labels.shape[0]
    assert stats.forwards == 2 and len(calls) == 2 * per_eval
    assert calls[:per_eval] == [round((i + 1) * n / per_eval) - round(i * n / per_eval)
                                for i in range(per_eval)]
    whole = backend.loss(tiny_batch).item()  # one forward of the whole batch, same C
    assert stats.loss == pytest.approx(whole, rel=1e-5)
    if per_eval == 1:
        assert stats.loss == whole


# -- 2 ranks ----------------------------------------------------------------------------------

def _run(out: Path, nproc: int, backend: str, overrides: list[str], steps: int = 4):
    return run_method_ranks(out, nproc, backend, "jobs/zoact.yaml", overrides, steps)


@pytest.mark.slow
@pytest.mark.parametrize("backend, micro", [("fsdp", 0), ("zero3", 0), ("fsdp", 2)])
def test_two_ranks_hold_identical_v_and_c_and_track_one_process(backend, micro, tiny_model_dir,
                                                                tmp_path):
    """(fsdp, 2): each evaluation in 2 forwards per rank, as on a 16-bit base (forced here on
    the fp32 tiny model), the sharded gathers running twice in step on both ranks."""
    small = [f"model.name_or_path={tiny_model_dir}", "data.n_train=64", "data.n_val=16",
             "data.n_test=32", "train.batch_size=8", "method.lr=1e-2",
             "method.zoact_calib_batches=2", f"method.zoact_micro_batches={micro}"]
    (one,) = _run(tmp_path / "single", 1, "single", small)
    r0, r1 = _run(tmp_path / backend, 2, backend, small)
    assert r0["V"] and set(r0["V"]) == set(r1["V"]) == set(one["V"])
    for k in r0["V"]:
        assert torch.equal(r0["V"][k], r1["V"][k]) and torch.equal(r0["C"][k], r1["C"][k])
        assert (r0["V"][k] - one["V"][k]).abs().max().item() < 1e-4
        assert (r0["C"][k] - one["C"][k]).abs().max().item() < 1e-4
    assert any(c.abs().sum() > 0 for c in r0["C"].values())
    assert r0["loss"] == r1["loss"] and r0["grad"] == r1["grad"]
    assert max(abs(x - y) for x, y in zip(r0["loss"], one["loss"])) < 1e-5



# -- export -----------------------------------------------------------------------------------

def test_merge_into_gives_a_plain_model_with_the_adapted_outputs(tiny_model, tiny_batch):
    backend, method = _setup(tiny_model, zoact_rank=2, zoact_calib_batches=1)
    method.calibrate(backend, [make_batch(seed=1)])
    gen = torch.Generator().manual_seed(3)
    for name in method.names:
        method.C[name].copy_(torch.randn(method.C[name].shape, generator=gen) * 0.1)
    method._set(None)
    adapted = _logits(tiny_model, tiny_batch)
    modules = dict(tiny_model.named_modules())
    want = {n: modules[n].weight.detach() + method.C[n] @ method.V[n].T for n in method.names}
    assert sorted(method.merge_into(tiny_model)) == sorted(method.names)
    assert not method.adapters  # the hooks are gone: a plain model
    for name, weight in want.items():
        assert torch.equal(modules[name].weight.detach(), weight)
    merged = _logits(tiny_model, tiny_batch)
    assert (adapted - merged).abs().max().item() < 1e-4  # fp32 reassociation only
    assert (adapted - _logits(_copy(tiny_model), tiny_batch)).abs().max().item() < 1e-4


@pytest.mark.slow
def test_export_merges_c_vt_or_writes_the_adapter_alone(tiny_job, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipeline import checkpoint

    run = tmp_path / "run"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], text=True,
                              capture_output=True, timeout=300)

    done = cli("train", "jobs/zoact.yaml", *tiny_job, "train.steps=3", "method.lr=1e-2",
               "method.zoact_calib_batches=1", "tracking.enabled=false",
               "train.eval_zero_shot=false", "--run-dir", str(run), "--no-progress")
    assert done.returncode == 0, done.stderr
    _, path = checkpoint.latest(run)
    state = torch.load(path / "method.pt", weights_only=True)
    assert any(c.abs().max() > 0 for c in state["C"].values())  # C was trained

    done = cli("export", str(run), "--out", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_job[0].split("=", 1)[1])
                .named_parameters())
    merged = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").named_parameters())
    for name in state["names"]:
        key = name + ".weight"
        want = base[key].detach() + state["C"][name] @ state["V"][name].T
        assert torch.equal(merged[key].detach(), want), name

    done = cli("export", str(run), "--out", str(tmp_path / "adapter"), "--adapter-only")
    assert done.returncode == 0, done.stderr
    tensors = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert set(tensors) == {f"{n}.{k}" for n in state["names"] for k in "VC"}
    assert all(torch.equal(tensors[f"{n}.C"], state["C"][n]) for n in state["names"])
    assert not (tmp_path / "adapter" / "model.safetensors").exists()


def test_fp32_flow_linear_upcasts_in_chunks_written_into_one_output(monkeypatch):
    """fp32 activations meeting a bf16 weight: the product is the fp32 one, computed in row
    chunks whose fp32 weight AND output part stay under CHUNK_BYTES, written into one output
    (the pieces were concatenated: an LM head's fp32 logits were held twice)."""
    import torch.nn.functional as F
    from conftest import recording_linear_outputs

    from pipeline.models import fp32_flow

    monkeypatch.setattr(fp32_flow, "CHUNK_BYTES", 1024)
    weight = torch.randn(300, 4).to(torch.bfloat16)  # 16 B fp32 rows: 64 rows by weight
    bias = torch.randn(300).to(torch.bfloat16)
    x = torch.randn(2, 8, 4)  # 16 tokens x 4 B: 16 rows by output
    with recording_linear_outputs() as parts:
        got = fp32_flow._linear(x, weight, bias)
    assert got.dtype == torch.float32 and got.shape == (2, 8, 300)
    torch.testing.assert_close(got, F.linear(x, weight.float(), bias.float()), rtol=1e-6,
                               atol=1e-6)
    assert len(parts) == -(-300 // 16) and max(parts) <= 1024
