"""Stochastic rounding of updates into bf16/fp16: unbiased, the expected share of elements moves,
deterministic and slice-invariant, compiled = eager."""

import math

import pytest
import torch

from pipeline.zo import noise
from pipeline.zo.directions import Term
from pipeline.zo.rounding import rounding_seed
from pipeline.zo.shards import ParamShard
from pipeline.zo.update import update

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
N = 1 << 18  # above the compile threshold: the compiled kernels


def _neighbours(v: float, dtype) -> tuple[float, float]:
    """The two representable values around ``v`` in ``dtype`` (below, above)."""
    h = torch.tensor(v).to(dtype)
    hb = h.view(torch.int16)
    up = (hb + 1 if v >= 0 else hb - 1).view(dtype)
    lo, hi = sorted([h.float().item(), up.float().item()])
    if not lo <= v <= hi:  # v was below h: the other neighbour is one step down
        down = (hb - 1 if v >= 0 else hb + 1).view(dtype)
        lo, hi = sorted([h.float().item(), down.float().item()])
    return lo, hi


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_rounding_is_unbiased_and_picks_a_neighbour(dtype):
    low = LOW[dtype]
    for v in [0.0123456, -0.0123456, 1.0 + 1e-3, 3.3e-5, -7.77]:
        values = torch.full((N,), v)
        out = torch.empty(N, dtype=low)
        noise.round_into(out, values, rounding_seed(7), 99, 0, N)
        lo, hi = _neighbours(v, low)
        got = out.double()
        assert set(torch.unique(got).tolist()) <= {lo, hi}, (v, torch.unique(got), lo, hi)
        p = (v - lo) / (hi - lo)  # probability of the upper neighbour
        mean_se = (hi - lo) * math.sqrt(p * (1 - p) / N)
        assert abs(got.mean().item() - v) < 4 * mean_se + 1e-12, (v, got.mean().item())


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_an_update_below_half_an_ulp_moves_the_expected_share_and_is_kept_on_average(dtype):
    """θ = 0.0123 everywhere, update c·z with c·|z| far below half an ulp: round-to-nearest would
    change nothing; stochastic rounding moves each element with probability |c z| / ulp, and the
    mean of the rounded updates is the mean of the fp32 updates."""
    low = LOW[dtype]
    theta = torch.full((N,), 0.0123, dtype=low)
    start = theta.float().clone()
    shard = ParamShard("w", (N,), 0, theta)
    lo, hi = _neighbours(start[0].item(), low)
    ulp = hi - lo
    c = ulp / 20
    update([shard], [Term(c, seed=5)], rounding=rounding_seed(5))
    z = noise.gaussian(5, shard.key, 0, N, N).double()
    want = c * z  # the fp32 updates
    got = theta.double() - start.double()
    assert (want.abs() < ulp / 2).all()  # round-to-nearest keeps none of them
    # each element moves by one ulp with probability |c z| / ulp (a neighbour of θ, not of θ+cz,
    # differs for the negative side by the ulp below; both are ulp here)
    moved = (got != 0).double()
    expected = (want.abs() / ulp).clamp(max=1)
    se = math.sqrt((expected * (1 - expected)).sum().item())
    assert abs(moved.sum().item() - expected.sum().item()) < 4 * se
    # unbiased: the mean rounded update is the mean fp32 update within its standard error
    diff = got - want
    assert abs(diff.mean().item()) < 4 * diff.std().item() / math.sqrt(N)


def test_rounding_is_deterministic_slice_invariant_and_compiled_equals_eager(monkeypatch):
    values = torch.randn(N, generator=torch.Generator().manual_seed(0)) * 0.02
    whole = torch.empty(N, dtype=torch.bfloat16)
    noise.round_into(whole, values, 123, 4, 0, N)
    again = torch.empty(N, dtype=torch.bfloat16)
    noise.round_into(again, values, 123, 4, 0, N)
    assert torch.equal(whole.view(torch.int16), again.view(torch.int16))
    for a, n in [(0, 1), (1, 1), (N - 1, 1), (5, 3), (777, 50_001)]:
        part = torch.empty(n, dtype=torch.bfloat16)
        noise.round_into(part, values[a : a + n], 123, 4, a, N)
        assert torch.equal(part.view(torch.int16), whole[a : a + n].view(torch.int16)), (a, n)
    other = torch.empty(N, dtype=torch.bfloat16)
    noise.round_into(other, values, 124, 4, 0, N)  # another seed: other draws
    assert not torch.equal(other.view(torch.int16), whole.view(torch.int16))
    monkeypatch.setattr(noise, "COMPILE_MIN", 1 << 40)  # the eager reference
    eager = torch.empty(N, dtype=torch.bfloat16)
    noise.round_into(eager, values, 123, 4, 0, N)
    assert torch.equal(eager.view(torch.int16), whole.view(torch.int16))


def test_fp32_storage_and_masters_take_the_fp32_value():
    w = torch.full((1000,), 0.5)
    shard = ParamShard("w", (1000,), 0, w)
    update([shard], [Term(1e-9, seed=3)], rounding=rounding_seed(3))
    z = noise.gaussian(3, shard.key, 0, 1000, 1000)
    assert torch.equal(w, torch.full((1000,), 0.5) + z * 1e-9)
    low = torch.full((1000,), 0.5, dtype=torch.bfloat16)
    master = ParamShard("w", (1000,), 0, low, master=low.float())
    update([master], [Term(1e-4, seed=3)], rounding=rounding_seed(3))
    assert torch.equal(master.master, torch.full((1000,), 0.5) + z * 1e-4)
    assert torch.equal(low, master.master.to(torch.bfloat16))  # round-to-nearest of the master


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_every_16_bit_value_rounds_to_itself_or_its_neighbour_towards_v(dtype):
    """All finite 16-bit values h, v a fraction of the gap to each neighbour away: the result
    is h or that neighbour (by its 16-bit pattern, signed zeros included), and the neighbour
    is taken exactly when the uniform draw is below (v - h) / (n - h)."""
    from pipeline.zo.rounding import INV_24, stochastic_round

    low = LOW[dtype]
    pats = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    h16 = pats.view(low)
    keep = torch.isfinite(h16.float())
    pats, h16 = pats[keep], h16[keep]
    gen = torch.Generator().manual_seed(0)
    for step in (1, -1):  # the neighbour one magnitude step away from / towards zero
        nb = pats.to(torch.int32) + step  # (a negative int16 pattern is -2^15 + magnitude)
        ok = (nb >= -(1 << 15)) & (nb < (1 << 15)) & (pats.to(torch.int32) & 0x7FFF != 0)
        n16 = nb[ok].to(torch.int16).view(low)
        h = h16[ok].float()
        n = n16.float()
        finite = torch.isfinite(n)
        h, n, n16, hp = h[finite], n[finite], n16[finite], pats[ok][finite]
        for frac in (0.01, 0.25, 0.49):
            v = h + frac * (n - h)
            assert torch.equal(v.to(low).float(), h)  # h is v's round-to-nearest value
            bits = torch.randint(-(1 << 31), (1 << 31) - 1, v.shape, dtype=torch.int32,
                                 generator=gen)
            got = stochastic_round(v, bits, low).to(low).view(torch.int16)
            u = ((bits >> 8) & 0xFFFFFF).float() * INV_24
            want = torch.where(u < (v - h) / (n - h), n16.view(torch.int16), hp)
            assert torch.equal(got, want)
