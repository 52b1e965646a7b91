"""Unlearning: the module, the hard freeze and the methods (one small object each, looked up by name)."""

from lightning_unlearn.unlearn.base import ShardSampler, UnlearnMethod
from lightning_unlearn.unlearn.freeze import FreezeGuard
from lightning_unlearn.unlearn.functional import unlearn_model
from lightning_unlearn.unlearn.iterative import Finetune, NegGradPlus
from lightning_unlearn.unlearn.module import UnlearnModule
from lightning_unlearn.unlearn.one_step import FirstOrder, SecondOrder
from lightning_unlearn.unlearn.sam import SamForget, SharpMinMax
from lightning_unlearn.unlearn.ssd import SSD

METHODS: dict[str, type[UnlearnMethod]] = {
    cls.name: cls for cls in (FirstOrder, SecondOrder, Finetune, NegGradPlus, SamForget, SharpMinMax, SSD)
}


def get_method(name: str, **kwargs) -> UnlearnMethod:
    """Build a method by name (one of :data:`METHODS`)."""
    if name not in METHODS:
        raise ValueError(f"`method` must be one of {tuple(METHODS)}, got {name!r}.")
    return METHODS[name](**kwargs)


__all__ = [
    "METHODS",
    "Finetune",
    "FirstOrder",
    "FreezeGuard",
    "NegGradPlus",
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
