"""Shared fixtures: a tiny Llama built from a config (no download) and batches for it."""

from __future__ import annotations

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
