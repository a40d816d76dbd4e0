import math

import pytest
import torch

from pipeline.config import MethodConfig
from pipeline.models.objective import batch_loss
from pipeline.parallel import trainable_names
from pipeline.parallel.single import SingleBackend
from pipeline.zo.methods import StepContext
from pipeline.zo.methods.mezo import MeZO
from pipeline.zo.noise import gaussian


def _setup(model, patterns=("*",), master=False, **method):
    trainable = trainable_names(model, list(patterns))
    backend = SingleBackend(model, trainable, torch.device("cpu"), master=master)
    return backend, MeZO(MethodConfig(**method), backend.shards())


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("two_sided", [True, False])
def test_lr_zero_restores_bitwise_with_fp32_master(tiny_model, tiny_batch, two_sided):
    backend, mezo = _setup(tiny_model, master=True, two_sided=two_sided)
    before = _params(tiny_model)
    for step in range(3):
        mezo.step(StepContext(step, 0, 0.0, tiny_batch, backend))
    after = _params(tiny_model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("two_sided", [True, False])
def test_lr_zero_is_bitwise_without_master(tiny_model, tiny_batch, two_sided):
    """The forwards never write the stored weights, so nothing drifts (MeZO's in-place
    θ + εz - 2εz + εz did, by about an ulp per step)."""
    backend, mezo = _setup(tiny_model, master=False, two_sided=two_sided)
    before = _params(tiny_model)
    for step in range(3):
        mezo.step(StepContext(step, 0, 0.0, tiny_batch, backend))
    after = _params(tiny_model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def _true_gradient(model, batch, name):
    param = dict(model.named_parameters())[name]
    param.requires_grad_(True)
    with torch.enable_grad():
        loss = batch_loss(model, batch)
        (grad,) = torch.autograd.grad(loss, param)
    param.requires_grad_(False)
    return grad.reshape(-1)


def test_mezo_estimate_is_unbiased(tiny_model, tiny_batch):
    name = "model.layers.1.mlp.down_proj.weight"
    backend, mezo = _setup(tiny_model, [name], master=True, eps=1e-2)
    shard = backend.shards()[0]
    d = shard.numel
    true = _true_gradient(tiny_model, tiny_batch, name)
    samples = 3000
    total = torch.zeros(d, dtype=torch.float64)
    for step in range(samples):
        stats = mezo.step(StepContext(step, 0, 0.0, tiny_batch, backend))
        z = gaussian(stats.seeds[0], shard.key, 0, d, shard.total)
        total += stats.projected_grad[0] * z.double()
    mean = total / samples
    cos = torch.nn.functional.cosine_similarity(mean, true.double(), dim=0).item()
    # SPSA with Gaussian z: E[g z] = ∇ and E‖g z - ∇‖² = (d+1)‖∇‖², so the mean of N estimates has
    # expected cosine 1/sqrt(1 + (d+1)/N) to ∇. Allow twice the expected error norm.
    bound = 1 / math.sqrt(1 + 4 * (d + 1) / samples)
    assert cos > bound, (cos, bound)
    # and the scale is right: the projection of the mean on ∇ is ‖∇‖ within 15%
    proj = (mean @ true.double()) / true.double().norm() ** 2
    assert abs(proj.item() - 1) < 0.15


def test_update_moves_parameters_along_minus_g_z(tiny_model, tiny_batch):
    name = "model.layers.0.self_attn.q_proj.weight"
    backend, mezo = _setup(tiny_model, [name], master=True, eps=1e-3)
    shard = backend.shards()[0]
    before = shard.master.clone()
    lr = 1e-2
    stats = mezo.step(StepContext(4, 0, lr, tiny_batch, backend))
    z = gaussian(stats.seeds[0], shard.key, 0, shard.numel, shard.total)
    expected = before - torch.tensor(lr * stats.projected_grad[0], dtype=torch.float32) * z
    torch.testing.assert_close(shard.master, expected, rtol=0, atol=1e-7)
    assert torch.equal(shard.local, shard.master)  # fp32 storage: the stored weights are the master


def test_weight_decay_skips_norms_and_n_directions_average(tiny_model, tiny_batch):
    backend, mezo = _setup(
        tiny_model, ["*.down_proj.weight", "*.post_attention_layernorm.weight"], master=True,
        weight_decay=0.1, n_directions=3,
    )
    shards = {s.name: s for s in backend.shards()}
    before = {n: s.master.clone() for n, s in shards.items()}
    lr = 1e-2
    stats = mezo.step(StepContext(0, 0, lr, tiny_batch, backend))
    assert stats.forwards == 6 and len(stats.projected_grad) == 3
    for name, shard in shards.items():
        step = sum(
            g * gaussian(s, shard.key, 0, shard.numel, shard.total)
            for g, s in zip(stats.projected_grad, stats.seeds)
        ) / 3
        decay = 0.1 if "down_proj" in name else 0.0
        expected = before[name] * (1 - lr * decay) - lr * step
        torch.testing.assert_close(shard.master, expected, rtol=0, atol=1e-6)


def test_non_finite_loss_skips_the_update_and_restores(tiny_model, tiny_batch):
    backend, mezo = _setup(tiny_model, ["*.mlp.*"], master=False)
    tiny_model.model.norm.weight.fill_(float("nan"))  # a frozen weight makes every loss NaN
    before = _params(tiny_model)
    stats = mezo.step(StepContext(0, 0, 1e-3, tiny_batch, backend))
    assert stats.skipped and math.isnan(stats.loss)
    after = _params(tiny_model)
    for n in before:
        if ".mlp." in n:
            torch.testing.assert_close(after[n], before[n], rtol=0, atol=1e-6)
