"""Sharded loading: every rank reads only its own elements of the checkpoint.

Loading the whole model on every rank before sharding it costs a full copy per rank (26 GB of
host memory per rank for a 13B model in bf16, ~0.5 TB on an 8-GPU node for a 32B one). Instead
the sharded backends build the model without weights (:func:`skeleton`), shard that, and fill
each rank's part from the checkpoint files (:class:`Checkpoint`):

- **safetensors only**: a safetensors file is a JSON header of ``(dtype, shape, byte range)``
  per tensor followed by the raw row-major bytes, so any flat element range of a tensor (FSDP2's
  rows ``[r0, r1)``, a ZeRO-3 partition) is one contiguous byte range of the file. It is read
  with plain ``readinto`` calls, straight into the rank's shard when the dtypes match, else
  through a bounded staging buffer (:data:`CHUNK_BYTES`) that the dtype conversion reads from.
  No memory map is kept (its touched pages would count against the process as the load goes),
  no whole tensor is ever allocated. Pickled ``.bin`` checkpoints cannot be read in slices: the
  error says how to convert them once.
- **hub ids and local directories** resolve to the same files ``from_pretrained`` reads, through
  transformers' hub utilities (the index ``model.safetensors.index.json`` or
  ``model.safetensors``), so a cluster's ``HF_HOME`` cache and offline mode work as usual.
- **what is not in the checkpoint**: buffers that the model computes (rotary ``inv_freq``) are
  computed on the CPU by transformers' own ``_init_weights``, as ``from_pretrained`` does; tied
  parameters (``lm_head`` tied to ``embed_tokens``) are tied on the meta device, so one
  checkpoint tensor fills both names; LoRA adapters are created by peft exactly as on a loaded
  model (same seeded initialisation, see :func:`_phantom_weights`) and held whole: they are
  small.

Per rank the load then peaks at its shard plus one staging buffer, not at the model.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.models.loading import DTYPES, ModelError, model_path

CHUNK_BYTES = 1024**2  # staging for dtype conversion and non-CPU shards: small, so it is noise

# safetensors dtype names (the format's specification) -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointError(ModelError):
    """A checkpoint that cannot be loaded in shards; the message says what to do."""


def _bin_only_message(name_or_path: str) -> str:
    return (
        f"model.name_or_path={name_or_path!r} has only PyTorch .bin weights, which cannot be read "
        "in slices (sharded loading reads each rank's part of safetensors files); convert it "
        "once on a machine with enough memory: python -c \"from transformers import "
        f"AutoModelForCausalLM as M; M.from_pretrained('{name_or_path}').save_pretrained('OUT')\" "
        "(safetensors by default) and set model.name_or_path=OUT"
    )


def checkpoint_files(name_or_path: str) -> list[Path]:
    """The safetensors files of a model, as ``from_pretrained`` would find them.

    A local directory is read in place; a hub id resolves through transformers' ``cached_file``
    into the hub cache (downloading what is missing, unless ``HF_HUB_OFFLINE=1``), like
    ``from_pretrained``; concurrent ranks share a download through the hub cache's file locks.
    """
    from transformers.utils import (
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        WEIGHTS_NAME,
        cached_file,
    )
    from transformers.utils.hub import get_checkpoint_shard_files

    path = model_path(name_or_path)

    def find(filename: str) -> str | None:
        return cached_file(path, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    try:
        index = find(SAFE_WEIGHTS_INDEX_NAME)
        if index is not None:
            files, _ = get_checkpoint_shard_files(path, index)
            return [Path(f) for f in files]
        single = find(SAFE_WEIGHTS_NAME)
        if single is not None:
            return [Path(single)]
        if find(WEIGHTS_INDEX_NAME) is not None or find(WEIGHTS_NAME) is not None:
            raise CheckpointError(_bin_only_message(name_or_path))
    except OSError as exc:
        raise CheckpointError(f"model.name_or_path={name_or_path!r}: {exc}") from None
    raise CheckpointError(
        f"model.name_or_path={name_or_path!r}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} "
        "found; give a local model directory or a hub id with safetensors weights"
    )


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are and what they hold."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # byte offset of the first element in the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(file: Path) -> dict[str, Entry]:
    """The tensors of one safetensors file (8-byte little-endian header size, JSON header)."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{file}: not a safetensors file (shorter than its header)")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file}: not a safetensors file (unreadable header)") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has dtype {info['dtype']}, which "
                                  "sharded loading does not read; use parallel.backend=single")
        begin, _ = info["data_offsets"]
        entries[name] = Entry(file, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]),
                              8 + size + begin)
    return entries


def _bytes_of(t: torch.Tensor):
    """A writable buffer over a contiguous CPU tensor's bytes."""
    return t.view(-1).view(torch.uint8).numpy()


class Checkpoint:
    """Where each tensor of a skeleton model comes from: the checkpoint files' entries, or tensors
    held in memory (buffers the model computed, LoRA adapters). ``read`` fills any flat element
    range of one tensor into any 1-D tensor, in that tensor's dtype and on its device."""

    def __init__(self, files: list[Path], keys: dict[str, list[str]],
                 held: dict[str, torch.Tensor], base_prefix: str | None = None):
        self.entries: dict[str, Entry] = {}
        for file in files:
            self.entries.update(read_header(file))
        self.keys = keys  # model name -> the checkpoint names it may have (tied aliases)
        self.held = held  # model name -> its value, for what no checkpoint holds
        self.base_prefix = base_prefix

    def source(self, name: str, shape) -> Entry | torch.Tensor:
        """The checkpoint entry of model tensor ``name`` (of global ``shape``), or its held value.

        The checkpoint wins where it has the tensor (parameters, persistent buffers), as with
        ``from_pretrained``; a checkpoint of the base model lacks the ``base_model_prefix``
        (``model.``), which ``from_pretrained`` also allows."""
        candidates = list(self.keys.get(name, []))
        if self.base_prefix:
            candidates += [k.removeprefix(f"{self.base_prefix}.") for k in candidates
                           if k.startswith(f"{self.base_prefix}.")]
        for key in candidates:
            if key in self.entries:
                entry = self.entries[key]
                if entry.shape != tuple(shape):
                    raise CheckpointError(f"{entry.file}: {key} has shape {list(entry.shape)}, "
                                          f"the model's {name} {list(shape)}; the checkpoint is "
                                          "not of this model's config")
                return entry
        if name in self.held:
            return self.held[name]
        files = sorted({str(e.file) for e in self.entries.values()})
        raise CheckpointError(
            f"{name} is not in the checkpoint ({', '.join(files)}; looked for "
            f"{candidates or [name]}) and the model does not compute it: its architecture renames "
            "or fuses checkpoint weights while loading, which sharded loading does not do; use "
            "parallel.backend=single, or save the model once with save_pretrained and load that "
            "directory"
        )

    def read(self, name: str, shape, start: int, out: torch.Tensor) -> None:
        """Elements ``[start, start + out.numel())`` of model tensor ``name`` (flattened) into
        ``out``."""
        if out.dim() != 1:
            raise ValueError("Checkpoint.read fills a 1-D tensor")
        n = out.numel()
        src = self.source(name, shape)
        if isinstance(src, torch.Tensor):
            with torch.no_grad():
                out.copy_(src.reshape(-1)[start : start + n])
            return
        if start < 0 or start + n > src.numel:
            raise ValueError(f"{name}: elements [{start}, {start + n}) of {src.numel}")
        if n == 0:
            return
        item = src.dtype.itemsize
        with open(src.file, "rb", buffering=0) as f:
            f.seek(src.offset + start * item)
            if out.device.type == "cpu" and out.dtype == src.dtype and out.is_contiguous():
                _read_exactly(f, _bytes_of(out), src.file)
                return
            per = max(1, CHUNK_BYTES // item)
            staging = torch.empty(min(per, n), dtype=src.dtype)
            with torch.no_grad():
                for first in range(0, n, per):
                    part = staging[: min(per, n - first)]
                    _read_exactly(f, _bytes_of(part), src.file)
                    out[first : first + part.numel()].copy_(part)


def _read_exactly(f, buffer, file: Path) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{file}: truncated (ends inside a tensor); download it again")
        done += got


@contextlib.contextmanager
def _phantom_weights(model: torch.nn.Module):
    """Meta parameters swapped for zero-stride CPU stand-ins (one element of memory each) for
    the duration, then put back (ties kept). peft places new adapters on their base layer's device
    and dtype; on a meta base it would put them on the meta device and lose their seeded
    initialisation, while on these stand-ins it builds and initialises them exactly as on a loaded
    model."""
    swapped = []
    stand_ins: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in stand_ins:
                zero = torch.zeros((), dtype=p.dtype).expand(p.shape)
                stand_ins[id(p)] = torch.nn.Parameter(zero, requires_grad=False)
            swapped.append((module, name, p))
            module._parameters[name] = stand_ins[id(p)]
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def _compute_buffers(model) -> set[int]:
    """Give every buffer CPU storage and the value transformers computes for it; returns the ids
    of the buffers so computed.

    Each module owning a buffer goes through the model's own ``_init_weights`` (rotary
    ``inv_freq`` from the config), which is what ``from_pretrained`` does for them; its
    parameter initialisers meet meta tensors and do nothing. A buffer that no initialiser wrote
    (its version counter is still 0) must come from the checkpoint."""
    computed = set()
    for module in model.modules():
        owned = [n for n, b in module._buffers.items() if b is not None]
        for name in owned:
            b = module._buffers[name]
            module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="cpu")
        if owned:
            model._init_weights(module)
        computed |= {id(module._buffers[n]) for n in owned if module._buffers[n]._version > 0}
    return computed


def skeleton(cfg) -> tuple[torch.nn.Module, Checkpoint]:
    """The configured model without its weights, and the checkpoint to fill them from.

    Parameters are on the meta device (tied ones tied), buffers real (:func:`_compute_buffers`).
    With ``method.tuning=lora`` peft's adapters are real and initialised exactly as on a loaded
    model (:func:`_phantom_weights`). Computed buffers and adapters are held whole in the returned
    checkpoint (they are small), which the loaders read like any other tensor; no tensor of a
    parameter's size is allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = model_path(cfg.model.name_or_path)
    try:
        hf_cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name_or_path={cfg.model.name_or_path!r} could not be loaded "
                         f"({exc})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=DTYPES[cfg.model.dtype])
    computed = _compute_buffers(model)
    prefix = getattr(model, "base_model_prefix", None)
    # checkpoint names per tensor object, before peft renames the modules (tied: several)
    names_of: dict[int, list[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(t), []).append(key)
    if cfg.method.tuning == "lora":
        from pipeline.models.lora import wrap_lora

        with _phantom_weights(model):
            model = wrap_lora(model, cfg.method, cfg.train.seed)
    model.requires_grad_(False)
    params = list(model.named_parameters(remove_duplicate=False))
    buffers = list(model.named_buffers(remove_duplicate=False))
    keys = {name: names_of.get(id(t), []) for name, t in [*params, *buffers]}
    held = {name: b for name, b in buffers if id(b) in computed}
    held.update({name: p for name, p in params if id(p) not in names_of})  # LoRA adapters
    files = checkpoint_files(cfg.model.name_or_path)
    return model.eval(), Checkpoint(files, keys, held, prefix)
