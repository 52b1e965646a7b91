"""Unlearning: the module, the hard freeze and the methods (one small object each, looked up by name); ``Auto`` is
the default request."""

from lightning_unlearn.unlearn.adapters.functional import unlearn_model
from lightning_unlearn.unlearn.base import ShardSampler, UnlearnMethod
from lightning_unlearn.unlearn.methods.auto import Auto
from lightning_unlearn.unlearn.methods.baselines import SCRUB, L1Sparse, RandomLabel
from lightning_unlearn.unlearn.methods.iterative import Finetune, NegGradPlus
from lightning_unlearn.unlearn.methods.one_step import FirstOrder, FirstOrderRemoval
from lightning_unlearn.unlearn.methods.sam import SamForget, SharpMinMax
from lightning_unlearn.unlearn.methods.second_order import SecondOrder
from lightning_unlearn.unlearn.methods.ssd import SSD
from lightning_unlearn.unlearn.module import UnlearnModule
from lightning_unlearn.unlearn.request.freeze import FreezeGuard

METHODS: dict[str, type[UnlearnMethod]] = {
    cls.name: cls
    for cls in (Auto, FirstOrder, SecondOrder, Finetune, NegGradPlus, SamForget, SharpMinMax, SSD)
    + (FirstOrderRemoval, RandomLabel, L1Sparse, SCRUB)
}


def get_method(name: str, **kwargs) -> UnlearnMethod:
    """Build a method by name (one of :data:`METHODS`)."""
    if name not in METHODS:
        raise ValueError(f"`method` must be one of {tuple(METHODS)}, got {name!r}.")
    return METHODS[name](**kwargs)


__all__ = [
    "METHODS",
    "Auto",
    "Finetune",
    "FirstOrder",
    "FirstOrderRemoval",
    "FreezeGuard",
    "L1Sparse",
    "NegGradPlus",
    "RandomLabel",
    "SCRUB",
    "SamForget",
    "SSD",
    "SecondOrder",
    "ShardSampler",
    "SharpMinMax",
    "UnlearnMethod",
    "UnlearnModule",
    "get_method",
    "unlearn_model",
]
