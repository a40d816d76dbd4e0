"""Shared fixtures: a tiny Llama built from a config (no download) and batches for it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from pipeline.data.encoding import Encoded, choice_batch


@pytest.fixture
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test (bitwise comparisons of reductions), then restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def record_reductions(backend) -> list[int]:
    """Make ``backend.all_reduce_mean`` record the size of every tensor it reduces; returns the
    list it appends to."""
    sizes: list[int] = []
    reduce = backend.all_reduce_mean

    def counting(tensor):
        sizes.append(tensor.numel())
        return reduce(tensor)

    backend.all_reduce_mean = counting
    return sizes


@contextmanager
def recording_linear_outputs() -> Iterator[list[int]]:
    """Within the block, every ``F.linear`` call records its output's bytes in the list yielded
    (the calls that look ``F.linear`` up at call time: piecewise and fp32-flow chunks)."""
    import torch.nn.functional as F

    parts: list[int] = []
    real = F.linear

    def recording(inp, weight, bias=None):
        out = real(inp, weight, bias)
        parts.append(out.numel() * out.element_size())
        return out

    F.linear = recording
    try:
        yield parts
    finally:
        F.linear = real


def snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter of ``model``."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def restore(model, saved: dict[str, torch.Tensor]) -> None:
    """Write a :func:`snapshot` back into ``model``."""
    for n, p in model.named_parameters():
        p.data.copy_(saved[n])


def mezo_estimate(shard, stats) -> torch.Tensor:
    """MeZO's ĝ = (1/n) Σ g_i z_i of a step's stats on one shard (Gaussian z), fp32."""
    from pipeline.zo.noise import gaussian

    n = len(stats.seeds)
    return sum(torch.tensor(g / n, dtype=torch.float32)
               * gaussian(s, shard.key, shard.start, shard.numel, shard.total)
               for g, s in zip(stats.projected_grad, stats.seeds))


def make_batch(n: int = 8, length: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        size = int(torch.randint(3, length + 1, (1,), generator=gen))
        prompt = tuple(torch.randint(2, 64, (size,), generator=gen).tolist())
        items.append(Encoded(prompt, ((5,), (9,)), int(torch.randint(0, 2, (1,), generator=gen))))
    return choice_batch(items, pad_id=0)


@pytest.fixture
def tiny_batch():
    return make_batch()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny randomly initialised Llama with the real SmolLM2 tokenizer, saved like a hub model.

    Subprocess and resume tests run real `zopipe` commands on it in seconds.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.assets import ensure_assets

    tok = AutoTokenizer.from_pretrained(ensure_assets(progress=False).model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory):
    """:func:`tiny_model_dir`'s shape as an OPT (learned positions, LayerNorms with biases,
    biased projections, tied head)."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from pipeline.assets import ensure_assets

    tok = AutoTokenizer.from_pretrained(ensure_assets(progress=False).model_dir)
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                    num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=512,
                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id or 0,
                    eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("tiny-opt")
    OPTForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tiny_job(tiny_model_dir):
    """Overrides that run the demo job on the tiny model and a small slice of the data."""
    return [f"model.name_or_path={tiny_model_dir}", "data.n_train=64", "data.n_val=16",
            "data.n_test=32", "train.batch_size=8", "method.lr=1e-3", "train.threads=1"]


def run_method_ranks(out, nproc: int, backend: str, job: str, overrides: list[str], steps: int):
    """Records of ``tests/workers/method_steps.py`` from each of ``nproc`` ranks."""
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).parent / "workers" / "method_steps.py"
    cmd = [str(worker), str(out), str(steps), job, *overrides, f"parallel.backend={backend}",
           "tracking.enabled=false"]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd]
    subprocess.run([sys.executable, *cmd], check=True, timeout=600)
    return [torch.load(p, weights_only=False) for p in sorted(Path(out).glob("rank*.pt"))]


def count_step_collectives(out, backend: str, overrides: list[str], *flags: str) -> dict:
    """Rank 0's record of ``tests/workers/count_collectives.py`` (one step of jobs/demo.yaml with
    ``overrides``) on 2 gloo ranks."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).parent / "workers" / "count_collectives.py"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(worker), str(out), "jobs/demo.yaml", *overrides, f"parallel.backend={backend}",
         "tracking.enabled=false", *flags],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(Path(out).read_text())
