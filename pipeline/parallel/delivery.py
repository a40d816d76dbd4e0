"""How a backend delivers a perturbation to the weights a forward reads: the shared part.

A method asks for ``backend.loss(batch, at=perturbation)``; the backend runs the forward inside
:meth:`Delivery.applying`, and its hooks (:mod:`pipeline.parallel.swap_delivery` for the single
and ZeRO-3 backends, :mod:`pipeline.parallel.fsdp_delivery` for FSDP2) write the perturbed values
of each unit's shards just before that unit's weights are gathered or used, from transient
buffers, never into the stored weights. After the forward every trainable shard must have been
delivered at least once: a model that reads a trainable weight outside the module that owns it
would otherwise run a silently unperturbed forward, and that is an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.zo.perturbation import Perturbation
from pipeline.zo.shards import ParamShard


class UndeliveredPerturbation(RuntimeError):
    """A perturbed forward ran without reaching some trainable weights."""


def check_delivered(shards: list[ParamShard], delivered: set[str], forward: str) -> None:
    """Raise if a trainable shard (with elements) is not among the ``delivered`` names."""
    missing = [s.name for s in shards if s.numel and s.name not in delivered]
    if missing:
        raise UndeliveredPerturbation(
            f"the {forward} forward never reached {len(missing)} trainable weight(s) "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): the model "
            "reads them outside the forward of the module that owns them; exclude them "
            "with model.trainable"
        )


class Delivery:
    """The perturbation of the forward in progress, and the shards that have received it."""

    def __init__(self, shards: list[ParamShard]):
        self.shards = shards
        self.active: Perturbation | None = None
        self.delivered: set[str] = set()

    @contextmanager
    def applying(self, at: Perturbation | None) -> Iterator[None]:
        """Run the forward of the block with ``at`` delivered (``None``: the stored weights)."""
        self.active, self.delivered = at, set()
        try:
            yield
        finally:
            self.active = None
            self.release()
        if at is not None:
            check_delivered(self.shards, self.delivered, "perturbed")

    def release(self) -> None:
        """Drop whatever a hook still holds (after an exception in the forward)."""

    def write(self, shard: ParamShard, dst, offset: int = 0) -> None:
        """The active perturbation's values of ``shard`` into ``dst``; records the delivery."""
        self.active.write(shard, dst, offset)
        self.delivered.add(shard.name)
