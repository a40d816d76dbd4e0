"""``zopipe plan``: per-GPU memory of a job from the model's config.json alone (no weights, GPU).

The model is built on the meta device (:mod:`pipeline.models.meta`), so the parameter counts are
the real ones. The memory figures are arithmetic over those shapes, per rank, for each backend:

- **weights**: this rank's share in the storage dtype. ZeRO-3 holds ``ceil(N / W)`` elements of
  every parameter (its partition, padding included); FSDP2 ``ceil(d0 / W)`` rows (rank 0 holds
  the most); single, everything. NF4 (``model.quantization: nf4``): the ``nn.Linear`` weights of the
  transformer blocks take what bitsandbytes stores for them as :mod:`pipeline.models.quantization`
  loads them (double quantization): 4 bits per value, an 8-bit absmax per block of 64 values, an
  fp32 absmax per 256 blocks, and per layer the two code tables and an offset; the rest stays
  in the storage dtype. This equals the tensor bytes of the loaded demo model (tested).
- **gathered for the forward**: full parameters alive during a forward. FSDP2 keeps the root
  unit (embeddings, final norm, LM head) gathered for the whole forward plus two blocks (the
  running one and the prefetched next); ZeRO-3 gathers module by module, about two blocks, or one
  block plus the largest root parameter.
- **fp32 masters**: 4 bytes per local trainable element, only with ``precision.master_weights:
  fp32`` (the default keeps none: 16-bit updates land by stochastic rounding).
- **method state**: ZO-Adam's two fp32 moments per trainable element, ZO-SGD momentum's one (the
  moments stay fp32, sharded like the weights); LOZO's factors; P-GAP's factors (``V`` and the
  rank's rows of ``U`` per matrix, in the storage dtype, plus a refresh's thin products); AGZO's
  bases, ``R`` factors and activation row samples (each hooked layer counted as its own input:
  an upper bound, q/k/v share one in the real run); ZO-Act's ``V``, ``C``, Adam moments and
  calibration rows. MeZO and BSZO keep nothing of parameter size.
- **activations**: a forward without autograd keeps one block's activations at a time:
  ``b·T·(6h + 3f)`` values for micro-batch ``b`` (training or evaluation, the larger), ``T =
  data.max_length``, hidden ``h`` and MLP width ``f``, plus the fp32 logits of the kept position
  (the loss reads one position per row for single-token candidates). ZO-Act on a 16-bit or
  4-bit base keeps them in fp32 (4 bytes), for a training micro-batch cut in
  ``method.zoact_micro_batches`` parts (0: 2), and upcasts one weight piece of at most
  :data:`~pipeline.models.fp32_flow.CHUNK_BYTES` at a time (:mod:`pipeline.models.fp32_flow`).
- **runtime**: CUDA context, NCCL buffers and allocator slack, an assumed 1.5 GiB.

The verdict compares the total with the GPU memory: ``fits`` up to 90 %, ``tight`` up to 100 %.

**While loading** (:mod:`pipeline.models.sharded_load`; a transient before training, not in the
total), per rank:

- fsdp: the weights line plus one parameter's local shard (``to_empty`` allocates each shard,
  FSDP2 copies a short one into its padded size) on the device; on the host one staging buffer
  (:data:`~pipeline.models.sharded_load.CHUNK_BYTES`) that the checkpoint's bytes pass through.
- zero3: the weights line plus the largest unit at full size on the device: DeepSpeed broadcasts
  every parameter from rank 0 before partitioning it, so each root module (the embedding, an
  untied LM head) and each block gets full-size storage while it is converted (the blocks share
  one buffer); on the host the staging buffer.
- single: the whole model on the device, and on the host too (``from_pretrained`` loads it to
  the CPU first).

Before sharded loading every fsdp rank loaded the whole model on the host, and transformers'
zero3 loading read every checkpoint file whole on rank 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pipeline.models.fp32_flow import CHUNK_BYTES as FLOW_CHUNK_BYTES
from pipeline.models.meta import hf_config, meta_model, planning_config_dir
from pipeline.models.selection import select_trainable
from pipeline.models.sharded_load import CHUNK_BYTES
from pipeline.parallel import wants_master
from pipeline.zo.activations import per_rank_cap
from pipeline.zo.methods.zoact import micro_batches

GiB = 1024**3
RUNTIME_BYTES = int(1.5 * GiB)
NF4_BLOCK = 64  # values per absmax (bitsandbytes' default blocksize for 4-bit weights)
NF4_NESTED_BLOCK = 256  # absmax values per fp32 scale of the double quantization
NF4_LAYER_BYTES = (16 + 256 + 1) * 4  # fp32 code tables (NF4's, the absmax's) and absmax offset
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
BACKENDS = ("zero3", "fsdp", "single")
FP32_MOMENTS = ("zo_adam", "zo_sgd_mmt")  # methods whose state is fp32 per trainable element
LINES = ("weights", "gathered", "masters", "method", "activations", "runtime")
LABELS = {
    "weights": "weights ({})",
    "gathered": "gathered for the forward",
    "masters": "fp32 master weights",
    "method": "method state ({})",
    "activations": "activations (forward only)",
    "runtime": "runtime (CUDA, NCCL; assumed)",
}


class PlanError(ValueError):
    """A job that cannot be planned; the message says what to change."""


@dataclass
class Param:
    name: str
    shape: tuple[int, ...]
    block: int | None  # index of the transformer block holding it, None for root parameters
    quantizable: bool  # an nn.Linear weight inside a block (what bitsandbytes quantizes)
    trainable: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local(self, backend: str, world: int) -> int:
        """Elements this rank stores (the largest share)."""
        if backend == "zero3":
            return -(-self.numel // world)
        if backend == "fsdp" and self.shape:
            return -(-self.shape[0] // world) * (self.numel // max(self.shape[0], 1))
        return self.numel


@dataclass
class Plan:
    model: str
    config_dir: str
    nodes: int
    gpus_per_node: int
    backend: str
    dtype: str
    quantization: str | None
    method: str
    total_params: int
    trainable_params: int
    trainable_what: str
    micro_batch: int
    tokens: int
    gpu_memory_gib: float
    memory: dict[str, dict[str, int]] = field(default_factory=dict)  # backend -> line -> bytes
    load: dict[str, dict[str, int]] = field(default_factory=dict)  # backend -> device/host peak

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def total(self, backend: str) -> int:
        return sum(self.memory[backend].values())

    def verdict(self, backend: str) -> str:
        share = self.total(backend) / (self.gpu_memory_gib * GiB)
        if share <= 0.9:
            return f"fits ({share:.0%})"
        return f"tight ({share:.0%})" if share <= 1.0 else f"does not fit ({share:.0%})"


def _blocks(model) -> list[torch.nn.Module]:
    from pipeline.parallel.fsdp import _blocks as blocks

    return blocks(model)


def inventory(model, patterns: list[str]) -> list[Param]:
    block_of = {id(p): i for i, b in enumerate(_blocks(model)) for p in b.parameters()}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    trainable = {n for n, _ in select_trainable(model, patterns)} if patterns else set()
    return [Param(n, tuple(p.shape), block_of.get(id(p)), id(p) in linear and id(p) in block_of,
                  n in trainable)
            for n, p in model.named_parameters()]


def _widths(hf_cfg, model) -> tuple[int, int, int]:
    """Hidden size, MLP width and vocabulary size."""
    hidden = hf_cfg.hidden_size
    mlp = getattr(hf_cfg, "intermediate_size", None) or getattr(hf_cfg, "ffn_dim", None)
    if mlp is None:
        mlp = max(m.out_features for m in _blocks(model)[0].modules()
                  if isinstance(m, torch.nn.Linear))
    return hidden, mlp, hf_cfg.vocab_size


def _linears(model, patterns) -> list[torch.nn.Linear]:
    from pipeline.zo.activations import linear_modules

    return list(linear_modules(model, patterns=patterns).values())


def _pgap_state(cfg, params: list[Param], backend: str, world: int) -> tuple[int, int]:
    """P-GAP's factors on one rank and its refresh's transient. Factors: per trainable matrix
    ``V`` (in·r, replicated), the rows of ``U`` the rank's slice needs
    (:func:`~pipeline.zo.methods.pgap.needed_rows`, the largest over the ranks), ``S`` (float64)
    and the step's core ``Z`` (fp32, r·r); ``U`` and ``V`` in the storage dtype without masters,
    fp32 with them. Transient, for the largest matrix: the range finder's float64 thin products
    (``k = r + 10``: one ``out·k`` in one process, whose QR and rank sum work in place; two on
    sharded backends, the rank's product and the reduced one; one ``in·k``) and one block of
    ``Ĝ``."""
    from pipeline.parallel import wants_master
    from pipeline.zo.methods.pgap import needed_rows
    from pipeline.zo.noise import BLOCK
    from pipeline.zo.range_finder import OVERSAMPLE

    fb = 4 if wants_master(cfg) else DTYPE_BYTES[cfg.model.dtype]
    thin = 1 if backend == "single" else 2  # out·k products alive at once during a refresh
    total, refresh = 0, 0
    for p in params:
        if not p.trainable or len(p.shape) != 2:
            continue
        out, inner = p.shape
        r, k = (min(n, out, inner) for n in (cfg.method.pgap_rank,
                                             cfg.method.pgap_rank + OVERSAMPLE))
        part = p.local(backend, world)
        starts = [0] if backend == "single" else [i * part for i in range(world)]
        rows = max(hi - lo for lo, hi in (needed_rows(p.shape, a, max(0, min(part, p.numel - a)))
                                          for a in starts))
        total += fb * r * (inner + rows) + 8 * r + 4 * r * r
        block = min(max(1, BLOCK // inner), out) * inner  # rows of Ĝ formed at a time
        refresh = max(refresh, 8 * (k * (thin * out + inner) + block))
    return total, refresh


def _method_state(cfg, model, params: list[Param], backend: str, world: int,
                  act_bytes: int) -> tuple[int, int | None]:
    """Bytes of the method's state on one rank, and its trainable count when it is not the
    model's parameters (ZO-Act's coefficients)."""
    m = cfg.method
    local_trainable = sum(p.local(backend, world) for p in params if p.trainable)
    if m.name == "zo_adam":
        return 2 * 4 * local_trainable, None
    if m.name == "zo_sgd_mmt":
        return 4 * local_trainable, None
    if m.name == "bszo":
        k = max(m.bszo_k, m.bszo_m)
        return 8 * (k * k + 2 * k), None
    if m.name == "lozo":
        return sum(4 * (p.shape[0] + p.shape[1]) * m.lozo_rank
                   for p in params if p.trainable and len(p.shape) == 2), None
    if m.name == "pgap":
        return sum(_pgap_state(cfg, params, backend, world)), None
    if m.name == "agzo":
        names = {p.name for p in params if p.trainable}
        hooked = [mod for name, mod in model.named_modules()
                  if isinstance(mod, torch.nn.Linear) and f"{name}.weight" in names]
        inputs = sum(mod.in_features for mod in hooked)
        outputs = sum(mod.out_features for mod in hooked)
        rows = per_rank_cap(m.agzo_max_rows, world)
        return 4 * m.agzo_rank * (inputs + outputs) + rows * inputs * act_bytes, None
    if m.name == "zoact":
        targets = _linears(model, list(m.zoact_targets))
        inputs = sum(mod.in_features for mod in targets)
        coefficients = sum(mod.out_features for mod in targets) * m.zoact_rank
        rows = per_rank_cap(m.zoact_max_rows, world * m.zoact_calib_batches)
        calib = rows * m.zoact_calib_batches * inputs * act_bytes
        return 4 * (m.zoact_rank * inputs + 3 * coefficients) + calib, coefficients
    return 0, None


def nf4_bytes(numel: int) -> int:
    """Bytes of one NF4 weight of ``numel`` values with its quantization state."""
    blocks = -(-numel // NF4_BLOCK)
    return -(-numel // 2) + blocks + 4 * -(-blocks // NF4_NESTED_BLOCK) + NF4_LAYER_BYTES


def _weights(params: list[Param], backend: str, world: int, dtype_bytes: int, nf4: bool) -> int:
    return sum(nf4_bytes(p.local(backend, world)) if nf4 and p.quantizable
               else p.local(backend, world) * dtype_bytes for p in params)


def _gathered(params: list[Param], backend: str, dtype_bytes: int) -> int:
    if backend == "single":
        return 0
    blocks: dict[int, int] = {}
    for p in params:
        if p.block is not None:
            blocks[p.block] = blocks.get(p.block, 0) + p.numel
    block = max(blocks.values(), default=0) * dtype_bytes
    root = [p.numel * dtype_bytes for p in params if p.block is None]
    if backend == "fsdp":
        return sum(root) + 2 * block
    return max(2 * block, max(root, default=0) + block)


def _load_peak(params: list[Param], backend: str, world: int, dtype_bytes: int,
               weights: int) -> dict[str, int]:
    """Peak bytes per rank while the backend loads the model (see the module docstring)."""
    if backend == "single":
        return {"device": weights, "host": weights}
    if backend == "fsdp":
        extra = max(p.local("fsdp", world) for p in params) * dtype_bytes
    else:
        blocks: dict[int, int] = {}
        modules: dict[str, int] = {}
        for p in params:
            if p.block is None:
                module = p.name.rpartition(".")[0]
                modules[module] = modules.get(module, 0) + p.numel
            else:
                blocks[p.block] = blocks.get(p.block, 0) + p.numel
        extra = max([*blocks.values(), *modules.values()]) * dtype_bytes
    return {"device": weights + extra, "host": CHUNK_BYTES}


def make_plan(cfg, *, nodes: int | None = None, gpus_per_node: int | None = None,
              gpu_memory_gib: float = 80.0) -> Plan:
    """The memory plan of job ``cfg`` on ``nodes`` x ``gpus_per_node`` ranks (default: the job's
    ``parallel.nodes`` / ``parallel.gpus_per_node``)."""
    nodes = cfg.parallel.nodes if nodes is None else nodes
    gpus = cfg.parallel.gpus_per_node if gpus_per_node is None else gpus_per_node
    errors = []
    if nodes < 1:
        errors.append(f"nodes={nodes}: a job needs at least 1 node")
    if gpus < 1:
        errors.append(f"gpus per node={gpus}: a job needs at least 1 GPU per node")
    if gpu_memory_gib <= 0:
        errors.append(f"GPU memory={gpu_memory_gib} GiB: give the memory of one GPU in GiB")
    if errors:
        raise PlanError("; ".join(errors))
    world = nodes * gpus
    if cfg.parallel.backend == "single" and world > 1:
        raise PlanError(f"parallel.backend=single runs on one GPU, not {nodes}x{gpus}; use "
                        "--nodes 1 --gpus-per-node 1 or parallel.backend=fsdp/zero3")
    hf_cfg = hf_config(cfg.model)
    model = meta_model(cfg.model, hf_cfg)
    # LoRA adapters and ZO-Act's coefficients are not model weights: model.trainable plays no part
    params = inventory(model, cfg.model.trainable if cfg.method.tuning == "full" else [])
    quant = getattr(cfg.model, "quantization", None)
    quant = None if quant in (None, "none") else quant
    dtype_bytes = DTYPE_BYTES[cfg.model.dtype]
    act_bytes = 2 if quant else dtype_bytes
    hidden, mlp, vocab = _widths(hf_cfg, model)
    train_micro = -(-cfg.train.batch_size // world)
    eval_micro = -(-cfg.train.eval_batch_size // world)
    micro = max(train_micro, eval_micro)
    tokens = cfg.data.max_length
    # ZO-Act on a 16-bit or 4-bit base runs its forwards in fp32 from the first adapted layer
    # on, a training batch in zoact_micro_batches forwards (0: 2); evaluation in one
    flow = cfg.method.name == "zoact" and (quant is not None or dtype_bytes < 4)
    rows = micro
    if flow:
        rows = max(-(-train_micro // micro_batches(cfg.method, flow=True)), eval_micro)
    activations = (rows * tokens * (6 * hidden + 3 * mlp) * (4 if flow else act_bytes)
                   + 2 * rows * vocab * 4 + (FLOW_CHUNK_BYTES if flow else 0))

    _, coefficients = _method_state(cfg, model, params, "single", 1, act_bytes)
    plan = Plan(
        model=cfg.model.name_or_path, config_dir=str(planning_config_dir(cfg.model)),
        nodes=nodes, gpus_per_node=gpus, backend=cfg.parallel.backend, dtype=cfg.model.dtype,
        quantization=quant, method=cfg.method.name,
        total_params=sum(p.numel for p in params),
        trainable_params=(coefficients if coefficients is not None
                          else sum(p.numel for p in params if p.trainable)),
        trainable_what="ZO-Act coefficients" if coefficients is not None else "parameters",
        micro_batch=micro, tokens=tokens, gpu_memory_gib=gpu_memory_gib,
    )
    backends = ("single",) if world == 1 and cfg.parallel.backend == "single" else BACKENDS[:2]
    if world == 1 and "single" not in backends:
        backends = (*backends, "single")
    masters = wants_master(cfg) and cfg.method.name != "zoact"
    for backend in backends:
        state, _ = _method_state(cfg, model, params, backend, world, act_bytes)
        plan.memory[backend] = {
            "weights": _weights(params, backend, world, dtype_bytes, quant == "nf4"),
            "gathered": _gathered(params, backend, dtype_bytes),
            "masters": 4 * sum(p.local(backend, world) for p in params if p.trainable)
            if masters else 0,
            "method": state,
            "activations": activations,
            "runtime": RUNTIME_BYTES,
        }
        plan.load[backend] = _load_peak(params, backend, world, dtype_bytes,
                                        plan.memory[backend]["weights"])
    return plan


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def format_plan(plan: Plan) -> str:
    storage = "nf4 (4-bit) base" if plan.quantization == "nf4" else plan.dtype
    lines = [
        f"model:  {plan.model} (config {plan.config_dir})",
        f"params: {_count(plan.total_params)} total, {_count(plan.trainable_params)} trainable "
        f"({plan.trainable_what}; method {plan.method}, storage {storage})",
        f"world:  {plan.nodes} node(s) x {plan.gpus_per_node} GPU(s) = {plan.world} rank(s); "
        f"micro-batch {plan.micro_batch} x {plan.tokens} tokens per rank",
        "",
        f"{'per-rank memory, GiB':32s}" + "".join(
            f"{b + ('*' if b == plan.backend else ''):>12s}" for b in plan.memory),
    ]
    for line in LINES:
        what = plan.method + (", fp32 moments" if plan.method in FP32_MOMENTS else "")
        label = LABELS[line].format(storage if line == "weights" else what)
        lines.append(f"  {label:30s}" + "".join(
            f"{plan.memory[b][line] / GiB:12.2f}" for b in plan.memory))
    lines.append(f"  {'total':30s}" + "".join(f"{plan.total(b) / GiB:12.2f}"
                                               for b in plan.memory))
    lines.append(f"{'while loading, peak (not in total)':32s}")
    for where in ("device", "host"):
        lines.append(f"  {where:30s}" + "".join(f"{plan.load[b][where] / GiB:12.2f}"
                                                 for b in plan.memory))
    lines.append(f"verdict vs {plan.gpu_memory_gib:g} GiB per GPU")
    for b in plan.memory:
        lines.append(f"  {b + ('*' if b == plan.backend else ''):8s} {plan.verdict(b)}")
    lines.append(f"(* the job's backend, parallel.backend={plan.backend})")
    return "\n".join(lines)
