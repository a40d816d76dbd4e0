"""ZO-SGD with momentum and ZO-SignSGD: MeZO's ĝ through torch's SGD momentum rule and sign."""

import json

import pytest
import torch
from conftest import mezo_estimate, restore, snapshot

from pipeline.config import MethodConfig
from pipeline.parallel import trainable_names
from pipeline.parallel.single import SingleBackend
from pipeline.zo.methods import METHODS, StepContext
from pipeline.zo.methods.zo_sgd import ZOSGDMomentum, ZOSGDSign

NAMES = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight"]


def _setup(model, name, patterns=NAMES, master=True, **method):
    backend = SingleBackend(model, trainable_names(model, list(patterns)), "cpu", master=master)
    return backend, METHODS[name](MethodConfig(name=name, **method), backend.shards())


@pytest.mark.parametrize(("n_directions", "weight_decay"), [(1, 0.0), (2, 0.1)])
def test_momentum_steps_equal_torch_sgd_fed_the_same_estimates(tiny_model, tiny_batch,
                                                               n_directions, weight_decay):
    assert METHODS["zo_sgd_mmt"] is ZOSGDMomentum
    backend, method = _setup(tiny_model, "zo_sgd_mmt", n_directions=n_directions,
                             weight_decay=weight_decay, sgd_momentum=0.9)
    shards = backend.shards()
    ref = [s.master.clone() for s in shards]
    bufs = [torch.zeros_like(p) for p in ref]
    lr = 1e-2
    for step in range(5):
        stats = method.step(StepContext(step, 1, lr, tiny_batch, backend))
        for p, m, shard in zip(ref, bufs, shards):  # m ← β m + ĝ; θ ← (1 - ηλ)θ - η m
            m.mul_(0.9).add_(mezo_estimate(shard, stats))
            p.mul_(1 - lr * (weight_decay if shard.decay else 0.0)).add_(m, alpha=-lr)
    for p, shard in zip(ref, shards):
        torch.testing.assert_close(shard.master, p, rtol=0, atol=1e-6)
    assert method.t == 5


def test_sign_step_moves_every_element_by_lr(tiny_model, tiny_batch):
    assert METHODS["zo_sgd_sign"] is ZOSGDSign
    backend, method = _setup(tiny_model, "zo_sgd_sign", n_directions=2)
    shards = backend.shards()
    before = [s.master.clone() for s in shards]
    stats = method.step(StepContext(0, 0, 1e-3, tiny_batch, backend))
    for shard, b in zip(shards, before):
        want = b - 1e-3 * mezo_estimate(shard, stats).sign()
        torch.testing.assert_close(shard.master, want, rtol=0, atol=1e-7)
        assert torch.equal(shard.local, shard.master)


@pytest.mark.parametrize("name", ["zo_sgd_mmt", "zo_sgd_sign"])
@pytest.mark.parametrize("master", [True, False])
def test_replay_equals_the_run_bitwise(tiny_model, tiny_batch, name, master):
    initial = snapshot(tiny_model)
    backend, method = _setup(tiny_model, name, ["*"], master=master, weight_decay=0.1)
    records = []
    for step in range(3):
        stats = method.step(StepContext(step, 2, 1e-3, tiny_batch, backend))
        records.append(json.loads(json.dumps(
            {"step": step + 1, "seeds": stats.seeds, "projected_grad": stats.projected_grad,
             "lr": 1e-3, "skipped": stats.skipped, **stats.extra})))
    trained = snapshot(tiny_model)
    restore(tiny_model, initial)
    _, replayer = _setup(tiny_model, name, ["*"], master=master, weight_decay=0.1)
    for record in records:
        replayer.replay(record)
    assert all(torch.equal(trained[n], p) for n, p in snapshot(tiny_model).items())
    assert any(not torch.equal(trained[n], initial[n]) for n in trained)


def test_lr_zero_restores_bitwise_with_masters(tiny_model, tiny_batch):
    for name in ("zo_sgd_mmt", "zo_sgd_sign"):
        backend, method = _setup(tiny_model, name, ["*"])
        before = snapshot(tiny_model)
        for step in range(2):
            method.step(StepContext(step, 0, 0.0, tiny_batch, backend))
        assert all(torch.equal(before[n], p) for n, p in snapshot(tiny_model).items()), name


def test_momentum_resume_needs_the_buffer_and_then_continues_bitwise(tiny_job, tmp_path):
    """Through the real checkpoints: the buffer is saved per rank and comes back."""
    from safetensors.torch import load_file

    from pipeline import checkpoint
    from pipeline.config import load_config
    from pipeline.metrics import read_jsonl
    from pipeline.train import run

    common = [*tiny_job, "method.name=zo_sgd_mmt", "tracking.enabled=false",
              "checkpoint.every=2", "train.eval_zero_shot=false"]
    run(load_config("jobs/demo.yaml", [*common, "train.steps=4"]), tmp_path / "a",
        progress=False)
    run(load_config("jobs/demo.yaml", [*common, "train.steps=2"]), tmp_path / "b",
        progress=False)
    run(load_config("jobs/demo.yaml", [*common, "train.steps=4"]), tmp_path / "b",
        progress=False)

    def losses(d):
        return [r["loss"] for r in read_jsonl(d / "metrics.jsonl") if "loss" in r]

    assert len(losses(tmp_path / "a")) == 4 and losses(tmp_path / "a") == losses(tmp_path / "b")
    saved = load_file(str(checkpoint.latest(tmp_path / "b")[1] / "shards-rank0.safetensors"))
    assert any(k.startswith("momentum::") for k in saved)


def test_momentum_restored_without_its_buffer_refuses_to_step(tiny_model, tiny_batch):
    backend, method = _setup(tiny_model, "zo_sgd_mmt")
    before = snapshot(tiny_model)
    method.load_state_dict({"t": 2})
    with pytest.raises(RuntimeError, match="load_shard_state"):
        method.step(StepContext(2, 0, 1e-3, tiny_batch, backend))
    assert all(torch.equal(before[n], p) for n, p in snapshot(tiny_model).items())
    method.load_shard_state(method.shard_state())
    assert method.step(StepContext(2, 0, 1e-3, tiny_batch, backend)).forwards == 2


@pytest.mark.parametrize("cache", [False, True])
def test_update_uses_the_noise_kind_it_measured(tiny_model, tiny_batch, cache):
    """With method.noise=rademacher (and the noise cache) the update regenerates the same ±1
    directions the perturbation used, not Gaussian ones."""
    from types import SimpleNamespace

    from pipeline.zo.methods import build_method
    from pipeline.zo.noise import noise

    backend = SingleBackend(tiny_model, trainable_names(tiny_model, NAMES), "cpu", master=True)
    cfg = MethodConfig(name="zo_sgd_mmt", noise="rademacher", cache_noise=cache,
                       sgd_momentum=0.0)
    method = build_method(SimpleNamespace(method=cfg), backend.shards())
    shards = backend.shards()
    before = [s.master.clone() for s in shards]
    stats = method.step(StepContext(0, 0, 1e-2, tiny_batch, backend))
    (g,), (seed,) = stats.projected_grad, stats.seeds
    for shard, b in zip(shards, before):
        z = noise(seed, shard.key, shard.start, shard.numel, shard.total, kind="rademacher")
        assert set(z.unique().tolist()) == {-1.0, 1.0}
        want = b - 1e-2 * (torch.tensor(g, dtype=torch.float32) * z)
        torch.testing.assert_close(shard.master, want, rtol=0, atol=1e-7)
