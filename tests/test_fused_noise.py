"""The fused counter-based noise: compiled kernel vs eager reference, slices, moments, cache."""

import os
import subprocess
import sys

import pytest
import torch

from pipeline.config import MethodConfig
from pipeline.parallel import trainable_names
from pipeline.parallel.single import SingleBackend
from pipeline.zo import noise, noise_aot, noise_compile, noise_math
from pipeline.zo.methods import StepContext
from pipeline.zo.methods.bszo import BSZO
from pipeline.zo.methods.mezo import MeZO
from pipeline.zo.noise_cache import NoiseCache

TOTAL = 3 * noise.BLOCK // 2 + 7  # above COMPILE_MIN: the compiled path


def _reference(kind, seed, key, start, n):
    out = torch.zeros(n)
    k = torch.tensor(noise.key_words(seed, key), dtype=torch.int32)
    noise_math.REFERENCE[kind](out, out, torch.tensor(start, dtype=torch.int32), k,
                               torch.tensor([1.0, 1.0, 0.0]))
    return out


def test_the_compiled_kernel_is_used_and_matches_the_eager_reference():
    assert noise.uses_compiled(TOTAL)  # a C++ compiler is present here: the real fused path
    for kind in noise.KINDS:
        fused = noise.noise(3, 9, 1000, 50_001, TOTAL, kind=kind)
        ref = _reference(kind, 3, 9, 1000, 50_001)
        if kind == "rademacher":  # integer hash, exact conversion: bitwise
            assert torch.equal(fused, ref)
        else:  # inductor's vectorised log/cos vs ATen's: stated tolerance, about 1 ulp of |z|<6
            assert (fused - ref).abs().max().item() <= 1e-6
            assert (fused == ref).float().mean().item() > 0.3


@pytest.mark.parametrize("compiled", [True, False])
def test_any_slice_is_bitwise_the_slice_of_the_whole(monkeypatch, compiled):
    if not compiled:
        monkeypatch.setattr(noise, "COMPILE_MIN", 1 << 40)
    assert noise.uses_compiled(TOTAL) == compiled
    for kind in noise.KINDS:
        whole = noise.noise(7, 11, 0, TOTAL, kind=kind)
        cuts = [(0, 1), (1, 1), (TOTAL - 1, 1), (5, 2), (6, 3), (noise.BLOCK - 3, 7),
                (12345, 100_001), (TOTAL - 17, 17)]
        for a, n in cuts:
            assert torch.equal(noise.noise(7, 11, a, n, TOTAL, kind=kind), whole[a : a + n])
            buf = torch.zeros(n + 3)[3:]  # a view at an odd storage offset, as shards are
            noise.apply(buf, buf, 7, 11, a, TOTAL, 1.0, kind=kind)
            assert torch.equal(buf, whole[a : a + n])
        pieces = torch.cat([z for _, z in noise.iter_blocks(7, 11, 99, TOTAL - 99, TOTAL,
                                                            kind=kind)])
        assert torch.equal(pieces, whole[99:])


def test_the_fused_pass_is_the_fp32_arithmetic_on_the_noise():
    z = noise.gaussian(5, 6, 0, TOTAL)
    src = torch.randn(TOTAL, generator=torch.Generator().manual_seed(0))
    a, s, b = 1e-3, 0.999, -2.5e-4
    dst = src.clone()
    noise.apply(dst, dst, 5, 6, 0, TOTAL, a, s, b)
    t = [torch.tensor(v, dtype=torch.float32) for v in (a, s, b)]
    assert torch.equal(dst, (src + z * t[0]) * t[1] + z * t[2])
    low = torch.empty(TOTAL, dtype=torch.bfloat16)  # masters: cast(master + a z)
    noise.apply(low, src, 5, 6, 0, TOTAL, a)
    assert torch.equal(low, (src + z * t[0]).to(torch.bfloat16))


def test_moments_tails_and_independence():
    n = 1 << 21
    z = noise.gaussian(1, 2, 0, n).double()
    assert abs(z.mean()) < 3e-3 and abs(z.var() - 1) < 4e-3
    assert abs((z**4).mean() - 3) < 0.03  # kurtosis of a normal
    tail = (z.abs() > 3).double().mean().item()
    assert 0.0023 < tail < 0.0031  # P(|z| > 3) = 0.0027
    assert 4.5 < z.abs().max() <= 5.8  # Box-Muller with 24-bit uniforms: |z| <= 5.77
    even, odd = z[0::2], z[1::2]  # the two outputs of each Box-Muller pair
    assert abs((even * odd).mean()) < 3e-3
    assert abs((z * noise.gaussian(2, 2, 0, n).double()).mean()) < 3e-3
    assert abs((z * noise.gaussian(1, 3, 0, n).double()).mean()) < 3e-3
    r = noise.noise(1, 2, 0, n, kind="rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(r.double().mean()) < 3e-3 and abs((r[0::2] * r[1::2]).double().mean()) < 3e-3


def test_one_compiled_kernel_serves_every_size_offset_seed_and_scale():
    noise.noise(0, 0, 0, 100, TOTAL)  # warm: builds or loads the fp32 package
    kernel = noise_compile.kernel("gaussian", torch.device("cpu"))
    packages = sorted(noise_aot.kernel_dir().glob("*.pt2"))
    loaded = dict(kernel._runners)
    for i, n in enumerate([2, 3, 17, 64, 1000, 4097, 70_000]):
        buf = torch.zeros(n + i)[i:]
        noise.apply(buf, buf, 1000 + i, 7 * i, 31 * i, TOTAL, 0.1 * i, 1.0, 0.5)
    assert kernel._runners == loaded and sorted(noise_aot.kernel_dir().glob("*.pt2")) == packages


def test_the_cpu_kernels_run_on_the_threads_the_run_sets_with_the_same_values():
    """The AOT kernel's loop is an OpenMP parallel region sized at run time (a kernel built
    serial ran on one core of a 2-thread run: MeZO's three noise passes took twice the time),
    and the values do not depend on the thread count."""
    import zipfile

    n = 1 << 20
    outs = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            w = torch.zeros(n)
            noise.apply(w, w, 5, 6, 11, n + 11, 0.0, 1.0, 1.0)
            h = torch.linspace(-1, 1, n).to(torch.bfloat16)
            noise.apply(h, h, 5, 6, 0, n, 0.0, 1.0, 1e-3, rounding=8)
            outs.append((w, h))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    f32, bf16, i32 = torch.float32, torch.bfloat16, torch.int32
    for kind, dtypes in [("gaussian", (f32, f32, i32, i32, f32)),
                         ("gaussian_sr", (bf16, bf16, i32, i32, i32, f32))]:
        path = noise_aot.package_path(kind, dtypes)
        with zipfile.ZipFile(path) as package:
            code = "".join(package.read(name).decode() for name in package.namelist()
                           if name.endswith("kernel.cpp"))
        assert "#pragma omp parallel\n" in code or "#pragma omp parallel\r" in code, kind


def test_the_compiled_cpu_path_keeps_the_compiler_out_of_the_process():
    """The kernels are built in a subprocess and loaded by AOTInductor's C++ loader: the
    training process never imports dynamo or inductor (about 155 MiB resident)."""
    code = ("import sys, torch\n"
            "from pipeline.zo import noise\n"
            "z = noise.gaussian(1, 2, 3, 1 << 17, 1 << 18)\n"
            "assert noise.uses_compiled(1 << 18)\n"
            "print(sorted({m.split('.')[1] for m in sys.modules\n"
            "              if m.startswith(('torch._dynamo', 'torch._inductor'))}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_failing_compiler_falls_back_to_the_reference_with_one_warning(tmp_path):
    code = ("import warnings, torch\n"
            "from pipeline.zo import noise\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    a = noise.gaussian(1, 2, 0, 1 << 17)\n"
            "    b = noise.gaussian(1, 2, 5, 9, 1 << 17)\n"
            "print(sum('noise kernel failed' in str(x.message) for x in w),"
            " noise.uses_compiled(1 << 17), torch.equal(a[5:14], b))\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "ZOPIPE_CACHE": str(tmp_path / "cache")}  # no package built before
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["1", "False", "True"]


def _mezo(model, master, cache, **kw):
    backend = SingleBackend(model, trainable_names(model, ["*"]), torch.device("cpu"),
                            master=master)
    shards = backend.shards()
    if cache:
        for s in shards:
            s.cache = cache
    return backend, MeZO(MethodConfig(lr=1e-3, weight_decay=0.1, **kw), shards)


@pytest.mark.parametrize("master", [False, True])
def test_cached_noise_gives_bitwise_the_same_steps_from_one_generation(
        monkeypatch, tiny_model, tiny_batch, master):
    monkeypatch.setattr(noise, "COMPILE_MIN", 0)  # every tiny parameter on the compiled path
    import copy
    other = copy.deepcopy(tiny_model)
    b1, plain = _mezo(tiny_model, master, None)
    cache = NoiseCache(1)
    b2, cached = _mezo(other, master, cache)
    for step in range(3):
        s1 = plain.step(StepContext(step, 0, 1e-3, tiny_batch, b1))
        s2 = cached.step(StepContext(step, 0, 1e-3, tiny_batch, b2))
        assert s1.loss == s2.loss and s1.projected_grad == s2.projected_grad
    for (n, p), q in zip(tiny_model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), n
    assert cache.generated == 3 * len(b2.shards())  # once per shard and step, not three times


def test_rademacher_directions_move_every_weight_by_the_same_amount(tiny_model, tiny_batch):
    backend = SingleBackend(tiny_model, trainable_names(tiny_model, ["*"]), torch.device("cpu"),
                            master=True)
    shards = backend.shards()
    for s in shards:
        s.noise = "rademacher"
    before = [s.master.clone() for s in shards]
    bszo = BSZO(MethodConfig(name="bszo", bszo_k=1, lr=1e-2), shards)
    stats = bszo.step(StepContext(0, 0, 1e-2, tiny_batch, backend))
    step = abs(1e-2 * stats.extra["mu"][0])
    assert step > 1e-5
    for s, b in zip(shards, before):
        torch.testing.assert_close((s.master - b).abs(), torch.full_like(b, step),
                                   rtol=0, atol=1e-6 * (1 + b.abs().max().item()))


@pytest.mark.slow
def test_compiled_noise_is_world_size_invariant_on_fsdp_and_zero3(monkeypatch, tiny_model_dir,
                                                                   tmp_path):
    """The real 2-rank check on the compiled path (every tiny parameter above the threshold),
    with the noise cache on: perturbations bitwise equal to the single-process ones."""
    from pipeline.sharding_check import run_check

    monkeypatch.setenv("ZO_NOISE_COMPILE_MIN", "0")
    small = [f"model.name_or_path={tiny_model_dir}", "data.n_train=64", "data.n_val=16",
             "data.n_test=32", "train.batch_size=8", "method.lr=1e-3", "train.threads=1",
             "method.cache_noise=true"]
    report = run_check("jobs/demo.yaml", small, 2, 2, tmp_path)
    for backend in ("fsdp", "zero3"):
        assert report[backend]["perturbation"] == 0.0
        assert report[backend]["params"] < 1e-6
