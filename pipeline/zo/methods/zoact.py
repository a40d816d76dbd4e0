"""ZO-Act: an activation basis once, ZO-estimated coefficients trained with Adam (arXiv
2607.01125).

RECONSTRUCTION: the paper's body could not be read; this follows its summary and METHODS.md.

Parameterization (per targeted ``nn.Linear``, ``method.zoact_targets`` fnmatch patterns over
module names): ``y = W x + C (Vᵀ x)`` (:class:`pipeline.models.adapters.CoefficientAdapter`,
a forward hook), ``W`` frozen (it may be sharded or quantized), ``V`` (in, r) the top-r
eigenvectors of the accumulated ``Σ XᵀX`` of the layer's inputs over calibration batches,
``C`` (out, r) fp32, initialised to 0, ``r = zoact_rank``. The trainable variables are the
coefficients only: with ``method.tuning=coefficients`` (``jobs/zoact.yaml``) the backend hands
out no weight shards at all, so checkpoints carry no weights that never change (any shards given
are left untouched), and the frozen base may be quantized (``model.quantization=nf4``).

Calibration ("init, once"). Design: the unperturbed forwards ``L0`` of the first
``n = zoact_calib_batches`` steps ARE the calibration pass: forward pre-hooks
(:class:`pipeline.zo.activations.RowCapture`) keep each distinct input's non-padding rows (at
most ``zoact_max_rows`` over all calibration batches and ranks, sampled with the calibration
seed). Steps ``0..n-2`` only record (1 forward, no update, logged with ``calibrating: true``);
at step ``n-1`` ``V`` is computed right after that step's ``L0`` forward, the adapters are
attached with ``C = 0`` (on an fp32 base this leaves the outputs bitwise unchanged, so that
``L0`` is ``L(C=0)``; on a 16-bit or 4-bit base the adapted model runs in fp32 from the first
adapted layer on (:mod:`pipeline.models.adapters`), so ``L(C=0)`` is measured once more, one extra
forward in that step) and the step trains ``C`` as every later one. Why: the method only sees
each step's batch, and this uses ``n`` distinct training batches (the ones the trainer serves
first, each rank its own micro-batch) with no trainer support and no extra forward on an fp32
base; it costs ``n - 1`` steps without an update (1 forward each). :meth:`ZOAct.calibrate` does
the same on explicit batches (tests, or a trainer that prefers to calibrate before step 0).

``V`` is computed by subspace iteration on the captured rows (block of ``r + 4`` columns,
``zoact_calib_iters`` iterations, then a Rayleigh–Ritz step so the columns are the ordered
top-r eigenvectors), never forming ``XᵀX`` (``in²`` values per layer: 0.5 GB in fp32 for a 7B
down_proj): :func:`pipeline.zo.activations.subspace_bases`, whose per-iteration all-reduce of
``Xᵀ(XQ)`` makes ``V`` the basis of all ranks' calibration data and bitwise the same on every
rank. Memory during calibration: the captured rows (``cap · Σ_g in_g`` elements of the
activations' dtype, ``cap`` = ``zoact_max_rows`` per rank share), freed once ``V`` is known.

Per step (after calibration), seeds ``s_i = step_seed(run seed, step, i)``, ``μ = method.eps``:

1. ``L0 = L(C)``;
2. for ``i = 1..q`` (``q = zoact_q``): ``Z_i ~ N(0, I)`` (out, r) per layer, drawn from ``s_i``
   keyed by ``"<module>::zoact.Z"`` (:func:`pipeline.zo.noise.gaussian`, the same on every
   rank), ``f_i = L(C + μ Z_i)``; the adapters' coefficients are then restored by a copy of
   ``C`` (bitwise);
3. ``ĝ = (1/q) Σ_i (f_i - L0)/μ · Z_i`` (fp32, summed in the order ``i``);
4. ``C ← Adam(C, ĝ)``: ``torch.optim.Adam`` (``foreach=False``) on the fp32 CPU coefficient
   tensors with ``betas = (adam_beta1, adam_beta2)``, ``eps = adam_eps``, ``lr = ctx.lr``.

``q + 1`` evaluations of the batch per step. Under the fp32 flow each evaluation runs in
``zoact_micro_batches`` forwards of consecutive examples (default 2; the loss is their row-
weighted mean), so the fp32 activations take the bytes of one 16-bit forward (design, not the
paper's: the flow is ours); on fsdp/zero3 each forward gathers the weights again. The step that
finishes the calibration returns the heap it grew (``malloc_trim``). ``method.two_sided``,
``n_directions`` and ``weight_decay`` are not used. A non-finite loss skips the update (the
coefficients are already restored).

Communication per step: one all-gather of ``q + 1`` loss scalars (float64 mean in rank order).
Every rank then holds the same scalars and seeds, so ``ĝ`` and Adam's update are computed
identically everywhere and ``C`` stays replicated without being sent. Calibration adds
``zoact_calib_iters + 1`` all-gathers of ``Σ_g in_g · (r + 4)`` float64 values, once.

State (:meth:`state_dict`, kilobytes, replicated, saved by rank 0): the target names, ``V``,
``C`` and Adam's state; resume is exact once calibrated. A checkpoint taken during the
calibration steps (step < ``zoact_calib_batches``) holds no rows: resuming restarts the
calibration on the following batches (not bitwise the uninterrupted run).

Replay: the log holds ``seeds`` and ``projected_grad`` = ``[(f_i - L0)/μ]`` per step, from which
:meth:`replay` reproduces ``ĝ`` and the Adam trajectory of ``C`` bitwise, but only given ``V``
(and ``C``/Adam at the log's start): load the method state of a checkpoint taken after the
calibration, then replay the later records. The model weights are never changed, so exporting
the trained model needs ``W + C Vᵀ`` (:meth:`CoefficientAdapter.merged_weight`).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from pipeline.heap import release_free_memory
from pipeline.models.adapters import CoefficientAdapter
from pipeline.models.fp32_flow import Fp32Flow
from pipeline.zo.activations import RowCapture, linear_modules, per_rank_cap, subspace_bases
from pipeline.zo.directions import f32
from pipeline.zo.methods.base import StepContext, StepStats
from pipeline.zo.noise import gaussian
from pipeline.zo.seeds import name_key, step_seed
from pipeline.zo.shards import ParamShard

CALIBRATION = 1 << 30  # the "direction" index of the calibration seed
OVERSAMPLE = 4



def micro_batches(cfg: Any, flow: bool) -> int:
    """Forwards per evaluation of a training batch: ``cfg.zoact_micro_batches``, or for 0, 2
    under the fp32 flow (a 16-bit or 4-bit base) and 1 otherwise."""
    return cfg.zoact_micro_batches or (2 if flow else 1)


class ZOAct:
    def __init__(self, cfg: Any, shards: list[ParamShard]):
        self.cfg = cfg
        self.shards = shards  # frozen: ZO-Act trains its coefficients only
        self.rank = cfg.zoact_rank
        self.names: list[str] = []
        self.V: dict[str, torch.Tensor] = {}
        self.C: dict[str, torch.Tensor] = {}
        self.optimizer: torch.optim.Adam | None = None
        self.adapters: dict[str, CoefficientAdapter] = {}
        self._flow: Fp32Flow | None = None
        self._capture: RowCapture | None = None
        self._seen = 0

    @property
    def calibrated(self) -> bool:
        return bool(self.V)

    def _targets(self, model) -> dict[str, torch.nn.Module]:
        found = linear_modules(model, patterns=list(self.cfg.zoact_targets))
        if not found:
            raise ValueError(f"method.zoact_targets {self.cfg.zoact_targets} matched no "
                             "nn.Linear module")
        return found

    # -- calibration ------------------------------------------------------------------------

    def _observe(self, backend, batch, run_seed: int) -> torch.Tensor:
        """One calibration forward: this rank's ``L0`` (with ``C = 0``), rows captured."""
        if self._capture is None:
            cap = per_rank_cap(self.cfg.zoact_max_rows,
                               backend.world_size * self.cfg.zoact_calib_batches)
            self._capture = RowCapture(self._targets(backend.model), cap,
                                       step_seed(run_seed, 0, CALIBRATION))
        with self._capture.record(getattr(batch, "attention_mask", None)):
            loss = backend.loss(batch)
        self._seen += 1
        return loss

    def _finish(self, backend, run_seed: int) -> None:
        """``V`` from the captured rows (all ranks), ``C = 0``, Adam, adapters."""
        capture = self._capture
        bases = subspace_bases(capture.groups(), self.rank, self.cfg.zoact_calib_iters,
                               step_seed(run_seed, 0, CALIBRATION), backend.all_reduce_mean,
                               oversample=OVERSAMPLE, ritz=True)
        modules = capture.modules
        self.names = [n for n in modules if n in capture.group_of]
        self.V = {n: bases[capture.group_of[n]] for n in self.names}
        self.C = {n: torch.zeros(modules[n].out_features, self.V[n].shape[1])
                  for n in self.names}
        self._capture, self._seen = None, 0
        release_free_memory()  # the calibration rows are freed: keep the heap from holding them
        self._new_optimizer()
        self._attach(backend.model)

    def calibrate(self, backend, batches, run_seed: int = 0) -> list[float]:
        """Calibrate on explicit batches (this rank's micro-batches; every rank the same count)
        and return their all-reduced losses. A no-op once calibrated (e.g. after a resume)."""
        if self.calibrated:
            return []
        local = [self._observe(backend, b, run_seed) for b in batches]
        self._finish(backend, run_seed)
        return backend.all_reduce_mean(torch.stack(local)).tolist()

    def _new_optimizer(self) -> None:
        self.optimizer = torch.optim.Adam(
            [self.C[n] for n in self.names], lr=0.0, foreach=False,
            betas=(self.cfg.adam_beta1, self.cfg.adam_beta2), eps=self.cfg.adam_eps)

    def _attach(self, model) -> None:
        if self.adapters:
            return
        modules = dict(model.named_modules())
        self.adapters = {n: CoefficientAdapter(modules[n], self.V[n], self.C[n]).attach()
                         for n in self.names}
        if any(modules[n].weight.dtype != torch.float32 for n in self.names):
            self._flow = Fp32Flow(model).attach()  # the adapters' fp32 outputs run on in fp32

    def detach(self) -> None:
        """Remove the adapters' hooks (the model is then the frozen base model again)."""
        for adapter in self.adapters.values():
            adapter.detach()
        self.adapters = {}
        if self._flow is not None:
            self._flow.detach()
            self._flow = None

    # -- the step -----------------------------------------------------------------------------

    def noise(self, seed: int, name: str) -> torch.Tensor:
        """``Z`` (out, r) of ``seed`` for layer ``name`` (fp32, CPU, replicated)."""
        out, r = self.C[name].shape
        return gaussian(seed, name_key(name + "::zoact.Z"), 0, out * r).view(out, r)

    def _set(self, seed: int | None) -> None:
        """Adapters at ``C + μ Z(seed)`` (``seed`` None: at ``C``)."""
        mu = f32(self.cfg.eps)
        for name, adapter in self.adapters.items():
            if seed is None:
                adapter.set(self.C[name])
            else:
                adapter.set(self.noise(seed, name).mul_(mu).add_(self.C[name]))

    def _loss(self, backend, batch) -> torch.Tensor:
        """This rank's loss of ``batch`` at the adapters' current ``C``: under the fp32 flow
        in ``zoact_micro_batches`` forwards (0: 2 there, else 1), their losses averaged over
        rows in float64 (the whole batch's loss is the mean over its rows)."""
        pieces = batch.parts(micro_batches(self.cfg, self._flow is not None))
        if len(pieces) == 1:
            return backend.loss(batch)
        total = sum(backend.loss(p).double() * p.input_ids.shape[0] for p in pieces)
        return (total / batch.input_ids.shape[0]).float()

    def step(self, ctx: StepContext) -> StepStats:
        backend = ctx.backend
        recomputed = 0
        calibrating = not self.calibrated
        if calibrating:
            l0 = self._observe(backend, ctx.batch, ctx.run_seed)
            if self._seen < self.cfg.zoact_calib_batches:
                loss = backend.all_reduce_mean(l0.reshape(1)).item()
                return StepStats(loss, [], 1, [], extra={"calibrating": True})
            self._finish(backend, ctx.run_seed)
            if self._flow is not None:  # L(C = 0) again, in the fp32 arithmetic of the probes
                l0 = self._loss(backend, ctx.batch)
                recomputed = 1
        else:
            self._attach(backend.model)
            l0 = self._loss(backend, ctx.batch)
        seeds = [step_seed(ctx.run_seed, ctx.step, i) for i in range(self.cfg.zoact_q)]
        local = [l0]
        for seed in seeds:
            self._set(seed)
            local.append(self._loss(backend, ctx.batch))
        self._set(None)
        if calibrating:  # the heap the calibration and the first fp32 forwards grew, returned
            release_free_memory()
        losses = backend.all_reduce_mean(torch.stack(local)).tolist()
        forwards = len(local) + recomputed
        if not all(math.isfinite(v) for v in losses):
            return StepStats(math.nan, [math.nan] * len(seeds), forwards, seeds, skipped=True)
        grads = [(f - losses[0]) / self.cfg.eps for f in losses[1:]]
        self._apply(seeds, grads, ctx.lr)
        return StepStats(losses[0], grads, forwards, seeds)

    def estimate(self, seeds: list[int], grads: list[float]) -> dict[str, torch.Tensor]:
        """``ĝ = (1/q) Σ_i g_i Z_i`` per layer (step 3)."""
        coeffs = [f32(g / len(seeds)) for g in grads]
        out = {}
        for name in self.names:
            total = self.noise(seeds[0], name).mul_(coeffs[0])
            for seed, c in zip(seeds[1:], coeffs[1:]):
                total.add_(self.noise(seed, name).mul_(c))
            out[name] = total
        return out

    def _apply(self, seeds: list[int], grads: list[float], lr: float) -> None:
        """Step 4: Adam on ``C`` with ``.grad = ĝ``; the adapters then hold the new ``C``."""
        estimate = self.estimate(seeds, grads)
        for name in self.names:
            self.C[name].grad = estimate[name]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for name in self.names:
            self.C[name].grad = None
        self._set(None)

    def replay(self, record: dict[str, Any]) -> None:
        """Re-apply a logged step to ``C`` (needs ``V``, ``C`` and Adam's state at the log's
        start, from :meth:`load_state_dict`); calibration records are skipped."""
        if record.get("calibrating") or record.get("skipped"):
            return
        if not self.calibrated:
            raise RuntimeError(
                "ZO-Act replay needs the basis V, which comes from activations and is not in the "
                "update log: load the method state of a checkpoint taken after the calibration "
                "steps, then replay the later records"
            )
        self._apply(record["seeds"], record["projected_grad"], record["lr"])

    # -- export -----------------------------------------------------------------------------

    def merge_into(self, model) -> list[str]:
        """Write ``W + C Vᵀ`` (fp32 sum, cast to ``W``'s dtype) into each target layer of an
        unsharded, unquantized ``model`` and remove the hooks: the result is a plain model
        whose forward equals the adapted one's (to ``W``'s rounding). Returns the layers."""
        self.detach()
        modules = dict(model.named_modules())
        for name in self.names:
            weight = modules[name].weight
            if not weight.is_floating_point() or weight.dtype.itemsize < 2:
                raise ValueError(f"{name} has a {weight.dtype} (quantized) weight: C Vᵀ cannot "
                                 "be merged into it; export the adapter alone (--adapter-only)")
            merged = weight.detach().float() + self.C[name] @ self.V[name].T
            with torch.no_grad():
                weight.copy_(merged.to(weight.dtype))
        return list(self.names)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """``{"<layer>.V": (in, r), "<layer>.C": (out, r)}`` fp32: the whole trained state
        (copies: layers fed the same input share one ``V``, which safetensors refuses)."""
        out = {}
        for name in self.names:
            out[f"{name}.V"] = self.V[name].clone()
            out[f"{name}.C"] = self.C[name].detach().clone()
        return out

    def state_dict(self) -> dict[str, Any]:
        if not self.calibrated:
            return {"names": []}
        return {"names": list(self.names), "V": dict(self.V),
                "C": {n: c.detach().clone() for n, c in self.C.items()},
                "adam": copy.deepcopy(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detach()
        self._capture, self._seen = None, 0
        self.names = list(state.get("names", []))
        if not self.names:
            self.V, self.C, self.optimizer = {}, {}, None
            return
        self.V = {n: state["V"][n].float().cpu() for n in self.names}
        self.C = {n: state["C"][n].float().cpu().clone() for n in self.names}
        self._new_optimizer()
        # a deep copy: Adam would otherwise adopt the given tensors and update them in place
        self.optimizer.load_state_dict(copy.deepcopy(state["adam"]))
