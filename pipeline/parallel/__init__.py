"""Execution backends: how the trainable parameters are held and how ranks talk."""

from pipeline.parallel.single import SingleBackend

BACKENDS = {"single": SingleBackend}


def build_backend(cfg, model, trainable, device):
    return BACKENDS[cfg.parallel.backend](model, trainable, device, master=wants_master(cfg))


def wants_master(cfg) -> bool:
    """fp32 masters: explicit, or by default for 16-bit storage."""
    if cfg.precision.master_weights == "auto":
        return cfg.model.dtype != "fp32"
    return cfg.precision.master_weights == "fp32"
