"""Sharded loading (pipeline/models/sharded_load.py): each rank reads only its part.

The 2-rank tests run tests/workers/sharded_load.py under torchrun (gloo) on a tiny tied Llama
saved in fp32 with odd sizes (vocabulary 61, MLP 45 with biases), so FSDP2's last row chunk and
ZeRO-3's last partition are short and padded. Bitwise equality with the old full load is checked
for the local shards, the buffers the model computes (rotary ``inv_freq``) and the ParamShards
with their fp32 masters, in fp32 and bf16 (converted at load), and for LoRA adapters on fsdp.
"""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.models import sharded_load
from pipeline.models.sharded_load import Checkpoint, CheckpointError, checkpoint_files

WORKER = Path(__file__).parent / "workers" / "sharded_load.py"


@pytest.fixture(scope="module")
def odd_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=45, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, mlp_bias=True)
    out = tmp_path_factory.mktemp("odd-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def _ranks(backend, model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(WORKER), str(tmp_path), backend, str(model_dir)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_fsdp_sharded_load_is_bitwise_the_full_load_and_allocates_one_shard(odd_model_dir,
                                                                            tmp_path):
    for rank, cases in enumerate(_ranks("fsdp", odd_model_dir, tmp_path)):
        for case, r in cases.items():
            where = f"rank {rank} {case}"
            assert r["params"] == [] and r["buffers"] == [] and r["shards"] == [], where
            assert r["n_shards"] > 0 and r["shards_alias"], where
            assert r.get("tied", True), where
            assert r["adapters"] == (8 if case.endswith("lora") else 0), where
            # No tensor of a parameter's full size is ever made: the largest allocation is a
            # (padded) local shard; the embedding's full size is twice that.
            assert r["new_largest"] <= r["largest_padded"] < r["largest_full"], where
            # Bytes created by torch ops while loading: to_empty's local shards and FSDP2's
            # padded copies of the short ones (at most the padded shards twice), the fp32
            # masters and the buffers; bf16 adds the staging reads of the fp32 file (at most the
            # shards again, in fp32); peft builds the LoRA adapters whole (fp32, cast to the
            # base's bf16 and back: 2.5 times their size). The counter sees the shards and masters.
            held = r["local_bytes"] + r["masters_bytes"]
            bound = (2 * r["padded_bytes"] + r["masters_bytes"] + r["buffer_bytes"]
                     + 2 * r["padded_bytes"] * case.startswith("bf16")
                     + 2.5 * r["adapter_bytes"])
            assert held <= r["new_bytes"] <= bound, where
            assert r["local_bytes"] < 0.6 * r["model_bytes"], where


@pytest.mark.slow
def test_zero3_sharded_load_is_bitwise_the_full_load_and_allocates_one_unit(odd_model_dir,
                                                                           tmp_path):
    for rank, cases in enumerate(_ranks("zero3", odd_model_dir, tmp_path)):
        for case, r in cases.items():
            where = f"rank {rank} {case}"
            assert r["params"] == [] and r["buffers"] == [] and r["shards"] == [], where
            assert r["n_shards"] > 0 and r["tied"], where
            # Bytes created by torch ops while loading: the partitions, the masters, the buffers,
            # the root units at full size (DeepSpeed broadcasts every parameter before it
            # partitions it) and one block's buffer (64-byte aligned), reused by every block:
            # not each block at full size (2 blocks here, one more would break the bound).
            bound = (r["partition_bytes"] + r["masters_bytes"] + r["buffer_bytes"]
                     + r["root_full_bytes"] + r["block_full_bytes"] + 64 * 64)
            if case.startswith("bf16"):
                bound += 2 * r["partition_bytes"]  # staging reads of the fp32 file
            assert r["partition_bytes"] + r["masters_bytes"] <= r["new_bytes"] <= bound, where


# ---------------------------------------------------------------------------------------------
# fast checks (one process)


def test_read_gives_any_range_in_any_dtype_through_small_chunks(tmp_path, monkeypatch):
    full = torch.randn(7, 13)
    save_file({"w": full, "b": torch.arange(5, dtype=torch.int64)}, tmp_path / "m.safetensors")
    ckpt = Checkpoint([tmp_path / "m.safetensors"], {"x.w": ["w"], "x.b": ["b"]}, {})
    monkeypatch.setattr(sharded_load, "CHUNK_BYTES", 12)  # 3 fp32 values per staging read
    flat = full.reshape(-1)
    for start, n in [(0, 91), (13, 26), (90, 1), (5, 0)]:
        direct = torch.empty(n)
        ckpt.read("x.w", (7, 13), start, direct)
        assert torch.equal(direct, flat[start : start + n])
        bf16 = torch.empty(n, dtype=torch.bfloat16)
        ckpt.read("x.w", (7, 13), start, bf16)
        assert torch.equal(bf16, flat[start : start + n].to(torch.bfloat16))
    b = torch.empty(2, dtype=torch.int64)
    ckpt.read("x.b", (5,), 3, b)
    assert b.tolist() == [3, 4]


def test_held_values_fill_what_the_checkpoint_lacks_and_the_prefix_may_be_missing(tmp_path):
    save_file({"layers.0.w": torch.ones(4)}, tmp_path / "m.safetensors")
    held = {"model.inv_freq": torch.full((3,), 2.0)}
    ckpt = Checkpoint([tmp_path / "m.safetensors"], {"model.layers.0.w": ["model.layers.0.w"]},
                      held, base_prefix="model")
    out = torch.zeros(4)
    ckpt.read("model.layers.0.w", (4,), 0, out)  # a base-model checkpoint without "model."
    assert out.tolist() == [1.0] * 4
    buf = torch.zeros(3)
    ckpt.read("model.inv_freq", (3,), 0, buf)
    assert buf.tolist() == [2.0] * 3
    with pytest.raises(CheckpointError, match="model.layers.1.w is not in the checkpoint"):
        ckpt.read("model.layers.1.w", (4,), 0, out)
    with pytest.raises(CheckpointError, match=r"has shape \[4\], the model's model.layers.0.w"):
        ckpt.read("model.layers.0.w", (2, 2), 0, out)


def test_unsliceable_or_broken_checkpoints_are_clear_errors(tmp_path):
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    torch.save({"w": torch.ones(2)}, bin_only / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        checkpoint_files(str(bin_only))
    assert "cannot be read in slices" in str(err.value)
    assert "save_pretrained" in str(err.value) and "model.name_or_path=OUT" in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        checkpoint_files(str(empty))

    good = tmp_path / "good"
    good.mkdir()
    save_file({"w": torch.ones(64)}, good / "model.safetensors")
    assert checkpoint_files(str(good)) == [good / "model.safetensors"]
    data = (good / "model.safetensors").read_bytes()
    (good / "model.safetensors").write_bytes(data[:-8])
    ckpt = Checkpoint([good / "model.safetensors"], {"w": ["w"]}, {})
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.read("w", (64,), 0, torch.empty(64))

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": torch.ones(2)}, sharded / "model-00001-of-00002.safetensors")
    save_file({"b": torch.ones(2)}, sharded / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    files = checkpoint_files(str(sharded))
    assert sorted(f.name for f in files) == ["model-00001-of-00002.safetensors",
                                             "model-00002-of-00002.safetensors"]
    assert set(Checkpoint(files, {}, {}).entries) == {"a", "b"}

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Checkpoint([bad], {}, {})
