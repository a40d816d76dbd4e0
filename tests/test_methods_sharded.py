"""BSZO, ZO-Adam, LOZO and P-GAP on 2 gloo ranks (FSDP2 and ZeRO-3) against one process.

Every run takes the same global batch (8 examples, 4 per rank). The ranks' losses are the
float64 mean of their halves' fp32 means, so they differ from the single process's fp32 mean of
the whole batch by fp32 rounding (~1e-7 of a loss ~11), which the 1/(2ε) of a projected gradient
magnifies to ~1e-4. The ranks run tests/workers/method_steps.py (and count_collectives.py for
BSZO's communication).
"""


import pytest
import torch
from conftest import count_step_collectives, run_method_ranks

pytestmark = pytest.mark.slow
BACKENDS = ["fsdp", "zero3"]
STEPS = 3
METHOD = {
    "bszo": ["method.name=bszo"],
    "zo_adam": ["method.name=zo_adam"],
    "lozo": ["method.name=lozo", "method.lozo_nu=2"],
    # refreshes at steps 0 and 2, between them an update moves the weights
    "pgap": ["method.name=pgap", "method.pgap_refresh_every=2", "method.pgap_q=2",
             "method.pgap_rank=4"],
}


@pytest.fixture(scope="module")
def small(tiny_model_dir):
    return [f"model.name_or_path={tiny_model_dir}", "data.n_train=64", "data.n_val=16",
            "data.n_test=32", "train.batch_size=8", "method.lr=1e-3"]


@pytest.fixture(scope="module")
def single(small, tmp_path_factory):
    """One-process records per method, shared by the backends' tests."""
    cache = {}

    def get(method):
        if method not in cache:
            out = tmp_path_factory.mktemp(f"single-{method}")
            (cache[method],) = run_method_ranks(out, 1, "single", "jobs/demo.yaml",
                                                [*small, *METHOD[method]], STEPS)
        return cache[method]

    return get


def _ranks(method, backend, small, tmp_path):
    r0, r1 = run_method_ranks(tmp_path, 2, backend, "jobs/demo.yaml",
                              [*small, *METHOD[method]], STEPS)
    assert r0["loss"] == r1["loss"] and r0["grad"] == r1["grad"]  # the same scalars everywhere
    return r0, r1


def _tracks(ranks, one, grad_tol=1e-3):
    assert len(ranks["loss"]) == STEPS
    assert max(abs(x - y) for x, y in zip(ranks["loss"], one["loss"])) < 1e-6
    diffs = [abs(a - b) for x, y in zip(ranks["grad"], one["grad"]) for a, b in zip(x, y)]
    assert max(diffs) < grad_tol, diffs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["zo_adam", "lozo"])
def test_baselines_track_one_process(method, backend, small, single, tmp_path):
    r0, _ = _ranks(method, backend, small, tmp_path)
    _tracks(r0, single(method))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bszo_posterior_bitwise_on_both_ranks_and_tracks_one_process(backend, small, single,
                                                                     tmp_path):
    r0, r1 = _ranks("bszo", backend, small, tmp_path)
    one = single("bszo")
    assert len(r0["posterior"]) == STEPS
    for (mu0, cov0, n0), (mu1, cov1, n1), (mu, cov, n) in zip(r0["posterior"], r1["posterior"],
                                                             one["posterior"]):
        assert torch.equal(mu0, mu1) and torch.equal(cov0, cov1) and n0 == n1
        # μ is a gain times the observations (same tolerance as the projected gradients)
        assert (mu0 - mu).abs().max().item() < 1e-3 * max(1.0, mu.abs().max().item())
        torch.testing.assert_close(cov0, cov, rtol=1e-3, atol=0)
        assert n0 == pytest.approx(n, rel=1e-3)  # the persistent noise EMA
    _tracks(r0, one)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
def test_bszo_communicates_at_most_k_plus_1_scalars_per_step(backend, fused, small, tmp_path):
    record = count_step_collectives(tmp_path / "calls.json", backend,
                                    [*small, *METHOD["bszo"], "method.bszo_k=2",
                                     f"train.fused_evaluations={str(fused).lower()}"])
    # Alg. 1 (m = k + 1): L0 and the k axis losses in one all-gather of k + 1 = 3 scalars, and
    # nothing else beyond the 3 forwards' parameter gathers (fused: ONE forward's gathers)
    assert record["forwards"] == 3
    assert len(record["missing"]) == (2 * len(record["forward"]) if fused else 0)
    assert record["extra"] == [{"op": "all_gather", "numel": 3, "bytes": 24}]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pgap_factors_sharded_by_rows_bitwise_across_ranks_and_track_one_process(
        backend, small, single, tmp_path):
    r0, r1 = _ranks("pgap", backend, small, tmp_path)
    one = single("pgap")
    assert r0["refreshed_at"] == r1["refreshed_at"] == one["refreshed_at"] == 2
    f0, f1, f = r0["factors"], r1["factors"], one["factors"]
    assert f0 and set(f0) == set(f1) == set(f)
    for name in f:
        (u0, s0, v0), (u1, s1, v1), (u, s, v) = f0[name], f1[name], f[name]
        assert torch.equal(s0, s1) and torch.equal(v0, v1)  # S and V: bitwise replicated
        # U: each rank keeps only the rows its slice needs; together they cover U, and a row
        # two ranks hold is bitwise the same on both
        a0, a1 = r0["row0"][name], r1["row0"][name]
        assert a0 == 0 and a0 + len(u0) >= a1 and a1 + len(u1) == len(u)
        both = slice(a1, a0 + len(u0))
        assert torch.equal(u0[both], u1[both.start - a1 : both.stop - a1])
        whole = torch.cat([u0, u1[a0 + len(u0) - a1 :]])
        # the same truncated SVD of Ĝ: U S Vᵀ to the rounding of the probes' c_j (fp32 loss
        # reductions, magnified by 1/2ε and by the singular-value gaps; measured ~3e-5)
        low0, low = (whole.double() * s0) @ v0.double().T, (u.double() * s) @ v.double().T
        assert ((low0 - low).norm() / low.norm()).item() < 1e-3, name
    _tracks(r0, one)
