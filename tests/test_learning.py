"""MeZO actually optimises: on a tiny model and a fixed batch, the loss goes down."""

import torch

from pipeline.config import MethodConfig
from pipeline.parallel import trainable_names
from pipeline.parallel.single import SingleBackend
from pipeline.zo.methods import StepContext
from pipeline.zo.methods.mezo import MeZO


def test_mezo_lowers_the_loss_of_a_fixed_batch(tiny_model, tiny_batch):
    trainable = trainable_names(tiny_model, ["*"])
    backend = SingleBackend(tiny_model, trainable, torch.device("cpu"), master=False)
    mezo = MeZO(MethodConfig(lr=2e-3, eps=1e-3), backend.shards())
    start = backend.loss(tiny_batch).item()
    for step in range(300):
        mezo.step(StepContext(step, 0, 2e-3, tiny_batch, backend))
    end = backend.loss(tiny_batch).item()
    assert end < start - 0.1, (start, end)
