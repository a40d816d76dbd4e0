"""DeepSpeed ZeRO-3 backend on 2 gloo ranks against the single-process backend.

One ``torch.multiprocessing.spawn`` of 2 ranks per dtype runs every check on the same engine
(DeepSpeed's import and engine start dominate); the ranks write their results to ``tmp_path``
and the test process compares them with :class:`SingleBackend` on the same saved model. The tiny
Llama has MLP biases of 45 elements, so the last partition of those carries one padding element.
"""

from __future__ import annotations

import gc
import os
import socket
import time
import weakref

import pytest
import torch
import torch.distributed as dist

from pipeline.config import MethodConfig, load_config
from pipeline.data.encoding import Encoded, choice_batch
from pipeline.parallel.single import SingleBackend
from pipeline.parallel.zero3 import Zero3ConfigError, owned_range, prepare_ds_config
from pipeline.zo.methods import StepContext
from pipeline.zo.methods.mezo import MeZO
from pipeline.zo.perturbation import Perturbation

WORLD = 2
GLOBAL_BATCH = 8
PROBE_SEED, RUN_SEED = 1234, 7
EPS, LR, STEPS = 1e-3, 1e-3, 3
TIMEOUT_S = 400


def _items(seed: int, n: int = GLOBAL_BATCH) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        size = int(torch.randint(3, 11, (1,), generator=gen))
        prompt = tuple(torch.randint(2, 64, (size,), generator=gen).tolist())
        items.append(Encoded(prompt, ((5,), (9,)), int(torch.randint(0, 2, (1,), generator=gen))))
    return items


def _batch(seed: int, rank: int = 0, world: int = 1):
    """Rank ``rank``'s contiguous part of the global batch of ``seed``."""
    items = _items(seed)
    per = len(items) // world
    return choice_batch(items[rank * per : (rank + 1) * per], pad_id=0)


def _config(model_dir, backend: str, dtype: str):
    return load_config(None, [f"model.name_or_path={model_dir}", f"parallel.backend={backend}",
                              f"model.dtype={dtype}", "model.device=cpu",
                              f"train.batch_size={GLOBAL_BATCH}", f"method.eps={EPS}",
                              f"method.lr={LR}"])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view(torch.uint8)


def _written(shards) -> list[torch.Tensor]:
    """What the probe perturbation shows a forward, shard by shard."""
    at, out = Perturbation.dense(PROBE_SEED, EPS), []
    for s in shards:
        seen = torch.empty_like(s.local)
        at.write(s, seen)
        out.append(seen)
    return out


# ---------------------------------------------------------------------------------------------
# the rank processes


def _rank_main(rank: int, port: int, model_dir: str, out_dir: str, dtype: str, split: bool):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from pipeline.parallel.zero3 import Zero3Backend

    backend = Zero3Backend.from_config(_config(model_dir, "zero3", dtype))
    torch.save(_checks(backend, rank, split), os.path.join(out_dir, f"rank{rank}.pt"))
    # teardown: nothing may keep the process group alive past close(); a group left for the
    # interpreter's shutdown to destroy takes its gloo threads down in whatever state exit
    # left them in
    group = weakref.ref(dist.group.WORLD)
    backend.close()
    gc.collect()
    with open(os.path.join(out_dir, f"rank{rank}.closed"), "w") as f:
        f.write("freed" if group() is None else "alive")


def _checks(backend, rank: int, split: bool) -> dict:
    # imported after the backend, which chooses DeepSpeed's accelerator
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    shards = backend.shards()
    params = dict(backend.model.named_parameters())
    parts = [params[s.name].ds_tensor for s in shards]

    def released() -> bool:
        return all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in params.values())

    out: dict = {"names": [s.name for s in shards], "starts": [s.start for s in shards],
                 "numels": [s.numel for s in shards], "dtype": str(shards[0].local.dtype),
                 "released": [released()]}
    initial = [_bits(p) for p in parts]
    full = _batch(0)
    out["loss0"] = backend.loss(full)
    out["released"].append(released())

    # 1. the perturbation of each owned slice, as written for the gather
    out["perturbed"] = _written(shards)
    # 2. the perturbed forward sees it, and leaves every byte of every partition as it was
    # (padding included): no master, nothing restored
    probe = Perturbation.dense(PROBE_SEED, EPS)
    out["loss_plus"] = backend.loss(full, probe)
    out["released"].append(released())
    out["untouched"] = all(torch.equal(_bits(p), b) for p, b in zip(parts, initial))
    out["loss_back"] = backend.loss(full)
    # 3. MeZO steps at learning rate 0: bitwise unchanged
    lr0 = MeZO(MethodConfig(lr=0.0, eps=EPS), shards)
    for step in range(2):
        lr0.step(StepContext(step, RUN_SEED, 0.0, full, backend))
    out["lr0_unchanged"] = all(torch.equal(_bits(p), b) for p, b in zip(parts, initial))

    # 4. MeZO on this rank's part of each step's global batch (or the whole of it)
    method = MeZO(MethodConfig(lr=LR, eps=EPS), shards)
    stats = []
    for step in range(STEPS):
        batch = _batch(100 + step, rank, WORLD) if split else _batch(100 + step)
        stats.append(method.step(StepContext(step, RUN_SEED, LR, batch, backend)))
        out["released"].append(released())
    out["grads"] = [s.projected_grad for s in stats]
    out["losses"] = [s.loss for s in stats]
    out["final"] = [s.local.detach().clone() for s in shards]
    return out


def _free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port != 29500:
            return port


def _spawn(model_dir, out_dir, dtype: str, split: bool) -> list[dict]:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_rank_main, args=(_free_port(), str(model_dir), str(out_dir), dtype,
                                               split),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5):  # raises if a rank fails, and ends the others
            if time.monotonic() > deadline:
                pytest.fail(f"zero3 ranks still running after {TIMEOUT_S} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    assert [(out_dir / f"rank{r}.closed").read_text() for r in range(WORLD)] == ["freed"] * WORLD
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------
# the test process


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=45, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, mlp_bias=True)
    out = tmp_path_factory.mktemp("tiny-llama-z3")
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' setting: same kernels, same reduction order
    yield
    torch.set_num_threads(before)


def _single(model_dir, dtype):
    backend = SingleBackend.from_config(_config(model_dir, "single", dtype))
    return backend, {s.name: s for s in backend.shards()}


@pytest.mark.slow
@pytest.mark.parametrize("dtype,split", [("fp32", True), ("bf16", False)])
def test_zero3_two_ranks_match_single_process(model_dir, tmp_path, one_thread, dtype, split):
    ranks = _spawn(model_dir, tmp_path, dtype, split)
    single, by_name = _single(model_dir, dtype)
    r0, r1 = ranks
    assert r0["names"] == r1["names"] == list(by_name)
    assert r0["dtype"] == r1["dtype"] == str(single.shards()[0].local.dtype)
    assert all(all(r["released"]) for r in ranks)  # no gathered copy survives a forward

    # the ranks' slices tile every parameter exactly; the 45-element biases have padding
    for i, name in enumerate(r0["names"]):
        spans = sorted((r["starts"][i], r["numels"][i]) for r in ranks)
        assert spans[0][0] == 0 and spans[0][0] + spans[0][1] == spans[1][0]
        assert spans[1][0] + spans[1][1] == by_name[name].total
    assert any(by_name[n].total % WORLD for n in r0["names"])

    full = _batch(0)
    loss0 = single.loss(full)
    # 1. sharding invariance: every rank's slice is bitwise the single-process perturbation
    for r in ranks:
        for name, start, n, got in zip(r["names"], r["starts"], r["numels"], r["perturbed"]):
            want = _written([by_name[name]])[0]
            assert torch.equal(got, want[start : start + n]), name
    # 2. each rank runs the whole batch: the loss of the gathered, perturbed weights is bitwise
    # the single-process loss (the gathered weights are bitwise equal, the kernels the same)
    loss_plus = single.loss(full, Perturbation.dense(PROBE_SEED, EPS))
    assert loss_plus != loss0  # the perturbation is seen
    for r in ranks:
        assert torch.equal(r["loss0"], loss0)
        assert torch.equal(r["loss_plus"], loss_plus), (r["loss_plus"], loss_plus)
        # 3. the stored partitions were never written: exact without masters, every byte
        assert r["untouched"] and r["lr0_unchanged"]
        assert torch.equal(r["loss_back"], loss0)

    # 4. MeZO: identical projected gradients on every rank, tracking the single-process run
    assert r0["grads"] == r1["grads"] and r0["losses"] == r1["losses"]
    method = MeZO(MethodConfig(lr=LR, eps=EPS), single.shards())
    grads = [method.step(StepContext(step, RUN_SEED, LR, _batch(100 + step), single))
             .projected_grad for step in range(STEPS)]
    if split:
        # Each rank averages its half of the batch in fp32 (padded to its own width); the
        # float64 mean of the halves differs from the fp32 mean of the whole by a few fp32 ulps
        # of a loss in [0.5, 1) (ulp 2^-24 = 6e-8). Allowing L+ and L- 8 ulps each bounds the
        # difference of g = (L+ - L-)/2ε by 16 ulp/2ε = 4.8e-4 (measured: 1.5e-5, then 0).
        tol = 16 * 2.0**-24 / (2 * EPS)
        assert torch.allclose(torch.tensor(r0["grads"]), torch.tensor(grads), rtol=0, atol=tol)
        atol = LR * tol * STEPS * 6 + 1e-6  # updates differ by lr·Δg·z (|z| < 6), plus rounding
    else:
        assert r0["grads"] == grads  # same batch everywhere: bitwise
        atol = 0.0
    for r in ranks:
        for name, start, n, got in zip(r["names"], r["starts"], r["numels"], r["final"]):
            want = by_name[name].local[start : start + n]
            assert torch.allclose(got.float(), want.float(), rtol=0, atol=atol), name


# ---------------------------------------------------------------------------------------------
# fast checks (no DeepSpeed engine)


def test_owned_range_covers_each_element_once_and_skips_padding():
    for numel in [1, 5, 45, 64, 1000]:
        for world in [1, 2, 3, 4, 8]:
            part = -(-numel // world)
            spans = [owned_range(numel, part, r) for r in range(world)]
            assert sum(n for _, n in spans) == numel
            assert all(0 <= n <= part and s + n <= numel for s, n in spans)
            assert all(spans[r][0] + spans[r][1] == spans[r + 1][0] for r in range(world - 1)
                       if spans[r + 1][1])
    assert owned_range(5, 2, 3) == (5, 0)  # a rank may own nothing of a tiny parameter


def test_prepare_ds_config_sets_batch_and_precision_and_rejects_unsafe_settings():
    from pipeline.parallel.zero3 import default_ds_config, read_ds_config

    raw = read_ds_config(default_ds_config("bf16"))
    ds = prepare_ds_config(raw, dtype="fp32", batch_size=16, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 16
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 0
    assert raw["bf16"]["enabled"] is True  # the file's dict is left as it was
    for dtype in ["fp32", "bf16", "fp16", "offload"]:
        cfg = read_ds_config(default_ds_config(dtype))
        assert cfg["zero_optimization"]["stage"] == 3 and "optimizer" not in cfg
    bad = {"zero_optimization": {"stage": 2, "stage3_param_persistence_threshold": 100,
                                 "stage3_prefetch_bucket_size": 5e7,
                                 "offload_param": {"device": "nvme"}},
           "optimizer": {"type": "AdamW"}}
    with pytest.raises(Zero3ConfigError) as err:
        prepare_ds_config(bad, dtype="bf16", batch_size=8, world_size=2)
    for word in ["stage", "optimizer", "persistence_threshold", "prefetch_bucket_size", "nvme"]:
        assert word in str(err.value)
