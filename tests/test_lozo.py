"""LOZO (Chen et al., low-rank ZO): sharded directions, lazy V, the update, the estimator."""

import json
import math

import pytest
import torch

from pipeline.config import MethodConfig
from pipeline.parallel import trainable_names
from pipeline.parallel.single import SingleBackend
from pipeline.zo.methods import METHODS, StepContext
from pipeline.zo.methods.lozo import LOZO, factors
from pipeline.zo.noise import gaussian
from pipeline.zo.perturbation import Perturbation
from pipeline.zo.shards import ParamShard


def _cfg(**method):
    return MethodConfig(name="lozo", **method)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _restore(model, saved):
    for n, p in model.named_parameters():
        p.data.copy_(saved[n])


def _setup(model, patterns, master=True, **method):
    backend = SingleBackend(model, trainable_names(model, list(patterns)), "cpu", master=master)
    return backend, LOZO(_cfg(**method), backend.shards())


def _dense(method, shard, seeds):
    out = torch.empty(shard.numel)
    for off, piece in method.direction(shard, seeds):
        out[off : off + piece.numel()] = piece
    return out


def _pieces(tensor, name, cuts, master=False):
    """ParamShards of one parameter split at the flat offsets ``cuts`` (simulated ranks)."""
    flat, bounds = tensor.view(-1), [0, *cuts, tensor.numel()]
    return [ParamShard(name, tuple(tensor.shape), a, flat[a:b],
                       master=flat[a:b].clone() if master else None)
            for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize(("shape", "cuts", "rank"), [
    ((7, 5), [11, 12], 2), ((7, 5), [3, 29], 3), ((600, 1000), [1, 262_500], 2),
])
def test_sharded_direction_equals_slices_of_u_vt_bitwise(shape, cuts, rank):
    """3 flat pieces (crossing rows, and row chunks for the large one) against the whole."""
    assert METHODS["lozo"] is LOZO
    method = LOZO(_cfg(lozo_rank=rank), [])
    weight = torch.zeros(shape)
    seeds = method.seeds(5, 123)
    (whole,) = _pieces(weight, "layer.weight", [])
    full = _dense(method, whole, seeds)
    u, v = factors(whole, *seeds, rank)
    explicit = sum(u[:, k : k + 1] * v[:, k] for k in range(rank)).reshape(-1)
    assert torch.equal(full, explicit)  # Σ_k in order, elementwise
    torch.testing.assert_close(full, (u @ v.T).reshape(-1), rtol=1e-5, atol=1e-5)
    for shard in _pieces(weight, "layer.weight", cuts):
        part = _dense(method, shard, seeds)
        assert torch.equal(part, full[shard.start : shard.start + shard.numel])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_perturbation_and_update_equal_the_whole_bitwise(dtype):
    torch.manual_seed(1)
    weight, norm = torch.randn(7, 5).to(dtype), torch.randn(9).to(dtype)
    seeds = [11, 22]
    results = []
    for cuts in ([], [4]), ([11, 12], [2, 3]):
        w, b = weight.clone(), norm.clone()
        seen = []
        for shard in _pieces(w, "w", cuts[0]) + _pieces(b, "b", cuts[1]):
            # each simulated rank runs its own method over its own pieces
            method = LOZO(_cfg(weight_decay=0.1), [shard])
            part = torch.empty_like(shard.local)
            Perturbation.along(method._pieces(seeds), 1e-2).write(shard, part)
            seen.append(part)
            method._update(seeds, 0.37, 1e-2)
        results.append((w, b, torch.cat(seen)))
    (w1, b1, p1), (w2, b2, p2) = results
    assert torch.equal(p1, p2) and not torch.equal(p1, torch.cat([weight.view(-1), norm]))
    assert torch.equal(w1, w2) and torch.equal(b1, b2) and not torch.equal(w1, weight)


def test_v_is_redrawn_every_nu_steps_and_u_every_step():
    nu = 4
    method = LOZO(_cfg(lozo_nu=nu), [])
    shard = ParamShard("w", (6, 5), 0, torch.zeros(30))
    us, vs = [], []
    for step in range(3 * nu):
        u, v = factors(shard, *method.seeds(9, step), 2)
        us.append(u)
        vs.append(v)
    for step in range(1, 3 * nu):
        assert not torch.equal(us[step], us[step - 1])
        assert torch.equal(vs[step], vs[step - 1]) == (step % nu != 0)
    assert method.seeds(9, 2 * nu + 1)[1] == method.seeds(9, 2 * nu)[1]


def test_update_is_minus_lr_c_u_vt_over_r(tiny_model, tiny_batch):
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"]
    backend, lozo = _setup(tiny_model, names, lozo_rank=3, eps=1e-3)
    shards = backend.shards()
    before = [s.master.clone().double() for s in shards]
    lr = 1e-2
    stats = lozo.step(StepContext(6, 0, lr, tiny_batch, backend))
    (c,) = stats.projected_grad
    assert stats.forwards == 2 and stats.seeds == lozo.seeds(0, 6)
    q, norm = shards
    u, v = factors(q, *stats.seeds, 3)
    want = before[0] - lr * c * (u.double() @ v.double().T).reshape(-1) / 3
    torch.testing.assert_close(q.master.double(), want, rtol=0, atol=1e-7)
    z = gaussian(stats.seeds[0], norm.key, 0, norm.numel, norm.total).double()
    torch.testing.assert_close(norm.master.double(), before[1] - lr * c * z, rtol=0, atol=1e-7)
    assert torch.equal(q.local, q.master)


def test_lr_zero_restores_bitwise_with_masters(tiny_model, tiny_batch):
    backend, lozo = _setup(tiny_model, ["*"], lozo_nu=2)
    before = _params(tiny_model)
    for step in range(3):
        lozo.step(StepContext(step, 0, 0.0, tiny_batch, backend))
    after = _params(tiny_model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("master", [True, False])
def test_replay_equals_the_run_bitwise(tiny_model, tiny_batch, master):
    initial = _params(tiny_model)
    backend, lozo = _setup(tiny_model, ["*"], master=master, lozo_nu=2, weight_decay=0.1)
    records = []
    for step in range(3):
        stats = lozo.step(StepContext(step, 3, 1e-2, tiny_batch, backend))
        records.append(json.loads(json.dumps(
            {"step": step + 1, "seeds": stats.seeds, "projected_grad": stats.projected_grad,
             "lr": 1e-2, "skipped": stats.skipped, **stats.extra})))
    trained = _params(tiny_model)
    _restore(tiny_model, initial)
    _, replayer = _setup(tiny_model, ["*"], master=master, lozo_nu=2, weight_decay=0.1)
    for record in records:
        replayer.replay(record)
    replayed = _params(tiny_model)
    assert all(torch.equal(trained[n], replayed[n]) for n in trained)
    assert any(not torch.equal(trained[n], initial[n]) for n in trained)


def test_non_finite_loss_skips_the_update_and_restores(tiny_model, tiny_batch):
    backend, lozo = _setup(tiny_model, ["*.mlp.*"])
    tiny_model.model.norm.weight.fill_(float("nan"))
    before = _params(tiny_model)
    stats = lozo.step(StepContext(0, 0, 1e-3, tiny_batch, backend))
    assert stats.skipped and math.isnan(stats.loss)
    after = _params(tiny_model)
    assert all(torch.equal(before[n], after[n]) or n == "model.norm.weight" for n in before)


# -- the estimator ----------------------------------------------------------------------------
#
# With c = <G, U Vᵀ> (the exact directional derivative; the finite difference adds O(ε²)) the
# estimate is ĝ = c U Vᵀ / r. For U (out, r), V (in, r) standard Gaussian (Isserlis' theorem):
#   given V:  E[ĝ | V] = G V Vᵀ / r,
#             E[‖ĝ‖² | V] = (out ‖V‖² ‖G V‖² + 2 ‖G V Vᵀ‖²) / r²;
#   over V:   E[ĝ] = G,  E‖ĝ‖² = (out (in + 2/r) + 2 (r + in + 1) / r) ‖G‖².
# The mean of N independent estimates then has E‖ḡ - E ĝ‖² = (E‖ĝ‖² - ‖E ĝ‖²) / N, and its
# cosine to E ĝ is about 1 / sqrt(1 + K/N) with K = that variance / ‖E ĝ‖². The tests allow
# twice the expected error norm: cos > 1 / sqrt(1 + 4K/N).


class _Quadratic:
    """A tiny softmax-regression "model" (fp32) behind the backend contract; autograd oracle."""

    def __init__(self, out=12, inner=10, n=64):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, inner, generator=gen)
        self.y = torch.randint(0, out, (n,), generator=gen)
        self.w = torch.randn(out, inner, generator=gen) * 0.3
        self.b = torch.zeros(out)

    def shards(self):
        return [ParamShard("w", tuple(self.w.shape), 0, self.w.view(-1)),
                ParamShard("b", tuple(self.b.shape), 0, self.b.view(-1), decay=False)]

    def _loss(self, w, b):
        return torch.nn.functional.cross_entropy(self.x @ w.T + b, self.y)

    def loss(self, batch, at=None):
        """The loss at the stored ``w, b``, or at the perturbed values ``at`` writes."""
        del batch
        if at is None:
            return self._loss(self.w, self.b).detach()
        seen = []
        for shard in self.shards():
            seen.append(torch.empty_like(shard.local))
            at.write(shard, seen[-1])
        return self._loss(seen[0].view(self.w.shape), seen[1]).detach()

    def losses(self, batch, ats):
        return [self.loss(batch, at) for at in ats]

    def all_reduce_mean(self, tensor):
        return tensor.to(torch.float64)

    def gradient(self):
        w = self.w.clone().requires_grad_(True)
        return torch.autograd.grad(self._loss(w, self.b), w)[0].double()


def _mean_estimate(model, method, steps, run_seed=0):
    w = method.shards[0]
    total = torch.zeros(w.numel, dtype=torch.float64)
    for step in range(steps):
        stats = method.step(StepContext(step, run_seed, 0.0, None, model))
        u, v = factors(w, *stats.seeds, method.rank)
        total += stats.projected_grad[0] * (u.double() @ v.double().T).reshape(-1) / method.rank
    return total / steps


def test_second_moment_formula_matches_monte_carlo():
    gen = torch.Generator().manual_seed(3)
    out, inner, r, n = 6, 5, 2, 200_000
    g = torch.randn(out, inner, generator=gen, dtype=torch.float64)
    u = torch.randn(n, out, r, generator=gen, dtype=torch.float64)
    v = torch.randn(n, inner, r, generator=gen, dtype=torch.float64)
    m = u @ v.transpose(1, 2)
    est = (m * g).sum((1, 2))[:, None, None] * m / r
    torch.testing.assert_close(est.mean(0), g, rtol=0, atol=0.1 * g.norm().item())
    second = (est**2).sum((1, 2)).mean().item()
    derived = (out * (inner + 2 / r) + 2 * (r + inner + 1) / r) * (g**2).sum().item()
    assert abs(second / derived - 1) < 0.05, (second, derived)


def test_lozo_estimate_is_unbiased_for_the_gradient():
    """V redrawn every step (ν = 1): the mean estimate approaches the autograd gradient."""
    model = _Quadratic()
    method = LOZO(_cfg(lozo_nu=1, eps=1e-3), model.shards()[:1])
    out, inner = model.w.shape
    r, steps = method.rank, 1000
    true = model.gradient().reshape(-1)
    mean = _mean_estimate(model, method, steps)
    k = out * (inner + 2 / r) + 2 * (r + inner + 1) / r - 1
    bound = 1 / math.sqrt(1 + 4 * k / steps)
    cos = torch.nn.functional.cosine_similarity(mean, true, dim=0).item()
    assert cos > bound, (cos, bound)
    proj = (mean @ true / true.norm() ** 2).item()
    assert abs(proj - 1) < 0.2, proj  # its spread is about 0.04 here (1000 steps)


def test_lozo_estimate_with_fixed_v_is_the_projected_gradient():
    """V fixed (ν > steps): the mean approaches G V Vᵀ / r (the paper's subspace gradient)."""
    model = _Quadratic()
    method = LOZO(_cfg(lozo_nu=10_000, eps=1e-3), model.shards()[:1])
    w = method.shards[0]
    out, _ = model.w.shape
    r, steps = method.rank, 300
    _, v = factors(w, *method.seeds(0, 0), r)
    g, v = model.gradient(), v.double()
    target = (g @ v @ v.T / r).reshape(-1)
    variance = (out * v.norm() ** 2 * (g @ v).norm() ** 2 + (g @ v @ v.T).norm() ** 2) / r**2
    k = (variance / target.norm() ** 2).item()
    mean = _mean_estimate(model, method, steps)
    bound = 1 / math.sqrt(1 + 4 * k / steps)
    cos = torch.nn.functional.cosine_similarity(mean, target, dim=0).item()
    assert cos > bound, (cos, bound)
    # the scale: along a = E ĝ / ‖E ĝ‖, Var<ĝ, a> = (‖G V‖² ‖A V‖² + <G V, A V>²) / r²
    # (Isserlis again, A = a as a matrix); allow 4 standard deviations of the mean
    gv, av = g @ v, (target / target.norm()).reshape(g.shape) @ v
    spread = math.sqrt(((gv.norm() ** 2 * av.norm() ** 2 + (gv * av).sum() ** 2) / r**2).item()
                       / steps) / target.norm().item()
    proj = (mean @ target / target.norm() ** 2).item()
    assert abs(proj - 1) < 4 * spread, (proj, spread)
    # its cosine to the full gradient is that of the projection: far from 1 at r = 2
    full = torch.nn.functional.cosine_similarity(mean, g.reshape(-1), dim=0).item()
    assert full < cos
