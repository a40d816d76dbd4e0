"""BSZO (Feng & Huang, Algorithm 1 / 2) on the tiny fp32 Llama: exact values against formulas."""

import json
import math

import numpy as np
import pytest
import torch

from pipeline.config import MethodConfig
from pipeline.models.objective import batch_loss
from pipeline.parallel import trainable_names
from pipeline.parallel.single import SingleBackend
from pipeline.zo.directions import Term
from pipeline.zo.methods import METHODS, StepContext
from pipeline.zo.methods.bszo import BSZO, Posterior
from pipeline.zo.noise import gaussian
from pipeline.zo.perturbation import Perturbation
from pipeline.zo.shards import ParamShard

NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.post_attention_layernorm.weight"]


def _setup(model, patterns=NAMES, master=True, **method):
    backend = SingleBackend(model, trainable_names(model, list(patterns)), "cpu", master=master)
    return backend, BSZO(MethodConfig(name="bszo", **method), backend.shards())


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _restore(model, saved):
    for n, p in model.named_parameters():
        p.data.copy_(saved[n])


def _z(shard, seed):
    return gaussian(seed, shard.key, 0, shard.numel, shard.total).double()


def _kalman(y_obs, dirs, sigma_p, sigma_e0, alpha, ema):
    """Algorithm 1's filter written directly in numpy float64 (the reference)."""
    k = len(dirs[0])
    mu, cov = np.zeros(k), sigma_p**2 * np.eye(k)
    for d, y in zip(dirs, y_obs):
        d = np.asarray(d, dtype=np.float64)
        innov = y - d @ mu
        if alpha > 0:
            ema = (1 - alpha) * ema + alpha * (innov / np.linalg.norm(d)) ** 2
        se = max(0.1 * sigma_e0, math.sqrt(ema))
        gain = cov @ d / (d @ cov @ d + se**2 * (d @ d))
        mu = mu + gain * innov
        cov = cov - np.outer(gain, d @ cov)
    return mu, cov, ema


def _axis_dirs(ys, k, m, sigma_p, sigma_e0, alpha, ema):
    """Algorithm 1's observation sequence: e_1..e_k, then e_argmax diag(Σ) reusing y_j."""
    dirs, obs = [list(np.eye(k)[i]) for i in range(k)], list(ys[:k])
    for _ in range(m - k):
        _, cov, _ = _kalman(obs, dirs, sigma_p, sigma_e0, alpha, ema)
        j = int(np.argmax(np.diag(cov)))
        dirs.append(list(np.eye(k)[j]))
        obs.append(ys[j])
    return dirs, obs


def test_registered_and_sigma_from_global_parameter_count():
    assert METHODS["bszo"] is BSZO
    w = torch.zeros(7, 5)
    flat = w.view(-1)
    whole = BSZO(MethodConfig(name="bszo"), [ParamShard("w", (7, 5), 0, flat)])
    piece = BSZO(MethodConfig(name="bszo"), [ParamShard("w", (7, 5), 11, flat[11:12])])
    assert whole.sigma_p == piece.sigma_p == math.sqrt(35 / 1e6) == whole.sigma_e0
    assert whole.m == 3 and whole.noise_ema == whole.sigma_e0**2
    with pytest.raises(ValueError, match="bszo_m"):
        BSZO(MethodConfig(name="bszo", bszo_k=3, bszo_m=2), [])


def test_m_equals_k_with_fixed_noise_is_corollary_3_6(tiny_model, tiny_batch):
    """m = k, α = 0: μ = γ y with γ = σp² / (σp² + σe²), so θ ← θ - η γ Σ y_i z_i."""
    backend, bszo = _setup(tiny_model, bszo_m=2, bszo_alpha=0.0, bszo_sigma=0.05, eps=1e-4)
    bszo.load_state_dict({"noise_ema": 0.1**2})  # σe = 0.1 ≠ σp, so γ = 1/5
    shards = backend.shards()
    before = [s.master.double() for s in shards]
    lr = 1e-2
    stats = bszo.step(StepContext(3, 0, lr, tiny_batch, backend))
    assert stats.forwards == 3 and len(stats.projected_grad) == 2 and not stats.skipped
    gamma = 0.05**2 / (0.05**2 + 0.1**2)
    y = stats.projected_grad
    np.testing.assert_allclose(stats.extra["mu"], [gamma * v for v in y], rtol=1e-12, atol=0)
    for shard, b in zip(shards, before):
        step = sum(yi * _z(shard, s) for yi, s in zip(y, stats.seeds))
        torch.testing.assert_close(shard.master.double(), b - lr * gamma * step, rtol=0,
                                   atol=2e-7)
        assert torch.equal(shard.local, shard.master)


def test_observations_are_directional_derivatives(tiny_model, tiny_batch):
    """Autograd as the oracle: y_i = (L(θ+εz_i) - L0)/ε ≈ ∇L·z_i."""
    backend, bszo = _setup(tiny_model, eps=1e-3)
    params = dict(tiny_model.named_parameters())
    for n in NAMES:
        params[n].requires_grad_(True)
    with torch.enable_grad():
        grads = torch.autograd.grad(batch_loss(tiny_model, tiny_batch), [params[n] for n in NAMES])
    for n in NAMES:
        params[n].requires_grad_(False)
    stats = bszo.step(StepContext(0, 0, 0.0, tiny_batch, backend))
    for y, seed in zip(stats.projected_grad, stats.seeds):
        true = sum((g.reshape(-1).double() @ _z(s, seed)).item()
                   for g, s in zip(grads, backend.shards()))
        assert abs(y - true) < 0.05 * abs(true) + 1e-3, (y, true)


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_posterior_is_the_direct_float64_kalman_filter(tiny_model, tiny_batch, alpha):
    backend, bszo = _setup(tiny_model, bszo_alpha=alpha, bszo_sigma=0.02)
    shards = backend.shards()
    ema = bszo.noise_ema
    for step in range(2):  # the second step starts from the noise state the first one left
        before = [s.master.double() for s in shards]
        stats = bszo.step(StepContext(step, 0, 1e-2, tiny_batch, backend))
        ys = stats.projected_grad
        dirs, obs = _axis_dirs(ys, 2, 3, 0.02, 0.02, alpha, ema)
        mu, cov, ema = _kalman(obs, dirs, 0.02, 0.02, alpha, ema)
        np.testing.assert_allclose(bszo.posterior.mu.numpy(), mu, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(bszo.posterior.cov.numpy(), cov, rtol=1e-12, atol=1e-18)
        np.testing.assert_allclose(stats.extra["mu"], mu, rtol=1e-12, atol=1e-15)
        assert bszo.noise_ema == pytest.approx(ema, rel=1e-12)
        assert stats.extra["noise_ema"] == bszo.noise_ema
        if alpha == 0.0:  # the batch (information-form) posterior of the same observations
            info = np.eye(2) / 0.02**2 + sum(np.outer(d, d) for d in dirs) / 0.02**2
            batch_mu = np.linalg.solve(info, sum(np.asarray(d) * o for d, o in zip(dirs, obs))
                                       / 0.02**2)
            np.testing.assert_allclose(mu, batch_mu, rtol=1e-10)
            np.testing.assert_allclose(cov, np.linalg.inv(info), rtol=1e-10)
        for shard, b in zip(shards, before):
            update = sum(mi * _z(shard, s) for mi, s in zip(mu, stats.seeds))
            torch.testing.assert_close(shard.master.double(), b - 1e-2 * update, rtol=0,
                                       atol=2e-7)
    if alpha > 0:
        assert ema != 0.02**2  # the noise adapted


def test_noise_state_persists_through_state_dict(tiny_model, tiny_batch):
    backend, bszo = _setup(tiny_model)
    bszo.step(StepContext(0, 0, 1e-3, tiny_batch, backend))
    state = json.loads(json.dumps(bszo.state_dict()))
    assert state["noise_ema"] != bszo.sigma_e0**2
    weights = _params(tiny_model)
    run_on = bszo.step(StepContext(1, 0, 1e-3, tiny_batch, backend))
    after = _params(tiny_model)

    def resumed(load):
        _restore(tiny_model, weights)
        backend2, fresh = _setup(tiny_model)
        if load:
            fresh.load_state_dict(state)
        return fresh.step(StepContext(1, 0, 1e-3, tiny_batch, backend2)), _params(tiny_model)

    stats, params = resumed(load=True)
    assert stats.extra == run_on.extra and stats.projected_grad == run_on.projected_grad
    assert all(torch.equal(params[n], after[n]) for n in after)
    stats, _ = resumed(load=False)  # without the state the step differs
    assert stats.extra["mu"] != run_on.extra["mu"]


@pytest.mark.parametrize("variant", ["bszo", "bszo_b"])
def test_lr_zero_restores_bitwise_with_masters(tiny_model, tiny_batch, variant):
    backend, bszo = _setup(tiny_model, ["*"], bszo_variant=variant)
    before = _params(tiny_model)
    for step in range(2):
        bszo.step(StepContext(step, 0, 0.0, tiny_batch, backend))
    after = _params(tiny_model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("master", [True, False])
@pytest.mark.parametrize("variant", ["bszo", "bszo_b"])
def test_replay_equals_the_run_bitwise(tiny_model, tiny_batch, master, variant):
    initial = _params(tiny_model)
    backend, bszo = _setup(tiny_model, master=master, bszo_variant=variant, weight_decay=0.1)
    records = []
    for step in range(3):
        stats = bszo.step(StepContext(step, 7, 1e-2, tiny_batch, backend))
        records.append(json.loads(json.dumps(
            {"step": step + 1, "seeds": stats.seeds, "projected_grad": stats.projected_grad,
             "lr": 1e-2, "skipped": stats.skipped, **stats.extra})))
    trained, ema = _params(tiny_model), bszo.noise_ema
    _restore(tiny_model, initial)
    _, replayer = _setup(tiny_model, master=master, bszo_variant=variant, weight_decay=0.1)
    for record in records:
        replayer.replay(record)
    replayed = _params(tiny_model)
    assert all(torch.equal(trained[n], replayed[n]) for n in trained)
    assert any(not torch.equal(trained[n], initial[n]) for n in trained)
    assert replayer.noise_ema == ema


class _Counting:
    def __init__(self, backend):
        self.backend, self.forwards, self.reductions, self.scalars = backend, 0, 0, 0

    def loss(self, batch, at=None):
        self.forwards += 1
        return self.backend.loss(batch, at)

    def losses(self, batch, ats):
        self.forwards += len(ats)
        return self.backend.losses(batch, ats)

    def all_reduce_mean(self, tensor):
        self.reductions += 1
        self.scalars += tensor.numel()
        return self.backend.all_reduce_mean(tensor)


@pytest.mark.parametrize(("variant", "forwards", "reductions"),
                         [("bszo", 3, 1), ("bszo_b", 4, 2)])
def test_forwards_and_communication_per_step(tiny_model, tiny_batch, variant, forwards,
                                             reductions):
    backend, bszo = _setup(tiny_model, bszo_variant=variant)
    counting = _Counting(backend)
    stats = bszo.step(StepContext(0, 0, 1e-3, tiny_batch, counting))
    assert stats.forwards == counting.forwards == forwards  # 1 + k (+1 for bszo_b)
    assert counting.reductions == reductions and counting.scalars == forwards
    assert len(stats.projected_grad) == forwards - 1
    if variant == "bszo_b":
        (d,) = stats.extra["directions"]
        assert math.isclose(sum(c * c for c in d), 1.0) and max(d) == pytest.approx(1.0)


def test_bszo_b_direction_is_the_top_eigenvector_and_moves_along_it(tiny_model):
    post = Posterior(2, 1.0, 1.0, 0.0, 1.0)
    post.observe(torch.tensor([1.0, 1.0], dtype=torch.float64), 0.3)  # Σ no longer diagonal
    np.testing.assert_allclose(post.cov.numpy(), [[0.75, -0.25], [-0.25, 0.75]], rtol=1e-15)
    d = post.top_eigenvector()  # eigenvalues 0.5 along (1, 1), 1.0 along (1, -1)
    np.testing.assert_allclose(d.abs().numpy(), [2**-0.5, 2**-0.5], rtol=1e-12)
    assert d[0] * d[1] < 0 and d[int(d.abs().argmax())] > 0
    # the forward sees θ + ε Σ d_i z_i, with masters and without alike
    for master in (True, False):
        _, method = _setup(tiny_model, master=master)
        seeds, new = [11, 12], [1e-2 * float(c) for c in d]
        at = Perturbation([Term(c, seed=s) for s, c in zip(seeds, new)])
        for s in method.shards:  # 2 fp32 roundings of weights |w| <= 1: up to 1.2e-7
            seen = torch.empty_like(s.local)
            at.write(s, seen)
            want = s.local.double() + new[0] * _z(s, 11) + new[1] * _z(s, 12)
            torch.testing.assert_close(seen.double(), want, rtol=0, atol=2e-7)


def test_non_finite_loss_skips_and_keeps_the_noise_state(tiny_model, tiny_batch):
    backend, bszo = _setup(tiny_model, ["*.mlp.*"])
    tiny_model.model.norm.weight.fill_(float("nan"))
    before, ema = _params(tiny_model), bszo.noise_ema
    stats = bszo.step(StepContext(0, 0, 1e-3, tiny_batch, backend))
    assert stats.skipped and math.isnan(stats.loss) and bszo.noise_ema == ema
    after = _params(tiny_model)
    assert all(torch.equal(before[n], after[n]) or n == "model.norm.weight" for n in before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_perturbation_and_update_equal_the_whole_bitwise(dtype):
    """Simulated ranks (3 flat pieces of one parameter) see a bszo_b combination and apply a
    step like the whole."""
    torch.manual_seed(0)
    weight = torch.randn(9, 7).to(dtype)
    seeds, d = [5, 6], [0.6, -0.8]
    results = []
    at = Perturbation([Term(1e-3 * c, seed=s) for s, c in zip(seeds, d)])
    for cuts in ([], [10, 11]):
        w = weight.clone()
        flat, bounds = w.view(-1), [0, *cuts, w.numel()]
        seen = []
        for a, b in zip(bounds, bounds[1:]):
            piece = ParamShard("w", (9, 7), a, flat[a:b])
            seen.append(torch.empty_like(piece.local))
            at.write(piece, seen[-1])
            BSZO(MethodConfig(name="bszo", weight_decay=0.1), [piece])._apply(
                seeds, [0.25, -0.5], 1e-2)
        results.append((w, torch.cat(seen)))
    (w1, p1), (w2, p2) = results
    assert torch.equal(p1, p2) and not torch.equal(p1, weight.view(-1))
    assert torch.equal(w1, w2) and not torch.equal(w1, weight)
