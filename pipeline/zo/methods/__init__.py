"""ZO methods, one file each, behind one interface (:mod:`pipeline.zo.methods.base`)."""

from pipeline.zo import noise_cache
from pipeline.zo.methods.agzo import AGZO
from pipeline.zo.methods.base import StepContext, StepStats, ZOMethod
from pipeline.zo.methods.bszo import BSZO
from pipeline.zo.methods.lozo import LOZO
from pipeline.zo.methods.mezo import MeZO
from pipeline.zo.methods.pgap import PGAP
from pipeline.zo.methods.zo_adam import ZOAdam
from pipeline.zo.methods.zo_sgd import ZOSGDMomentum, ZOSGDSign
from pipeline.zo.methods.zoact import ZOAct

METHODS: dict[str, type[ZOMethod]] = {"mezo": MeZO, "bszo": BSZO, "zo_adam": ZOAdam, "lozo": LOZO,
                                      "agzo": AGZO, "zoact": ZOAct, "pgap": PGAP,
                                      "zo_sgd_mmt": ZOSGDMomentum, "zo_sgd_sign": ZOSGDSign}

__all__ = ["METHODS", "StepContext", "StepStats", "ZOMethod", "build_method"]


def build_method(cfg, shards) -> ZOMethod:
    """The configured method over this rank's shards (their noise kind and cache set from
    ``method.noise`` and ``method.cache_noise``)."""
    m = cfg.method
    cache = None
    if m.cache_noise:
        cache = noise_cache.plan(shards, m.bszo_k if m.name == "bszo" else m.n_directions)
    for shard in shards:
        shard.noise, shard.cache = m.noise, cache
    return METHODS[m.name](m, shards)
