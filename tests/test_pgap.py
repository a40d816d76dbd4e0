"""P-GAP (projected gradient-aligned perturbations): the aligned core, the sharded range finder,
the refresh, the update, the estimator against autograd, restore, replay and resume."""

import json
import math
import sys
import threading

import pytest
import torch
from conftest import record_reductions

from pipeline.config import MethodConfig
from pipeline.models.objective import batch_loss
from pipeline.parallel import trainable_names
from pipeline.parallel.single import SingleBackend
from pipeline.zo.methods import METHODS, StepContext
from pipeline.zo.methods.mezo import MeZO
from pipeline.zo.methods.pgap import (
    PGAP,
    aligned_core,
    chunk_rows,
    needed_rows,
    owned_rows,
    row_pieces,
    step_sign,
)
from pipeline.zo.noise import gaussian
from pipeline.zo.noise_cache import NoiseCache
from pipeline.zo.perturbation import Perturbation
from pipeline.zo.range_finder import _orth, sharded_svd, slice_rows
from pipeline.zo.seeds import name_key


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _restore(model, saved):
    for n, p in model.named_parameters():
        p.data.copy_(saved[n])


def _setup(model, patterns=("*",), master=True, **method):
    backend = SingleBackend(model, trainable_names(model, list(patterns)), "cpu", master=master)
    return backend, PGAP(MethodConfig(name="pgap", **method), backend.shards())


def _dense(method, shard, seed):
    out = torch.empty(shard.numel)
    for off, piece in method.direction(shard, seed):
        out[off : off + piece.numel()] = piece
    return out.double()


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def _gradient(model, names, batch):
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    grads = torch.autograd.grad(batch_loss(model, batch), [params[n] for n in names])
    for n in names:
        params[n].requires_grad_(False)
    return torch.cat([g.reshape(-1).double() for g in grads])


# -- the aligned core (P1) ----------------------------------------------------------------------

@pytest.mark.parametrize(("r", "xi", "delta"), [(1, 1.0, 2.0), (5, -1.0, 2.0), (16, 1.0, 0.5)])
def test_aligned_core_has_the_prescribed_projection(r, xi, delta):
    gen = torch.Generator().manual_seed(r)
    zhat = torch.randn(r, r, generator=gen, dtype=torch.float64)
    s = torch.rand(r, generator=gen, dtype=torch.float64).sort(descending=True).values * 10
    z = aligned_core(zhat, s, xi, delta)
    inner = (torch.diag(s) * z).sum().item()  # ⟨S̃, Z⟩, S̃ = diag(S)
    assert inner == pytest.approx(xi * math.sqrt(delta) * s.norm().item(), rel=1e-13, abs=1e-13)
    off = ~torch.eye(r, dtype=torch.bool)
    assert torch.equal(z[off], zhat[off])  # only the S̃ component of Ẑ changes
    # Ẑ - Z is along S̃ (a multiple of diag(S))
    d = (zhat - z).diagonal()
    torch.testing.assert_close(d, s * (d @ s) / (s @ s), rtol=1e-12, atol=1e-12)


def test_step_direction_has_the_aligned_projection_on_the_factors(tiny_model, tiny_batch):
    """From the dense Δ of a step: ⟨S̃, Uᵀ Δ V⟩ = ξ√δ‖S̃‖ per weight (fp32 direction)."""
    backend, pgap = _setup(tiny_model, pgap_rank=4, pgap_delta=2.0)
    pgap.step(StepContext(0, 0, 0.0, tiny_batch, backend))
    signs = set()
    for seed in (11, 12, 13, 14):
        pgap.set_cores(seed)
        signs.add(step_sign(seed))
        for shard in pgap.shards:
            if shard.name not in pgap.factors:
                continue
            u, s, v = pgap.factors[shard.name]
            delta = _dense(pgap, shard, seed).view(shard.shape)
            core = u.double().T @ delta @ v.double()
            want = step_sign(seed) * math.sqrt(2.0) * s.norm().item()
            assert (torch.diag(s) * core).sum().item() == pytest.approx(want, rel=1e-4)
    assert signs == {1.0, -1.0}


# -- the sharded range finder (R3) --------------------------------------------------------------

def _ranks_svd(matrix, cuts, rank, power_iters):
    """``sharded_svd`` on simulated ranks (threads) holding the flat pieces of ``matrix``
    between ``cuts``; the reduce sums the ranks' tensors in rank order."""
    flat, bounds = matrix.reshape(-1), [0, *cuts, matrix.numel()]
    n = len(bounds) - 1
    barrier, slots, results = threading.Barrier(n), [None] * n, [None] * n

    def reduce(i):
        def f(t):
            slots[i] = t.to(torch.float64)
            barrier.wait()
            total = slots[0].clone()
            for part in slots[1:]:
                total += part
            barrier.wait()
            return total
        return f

    def work(i):
        a, b = bounds[i], bounds[i + 1]
        shape = tuple(matrix.shape)
        results[i] = sharded_svd(slice_rows(flat[a:b], shape, a), shape, a, b - a, rank, 7, 3,
                                 reduce(i), power_iters=power_iters)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_range_finder_on_flat_slices_equals_the_whole_and_is_replicated():
    torch.manual_seed(0)
    # a decaying spectrum: rank 4 plus small noise, 9 x 13, slices crossing rows
    g = (torch.randn(9, 4) @ torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0])) @ torch.randn(4, 13)
         + 0.01 * torch.randn(9, 13))
    (whole,) = _ranks_svd(g, [], 3, 1)
    ranks = _ranks_svd(g, [20, 21, 77], 3, 1)
    for part in ranks[1:]:  # bitwise the same factors on every rank
        assert all(torch.equal(a, b) for a, b in zip(part, ranks[0]))
    for a, b in zip(ranks[0], whole):  # the whole matrix's, to float64 reduction rounding
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    u, s, v = whole
    exact = torch.linalg.svdvals(g.double())
    torch.testing.assert_close(s, exact[:3], rtol=1e-3, atol=0)
    torch.testing.assert_close(u.T @ u, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    err = (g.double() - u @ torch.diag(s) @ v.T).norm() / exact[3:].norm()
    assert err < 1.01  # the best rank-3 error (Eckart-Young), up to the range finder's slack


def test_range_finder_reading_g_in_small_row_blocks_gives_the_same_factors(monkeypatch):
    """The products read ``G`` block by block (about ``BLOCK`` elements each): blocks of one or
    two rows, across slices that cut rows, give the one-block factors to float64 rounding."""
    from pipeline.zo import range_finder

    torch.manual_seed(2)
    g = torch.randn(9, 4) @ torch.randn(4, 13) + 0.01 * torch.randn(9, 13)
    whole = _ranks_svd(g, [20, 77], 3, 1)[0]
    asked = []
    original = range_finder.slice_rows

    def recording(values, shape, start):
        rows = original(values, shape, start)
        return lambda a, b: asked.append(b - a) or rows(a, b)

    monkeypatch.setattr(range_finder, "BLOCK", 20)  # 20 // 13: one row per block
    monkeypatch.setattr(sys.modules[__name__], "slice_rows", recording)
    blocked = _ranks_svd(g, [20, 77], 3, 1)[0]
    assert asked and max(asked) == 1
    for a, b in zip(blocked, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_range_finder_with_full_rank_is_the_exact_svd():
    torch.manual_seed(1)
    g = torch.randn(6, 10)
    u, s, v = sharded_svd(slice_rows(g.reshape(-1), (6, 10), 0), (6, 10), 0, 60, 128, 1, 2,
                          lambda t: t, power_iters=0)
    assert u.shape == (6, 6) and v.shape == (10, 6)  # rank capped by the dims
    torch.testing.assert_close(s, torch.linalg.svdvals(g.double()), rtol=1e-12, atol=0)
    torch.testing.assert_close(u @ torch.diag(s) @ v.T, g.double(), rtol=0, atol=1e-6)


def test_orth_overwrites_a_column_major_input_and_keeps_the_span():
    torch.manual_seed(2)
    y = torch.randn(3, 50, dtype=torch.float64).T  # column-major (50, 3)
    before, ptr = y.clone(), y.data_ptr()
    q = _orth(y)
    assert q.data_ptr() == ptr  # Householder QR in place: no second (out, k) matrix
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(q @ (q.T @ before), before, rtol=0, atol=1e-12)
    assert torch.equal(_orth(before.clone()), q)  # a row-major copy: the same Q, bitwise


def test_range_finder_returns_only_the_asked_rows_of_u_in_the_asked_dtype():
    torch.manual_seed(3)
    g = torch.randn(300, 40)
    args = (slice_rows(g.reshape(-1), (300, 40), 0), (300, 40), 0, 12000, 8, 1, 2, lambda t: t)
    u, s, v = sharded_svd(*args, power_iters=1)
    part, s2, v2 = sharded_svd(*args, power_iters=1, u_rows=(17, 250), u_dtype=torch.bfloat16)
    assert u.dtype == torch.float64 and part.dtype == torch.bfloat16 and part.shape == (233, 8)
    assert torch.equal(part, u[17:250].to(torch.bfloat16)) and torch.equal(s, s2)
    assert torch.equal(v, v2)


# -- the refresh and the step -------------------------------------------------------------------

def test_refresh_fits_the_svd_of_the_mean_probe_estimate(tiny_model, tiny_batch):
    """R1-R3: Ĝ = (1/q) Σ c_j z_j from the probes' central differences, then its SVD."""
    name = "model.layers.0.mlp.down_proj.weight"  # (32, 48): rank 32 = the exact SVD
    backend, pgap = _setup(tiny_model, [name, "model.norm.weight"], pgap_q=3, eps=1e-3)
    before = _params(tiny_model)
    stats = pgap.step(StepContext(5, 2, 0.0, tiny_batch, backend))
    assert stats.forwards == 2 + 2 * 3 and pgap.refreshed_at == 5
    seeds, grads = stats.seeds[1:], stats.extra["probe_grads"]
    assert len(seeds) == 3 == len(grads)
    for seed, c in zip(seeds, grads):  # each c_j is the two-sided difference along z_j
        loss = {}
        for sign in (1, -1):
            _restore(tiny_model, before)
            for shard in backend.shards():
                shard.local.add_(sign * 1e-3 * gaussian(seed, shard.key, 0, shard.numel))
            loss[sign] = batch_loss(tiny_model, tiny_batch).item()
        assert c == pytest.approx((loss[1] - loss[-1]) / 2e-3, rel=1e-3, abs=1e-4)
    _restore(tiny_model, before)
    shard = backend.shards()[0]
    g = sum(c * gaussian(s, shard.key, 0, shard.numel).double() for s, c in zip(seeds, grads))
    g = (g / 3).view(32, 48)
    u, s, v = pgap.factors[name]
    assert set(pgap.factors) == {name} and u.shape == (32, 32) and v.shape == (48, 32)
    torch.testing.assert_close(s, torch.linalg.svdvals(g), rtol=1e-5, atol=0)
    torch.testing.assert_close((u.double() * s) @ v.double().T, g, rtol=0, atol=1e-5)


def test_update_is_minus_lr_c_delta(tiny_model, tiny_batch):
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"]
    backend, pgap = _setup(tiny_model, names, pgap_rank=3)
    pgap.step(StepContext(0, 0, 0.0, tiny_batch, backend))
    q, norm = backend.shards()
    before = [s.master.clone().double() for s in (q, norm)]
    lr = 1e-2
    stats = pgap.step(StepContext(1, 0, lr, tiny_batch, backend))
    assert stats.forwards == 2 and len(stats.seeds) == 1 and "probe_grads" not in stats.extra
    (c,), seed = stats.projected_grad, stats.seeds[0]
    u, s, v = pgap.factors[q.name]
    zhat = gaussian(seed, name_key(q.name + "::pgap.Z"), 0, 9).view(3, 3)
    z = aligned_core(zhat, s, step_sign(seed), 2.0)
    delta = (u.double() @ z @ v.double().T).reshape(-1)
    torch.testing.assert_close(q.master.double(), before[0] - lr * c * delta, rtol=0, atol=1e-7)
    zn = gaussian(seed, norm.key, 0, norm.numel).double()
    torch.testing.assert_close(norm.master.double(), before[1] - lr * c * zn, rtol=0, atol=1e-7)
    assert torch.equal(q.local, q.master)


@pytest.mark.parametrize(("shape", "cuts"), [((7, 5), [11, 12]), ((9000, 40), [1, 170_001])])
def test_sharded_direction_equals_slices_of_the_whole_bitwise(shape, cuts):
    """Row chunks on a global grid: any flat slice of (U Z) Vᵀ equals the whole's slice."""
    torch.manual_seed(0)
    a, b = torch.randn(shape[0], 3), torch.randn(shape[1], 3)
    n = shape[0] * shape[1]
    whole = torch.empty(n)
    for off, piece in row_pieces(a, b, 0, n):
        whole[off : off + piece.numel()] = piece
    torch.testing.assert_close(whole.view(shape), a @ b.T)
    bounds = [0, *cuts, n]
    for lo, hi in zip(bounds, bounds[1:]):
        got = torch.empty(hi - lo)
        for off, piece in row_pieces(a, b, lo, hi - lo):
            got[off : off + piece.numel()] = piece
        assert torch.equal(got, whole[lo:hi])


def test_refreshes_every_t_steps_and_lr_zero_restores_bitwise(tiny_model, tiny_batch):
    assert METHODS["pgap"] is PGAP
    backend, pgap = _setup(tiny_model, pgap_refresh_every=3, pgap_q=2)
    before = _params(tiny_model)
    forwards = [pgap.step(StepContext(t, 0, 0.0, tiny_batch, backend)).forwards
                for t in range(7)]
    assert forwards == [6, 2, 2, 6, 2, 2, 6] and pgap.refreshed_at == 6
    after = _params(tiny_model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_a_step_communicates_the_losses_and_a_refresh_thin_products(tiny_model, tiny_batch):
    name = "model.layers.0.mlp.down_proj.weight"  # (32, 48), rank 4: k = 14
    backend, pgap = _setup(tiny_model, [name, "model.norm.weight"], pgap_rank=4, pgap_q=3,
                           pgap_power_iters=1)
    sizes = record_reductions(backend)
    pgap.step(StepContext(0, 0, 1e-3, tiny_batch, backend))
    assert sizes == [6, 32 * 14, 48 * 14, 32 * 14, 48 * 14, 2]
    sizes.clear()
    pgap.step(StepContext(1, 0, 1e-3, tiny_batch, backend))
    assert sizes == [2]


def test_non_finite_loss_skips_and_keeps_the_weights(tiny_model, tiny_batch):
    backend, pgap = _setup(tiny_model, ["*.mlp.*"], pgap_q=2)
    tiny_model.model.norm.weight.fill_(float("nan"))
    before = _params(tiny_model)
    stats = pgap.step(StepContext(0, 0, 1e-3, tiny_batch, backend))
    assert stats.skipped and math.isnan(stats.loss) and stats.forwards == 4
    assert pgap.refresh_due(1) and not pgap.factors  # the refresh is retried
    after = _params(tiny_model)
    assert all(torch.equal(before[n], after[n]) or n == "model.norm.weight" for n in before)


# -- the estimator against autograd -------------------------------------------------------------

def test_single_estimate_cosine_beats_mezo_after_a_refresh(tiny_model, tiny_batch):
    """After a refresh, one P-GAP estimate c Δ and one two-sided MeZO estimate c z (2 forwards
    each, weights held by lr 0): mean cosine to the autograd gradient over 3 refreshes (run
    seeds) of 15 steps each. Rank 4 (the tiny model's weights are 32-64 wide; r = 128 would be
    the whole matrix space). The gain grows with the refresh's quality: with q = 100 probes,
    measured P-GAP 0.022 ± 0.002 against MeZO 0.007. With the paper's q = 10 it is within the
    noise on this model (6 refreshes: 0.0065 vs 0.0063, standard error 0.0005); an earlier
    version of this test passed at q = 10 on one lucky refresh."""
    ours, theirs = [], []
    for run_seed in range(3):
        backend, pgap = _setup(tiny_model, pgap_rank=4, pgap_q=100, pgap_refresh_every=10**6)
        mezo = MeZO(MethodConfig(name="mezo", two_sided=True), backend.shards())
        grad = _gradient(tiny_model, [s.name for s in pgap.shards], tiny_batch)
        for step in range(15):
            stats = pgap.step(StepContext(step, run_seed, 0.0, tiny_batch, backend))
            pgap.set_cores(stats.seeds[0])
            delta = torch.cat([_dense(pgap, s, stats.seeds[0]) for s in pgap.shards])
            ours.append(_cos(stats.projected_grad[0] * delta, grad))
            stats = mezo.step(StepContext(step, run_seed, 0.0, tiny_batch, backend))
            assert stats.forwards == 2
            z = torch.cat([gaussian(stats.seeds[0], s.key, 0, s.numel)
                           for s in backend.shards()])
            theirs.append(_cos(stats.projected_grad[0] * z.double(), grad))
    p, m = sum(ours) / len(ours), sum(theirs) / len(theirs)
    spread = torch.tensor(ours).std().item() / len(ours) ** 0.5
    assert p - m > 3 * spread, (p, m, spread)


# -- replay and resume --------------------------------------------------------------------------

def _record(step, stats, lr):
    return json.loads(json.dumps({"step": step + 1, "seeds": stats.seeds,
                                  "projected_grad": stats.projected_grad, "lr": lr,
                                  "skipped": stats.skipped, **stats.extra}))


@pytest.mark.parametrize("master", [True, False])
def test_replay_equals_the_run_bitwise(tiny_model, tiny_batch, master):
    initial = _params(tiny_model)
    opts = dict(pgap_refresh_every=2, pgap_q=2, pgap_rank=3, weight_decay=0.1)
    backend, pgap = _setup(tiny_model, master=master, **opts)
    records = [_record(t, pgap.step(StepContext(t, 3, 1e-2, tiny_batch, backend)), 1e-2)
               for t in range(4)]
    trained = _params(tiny_model)
    _restore(tiny_model, initial)
    _, replayer = _setup(tiny_model, master=master, **opts)
    for record in records:
        replayer.replay(record)
    replayed = _params(tiny_model)
    assert all(torch.equal(trained[n], replayed[n]) for n in trained)
    assert any(not torch.equal(trained[n], initial[n]) for n in trained)
    assert replayer.refreshed_at == pgap.refreshed_at == 2


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_checkpoint_resume_is_bitwise(tiny_job, tmp_path, dtype):
    """A run stopped at step 3 (checkpoint with the factors of the step-2 refresh) and resumed
    equals the uninterrupted run: losses and weights bitwise, through the real checkpoints (bf16:
    no master, the factors and the saved rows of U in bf16)."""
    from safetensors.torch import load_file

    from pipeline import checkpoint
    from pipeline.config import load_config
    from pipeline.metrics import read_jsonl
    from pipeline.train import run

    common = [*tiny_job, "method.name=pgap", "method.pgap_refresh_every=2", "method.pgap_q=2",
              "method.pgap_rank=4", "tracking.enabled=false", "checkpoint.every=3",
              "train.eval_zero_shot=false", f"model.dtype={dtype}"]
    run(load_config("jobs/demo.yaml", [*common, "train.steps=5"]), tmp_path / "a",
        progress=False)
    run(load_config("jobs/demo.yaml", [*common, "train.steps=3"]), tmp_path / "b",
        progress=False)
    saved = torch.load(checkpoint.latest(tmp_path / "b")[1] / "method.pt", weights_only=True)
    assert saved["refreshed_at"] == 2 and saved["factors"]
    want = torch.bfloat16 if dtype == "bf16" else torch.float32
    assert {f["V"].dtype for f in saved["factors"].values()} == {want}
    run(load_config("jobs/demo.yaml", [*common, "train.steps=5"]), tmp_path / "b",
        progress=False)

    def losses(d):
        return [r["loss"] for r in read_jsonl(d / "metrics.jsonl") if "loss" in r]

    assert len(losses(tmp_path / "a")) == 5 and losses(tmp_path / "a") == losses(tmp_path / "b")
    a, b = (load_file(str(checkpoint.latest(d)[1] / "shards-rank0.safetensors"))
            for d in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("dtype", "master", "want"), [
    (torch.float32, False, torch.float32), (torch.bfloat16, False, torch.bfloat16),
    (torch.float16, False, torch.float16), (torch.bfloat16, True, torch.float32)])
def test_factors_are_kept_in_the_dtype_updates_land_in(tiny_model, tiny_batch, dtype, master,
                                                        want):
    """U and V in the 16-bit storage dtype without a master (half of fp32's bytes), fp32 with
    one; Δ is formed in fp32 from the stored factors, and keeps the aligned projection to the
    precision of the factors' rounding."""
    tiny_model.to(dtype)
    backend, pgap = _setup(tiny_model, master=master, pgap_rank=4, pgap_q=2)
    pgap.step(StepContext(0, 0, 0.0, tiny_batch, backend))
    assert pgap.factors
    seed = 21
    pgap.set_cores(seed)
    rel = 1e-4 if want == torch.float32 else 5e-2
    for shard in pgap.shards:
        if shard.name not in pgap.factors:
            continue
        u, s, v = pgap.factors[shard.name]
        assert u.dtype == v.dtype == want and s.dtype == torch.float64
        delta = _dense(pgap, shard, seed).view(shard.shape)
        core = pgap._cores[shard.name]
        torch.testing.assert_close(delta, (u.double() @ core.double() @ v.double().T),
                                   rtol=1e-5, atol=1e-6)
        projected = (torch.diag(s) * (u.double().T @ delta @ v.double())).sum().item()
        want_projection = step_sign(seed) * math.sqrt(pgap.cfg.pgap_delta) * s.norm().item()
        assert projected == pytest.approx(want_projection, rel=rel)


@pytest.mark.parametrize("world", [2, 3, 8])
def test_u_rows_are_sharded_like_the_weight(world):
    """A rank keeps the rows of U its slice needs (whole chunks of the direction's row grid),
    about out / W plus a chunk at each end; the rows whose first element a rank holds tile U."""
    out, inner = 13824, 5120  # a 13B MLP weight: chunks of 51 rows
    total = out * inner
    part = -(-total // world)  # ZeRO-3's flat partitions: slices start anywhere in a row
    chunk = chunk_rows(inner)
    owned = []
    for rank in range(world):
        start = min(rank * part, total)
        numel = max(0, min(part, total - start))
        lo, hi = needed_rows((out, inner), start, numel)
        assert lo <= start // inner and hi >= -(-(start + numel) // inner)  # covers the slice
        assert hi - lo <= out / world + 2 * chunk
        owned.append(owned_rows((out, inner), start, numel))
    assert owned[0][0] == 0 and owned[-1][1] == out
    assert all(a[1] == b[0] for a, b in zip(owned, owned[1:]))


@pytest.mark.parametrize("kind, cached", [("gaussian", True), ("rademacher", False),
                                          ("rademacher", True)])
def test_estimate_and_vector_directions_use_the_probes_noise(tiny_model, kind, cached):
    """Ĝ (R2) and the vector parameters' directions (P2) are built from the very ``z`` the probe
    forwards moved the weights by: the shard's noise kind, from its cache when it has one."""
    names = ["model.layers.0.mlp.down_proj.weight", "model.norm.weight"]
    backend, pgap = _setup(tiny_model, names, pgap_q=2, eps=1e-3)
    cache = NoiseCache(2) if cached else None
    for shard in backend.shards():
        shard.noise, shard.cache = kind, cache
    seeds, grads = [11, 12], [0.5, -0.25]

    def probe(shard, seed):  # what a probe forward at θ + 1·z sees, minus θ
        out = torch.empty(shard.numel)
        Perturbation.dense(seed, 1.0).write(shard, out)
        return out.double() - shard.local.double()

    matrix, vector = backend.shards()
    expect = sum(c / 2 * probe(matrix, s) for s, c in zip(seeds, grads))
    torch.testing.assert_close(pgap.estimate(matrix, seeds, grads).double(), expect,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(_dense(pgap, vector, seeds[0]), probe(vector, seeds[0]),
                               rtol=0, atol=1e-5)
    if kind == "rademacher":  # ±1: not the default Gaussian
        assert set(_dense(pgap, vector, seeds[0]).abs().tolist()) == {1.0}
