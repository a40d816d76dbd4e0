"""Fused evaluations (train.fused_evaluations): a step's forwards as one forward of the repeated
batch give bitwise the losses of one forward each, and the same steps; on 2 gloo ranks they
gather the model once per step."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_batch

from pipeline.config import MethodConfig
from pipeline.data.encoding import Encoded, sequence_batch
from pipeline.parallel import piecewise, trainable_names
from pipeline.parallel.delivery import UndeliveredPerturbation
from pipeline.parallel.single import SingleBackend
from pipeline.zo.directions import Term
from pipeline.zo.methods import StepContext, build_method
from pipeline.zo.perturbation import Perturbation

EPS = 1e-2
POINTS = {
    "mezo": [Perturbation.dense(11, EPS), Perturbation.dense(11, -EPS)],
    "bszo": [None, Perturbation.dense(12, EPS), Perturbation.dense(13, EPS)],
    "two terms": [Perturbation([Term(EPS, seed=12), Term(-EPS, seed=13)]), None],
}


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                    pad_token_id=0)
    model = OPTForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


def _sequence_batch():
    gen = torch.Generator().manual_seed(1)
    items = [Encoded(tuple(torch.randint(2, 64, (3 + i % 5,), generator=gen).tolist()),
                     ((5, 6), (9,)), i % 2) for i in range(6)]
    return sequence_batch(items, 0, all_candidates=False)


def _backends(model, fused: bool = True, patterns=("*",)):
    names = trainable_names(model, list(patterns))
    return SingleBackend(model, names, torch.device("cpu"), master=False, fused=fused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_fused_losses_are_bitwise_the_sequential_ones(tiny_model, one_thread, arch, dtype):
    model = (tiny_model if arch == "llama" else _opt()).to(dtype)
    backend = _backends(model)
    for batch in (make_batch(), _sequence_batch()):
        for name, ats in POINTS.items():
            sequential = [backend.loss(batch, at) for at in ats]
            fused = backend.losses(batch, ats)
            assert [v.item() for v in fused] == [v.item() for v in sequential], name
            # the points differ, so a slice that read another slice's weights would show
            assert len({v.item() for v in fused}) == len(ats), name


def test_large_modules_in_pieces_are_bitwise_too(tiny_model, one_thread, monkeypatch):
    """The piecewise embedding / linear forwards (a weight over PIECE_BYTES) per slice."""
    monkeypatch.setattr(piecewise, "PIECE_BYTES", 1024)
    backend = _backends(tiny_model)
    embed = tiny_model.model.embed_tokens
    assert piecewise.qualifies(embed, backend.shards()[0])
    batch = make_batch()
    for ats in POINTS.values():
        assert [v.item() for v in backend.losses(batch, ats)] == \
            [backend.loss(batch, at).item() for at in ats]


def _steps(model, method: str, fused: bool, steps: int = 2, **cfg):
    backend = _backends(model, fused)
    method = build_method(SimpleNamespace(method=MethodConfig(name=method, **cfg)),
                          backend.shards())
    stats = [method.step(StepContext(s, 0, 1e-2, make_batch(seed=s), backend))
             for s in range(steps)]
    return stats, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("method", "cfg"), [
    ("mezo", {}), ("mezo", {"n_directions": 2, "cache_noise": True}),
    ("mezo", {"noise": "rademacher", "two_sided": False}), ("bszo", {"bszo_k": 2}),
    ("lozo", {"lozo_rank": 2}),
])
def test_fused_steps_update_bitwise_as_sequential_ones(tiny_model, one_thread, method, cfg):
    initial = copy.deepcopy(tiny_model)
    start = {n: p.clone() for n, p in tiny_model.named_parameters()}
    fused_stats, fused = _steps(tiny_model, method, True, eps=EPS, **cfg)
    seq_stats, sequential = _steps(initial, method, False, eps=EPS, **cfg)
    assert [s.projected_grad for s in fused_stats] == [s.projected_grad for s in seq_stats]
    assert [s.loss for s in fused_stats] == [s.loss for s in seq_stats]
    assert all(torch.equal(fused[n], sequential[n]) for n in fused)
    assert any(not torch.equal(fused[n], start[n]) for n in start)  # the steps moved


def test_stored_weights_are_untouched_and_a_missed_weight_is_an_error(tiny_model):
    backend = _backends(tiny_model)
    before = {n: p.clone() for n, p in tiny_model.named_parameters()}
    backend.losses(make_batch(), POINTS["mezo"])
    assert all(torch.equal(before[n], p) for n, p in tiny_model.named_parameters())
    # a trainable weight read outside the module that owns it never gets its perturbation
    norm = tiny_model.model.norm
    norm.forward = lambda x, w=norm.weight: x * w
    with pytest.raises(UndeliveredPerturbation, match="model.norm.weight"):
        backend.losses(make_batch(), POINTS["mezo"])


def _ranks(tmp_path, model_dir, backend: str) -> dict:
    out = tmp_path / f"{backend}.json"
    worker = Path(__file__).parent / "workers" / "fused_losses.py"
    overrides = [f"model.name_or_path={model_dir}", "data.n_train=64", "data.n_val=16",
                 "data.n_test=32", "train.batch_size=8", "train.threads=1",
                 "tracking.enabled=false", f"parallel.backend={backend}",
                 "train.fused_evaluations=true"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", str(worker), str(out), "jobs/demo.yaml",
                           *overrides], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_two_ranks_fused_losses_bitwise_and_one_gather_per_step(
        tiny_model_dir, tiny_opt_dir, tmp_path, backend, arch):
    record = _ranks(tmp_path, tiny_model_dir if arch == "llama" else tiny_opt_dir, backend)
    for name, (sequential, fused) in record["losses"].items():
        assert fused == sequential, name
        assert len(set(fused)) == len(fused), name
    gathered, forward = record["gathered"], record["gathered"]["forward"]
    # each rank sends its half of every parameter once per forward: the model, once
    assert 2 * forward == record["trainable_bytes"]
    assert gathered["mezo_sequential"] == 2 * forward
    assert gathered["bszo_sequential"] == 3 * forward
    assert gathered["mezo_fused"] == forward  # MeZO: 1.0 model per step (2.0 sequentially)
    assert gathered["bszo_fused"] == forward  # BSZO k=2: 1 gather per step (3 sequentially)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_with_two_threads_the_losses_agree_to_an_ulp(tiny_model, arch):
    """With several threads the CPU flash-attention kernel may block a row's work differently
    for a larger batch; the repeated batch's losses then differ in the last bit (measured: up
    to 6e-8 on the tiny OPT, losses ~0.7; the tiny Llama stayed bitwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        backend = _backends(tiny_model if arch == "llama" else _opt())
        worst = 0.0
        for batch in (make_batch(), _sequence_batch()):
            for ats in POINTS.values():
                fused = backend.losses(batch, ats)
                worst = max(worst, *((f - backend.loss(batch, at)).abs().item()
                                     for f, at in zip(fused, ats)))
    finally:
        torch.set_num_threads(threads)
    assert worst <= 2.4e-7  # 2 ulp of a loss in [1, 2)
