"""ZO-Adam: MeZO's g·z through Adam, moments sharded like the parameters."""

import json
import math

import pytest
import torch
from conftest import mezo_estimate, restore, snapshot

from pipeline.config import MethodConfig
from pipeline.parallel import trainable_names
from pipeline.parallel.single import SingleBackend
from pipeline.zo.methods import METHODS, StepContext
from pipeline.zo.methods.zo_adam import ZOAdam
from pipeline.zo.noise import gaussian
from pipeline.zo.shards import ParamShard

NAMES = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight"]


def _setup(model, patterns=NAMES, master=True, **method):
    backend = SingleBackend(model, trainable_names(model, list(patterns)), "cpu", master=master)
    return backend, ZOAdam(MethodConfig(name="zo_adam", **method), backend.shards())


def test_first_step_is_the_closed_form_adam_step(tiny_model, tiny_batch):
    """Step 1: m̂ = g z, v̂ = (g z)², so θ ← θ - η g z / (|g z| + eps)."""
    assert METHODS["zo_adam"] is ZOAdam
    backend, adam = _setup(tiny_model)
    shards = backend.shards()
    before = [s.master.double() for s in shards]
    lr = 1e-3
    stats = adam.step(StepContext(0, 0, lr, tiny_batch, backend))
    assert stats.forwards == 2 and adam.t == 1
    for shard, b in zip(shards, before):
        gz = stats.projected_grad[0] * gaussian(stats.seeds[0], shard.key, 0, shard.numel,
                                                shard.total).double()
        want = b - lr * gz / (gz.abs() + 1e-8)
        # the fp32 rounding of θ itself (one ulp); the step is η = 1e-3 per element
        torch.testing.assert_close(shard.master.double(), want, rtol=2**-23, atol=1e-9)
        assert torch.equal(shard.local, shard.master)


@pytest.mark.parametrize(("n_directions", "two_sided", "weight_decay"),
                         [(1, True, 0.0), (2, False, 0.0), (1, True, 0.1)])
def test_steps_equal_torch_adam_fed_the_same_estimates(tiny_model, tiny_batch, n_directions,
                                                       two_sided, weight_decay):
    backend, adam = _setup(tiny_model, n_directions=n_directions, two_sided=two_sided,
                           weight_decay=weight_decay)
    shards = backend.shards()
    ref = [s.master.clone().requires_grad_(True) for s in shards]
    start = [p.detach().clone() for p in ref]
    if weight_decay == 0:
        reference = torch.optim.Adam(ref, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    else:  # decoupled decay, skipped for norms, as ZO-Adam's λ
        groups = [{"params": [p], "weight_decay": weight_decay if s.decay else 0.0}
                  for p, s in zip(ref, shards)]
        reference = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    for step in range(6):
        stats = adam.step(StepContext(step, 1, 1e-3, tiny_batch, backend))
        for p, shard in zip(ref, shards):
            p.grad = mezo_estimate(shard, stats)
        reference.step()
    for p, shard, p0 in zip(ref, shards, start):
        torch.testing.assert_close(shard.master, p.detach(), rtol=0, atol=1e-6)
        assert (shard.master - p0).abs().max() > 1e-3  # moved by several steps of about η
    assert adam.t == 6


def test_lr_zero_restores_bitwise_with_masters(tiny_model, tiny_batch):
    backend, adam = _setup(tiny_model, ["*"])
    before = snapshot(tiny_model)
    for step in range(2):
        adam.step(StepContext(step, 0, 0.0, tiny_batch, backend))
    assert all(torch.equal(before[n], p) for n, p in snapshot(tiny_model).items())
    assert adam.t == 2 and any(m.abs().sum() > 0 for m in adam.exp_avg.values())


@pytest.mark.parametrize("master", [True, False])
def test_replay_recomputes_the_moments_bitwise(tiny_model, tiny_batch, master):
    initial = snapshot(tiny_model)
    backend, adam = _setup(tiny_model, master=master, weight_decay=0.1)
    records = []
    for step in range(4):
        stats = adam.step(StepContext(step, 2, 1e-3, tiny_batch, backend))
        records.append(json.loads(json.dumps(
            {"step": step + 1, "seeds": stats.seeds, "projected_grad": stats.projected_grad,
             "lr": 1e-3, "skipped": stats.skipped, **stats.extra})))
    trained = snapshot(tiny_model)
    restore(tiny_model, initial)
    _, replayer = _setup(tiny_model, master=master, weight_decay=0.1)
    for record in records:
        replayer.replay(record)
    assert all(torch.equal(trained[n], p) for n, p in snapshot(tiny_model).items())
    assert replayer.t == adam.t == 4
    state, replayed = adam.shard_state(), replayer.shard_state()
    assert state.keys() == replayed.keys() and all(torch.equal(state[k], replayed[k])
                                                   for k in state)


def test_resume_needs_the_shard_state_and_then_continues_bitwise(tiny_model, tiny_batch):
    backend, adam = _setup(tiny_model)
    for step in range(2):
        adam.step(StepContext(step, 0, 1e-3, tiny_batch, backend))
    scalars, moments, weights = adam.state_dict(), adam.shard_state(), snapshot(tiny_model)
    assert scalars == {"t": 2}
    assert set(moments) == {f"{p}{n}" for p in ("exp_avg::", "exp_avg_sq::") for n in NAMES}
    assert all(m.dtype == torch.float32 and m.numel() == s.numel
               for s in backend.shards() for k, m in moments.items() if k.endswith(s.name))
    adam.step(StepContext(2, 0, 1e-3, tiny_batch, backend))
    uninterrupted = snapshot(tiny_model)

    restore(tiny_model, weights)
    backend2, resumed = _setup(tiny_model)
    resumed.load_state_dict(scalars)
    with pytest.raises(RuntimeError, match="load_shard_state"):
        resumed.step(StepContext(2, 0, 1e-3, tiny_batch, backend2))
    assert all(torch.equal(weights[n], p) for n, p in snapshot(tiny_model).items())  # untouched
    restore(tiny_model, weights)
    backend2, resumed = _setup(tiny_model)
    resumed.load_shard_state(moments)  # either order
    resumed.load_state_dict(scalars)
    resumed.step(StepContext(2, 0, 1e-3, tiny_batch, backend2))
    assert all(torch.equal(uninterrupted[n], p) for n, p in snapshot(tiny_model).items())


def test_sharded_moments_and_update_equal_the_whole_bitwise():
    """Three simulated ranks, each with its flat piece of one parameter and its own moments."""
    torch.manual_seed(0)
    weight = torch.randn(9, 7)
    cfg = MethodConfig(name="zo_adam")
    results = []
    for cuts in ([], [10, 11]):
        w = weight.clone()
        flat, bounds = w.view(-1), [0, *cuts, w.numel()]
        pieces = [ParamShard("w", (9, 7), a, flat[a:b], master=flat[a:b].clone())
                  for a, b in zip(bounds, bounds[1:])]
        ranks = [ZOAdam(cfg, [p]) for p in pieces]
        for step, g in enumerate([0.5, -1.25, 2.0]):
            for rank in ranks:  # the same logged scalars on every rank
                rank._apply([100 + step], [g], 1e-2)
        moments = [torch.cat([r.shard_state()[f"{k}::w"] for r in ranks])
                   for k in ("exp_avg", "exp_avg_sq")]
        assert all(r.shard_state()["exp_avg::w"].numel() == p.numel
                   for r, p in zip(ranks, pieces))
        results.append((w, moments))
    (w1, m1), (w2, m2) = results
    assert torch.equal(w1, w2) and all(torch.equal(a, b) for a, b in zip(m1, m2))
    assert not torch.equal(w1, weight)


def test_non_finite_loss_skips_without_counting_a_step(tiny_model, tiny_batch):
    backend, adam = _setup(tiny_model, ["*.mlp.*"])
    tiny_model.model.norm.weight.fill_(float("nan"))
    before = snapshot(tiny_model)
    stats = adam.step(StepContext(0, 0, 1e-3, tiny_batch, backend))
    assert stats.skipped and math.isnan(stats.loss) and adam.t == 0
    assert all(m.abs().sum() == 0 for m in adam.exp_avg.values())
    after = snapshot(tiny_model)
    assert all(torch.equal(before[n], after[n]) or n == "model.norm.weight" for n in before)
