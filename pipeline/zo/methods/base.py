"""The interface every ZO method implements.

A method owns how directions are drawn, how many forwards a step takes, how loss differences
become an update, and its own small state. It sees only ParamShards and the backend's loss and
all-reduce, so it runs unchanged on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.zo.shards import ParamShard


class ReplayUnsupported(RuntimeError):
    """A method whose update log does not define its updates (e.g. AGZO's activation bases)."""


@dataclass
class StepContext:
    step: int
    run_seed: int
    lr: float
    batch: Any
    backend: Any


@dataclass
class StepStats:
    loss: float
    projected_grad: list[float]
    forwards: int
    seeds: list[int] = field(default_factory=list)
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # more of what defines the update, logged


class ZOMethod(Protocol):
    shards: list[ParamShard]

    def step(self, ctx: StepContext) -> StepStats: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
