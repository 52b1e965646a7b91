"""The estimators by name: :data:`ESTIMATORS` and :func:`get_estimator`."""

from __future__ import annotations

from typing import Any

from lightning_unlearn.curvature.base import CurvatureEstimator
from lightning_unlearn.curvature.exact import ExactDiagonal
from lightning_unlearn.curvature.fisher import EmpiricalFisher
from lightning_unlearn.curvature.hutchinson import HutchinsonDiagonal
from lightning_unlearn.curvature.mc import MonteCarloGGN

__all__ = ["ESTIMATORS", "estimator_class", "get_estimator"]

#: Estimator classes by registry name (each class's ``name``).
ESTIMATORS: dict[str, type[CurvatureEstimator]] = {
    cls.name: cls for cls in (ExactDiagonal, MonteCarloGGN, HutchinsonDiagonal, EmpiricalFisher)
}


def estimator_class(name: str) -> type[CurvatureEstimator]:
    """The estimator class registered as ``name``.

    Raises:
        ValueError: For an unknown name, listing the allowed values.
    """
    if not isinstance(name, str) or name not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {sorted(ESTIMATORS)}, got {name!r}.")
    return ESTIMATORS[name]


def get_estimator(name: str | CurvatureEstimator, **kwargs: Any) -> CurvatureEstimator:
    """Build an estimator from its registry name (``exact``, ``mc``, ``hutchinson``, ``fisher``).

    Args:
        name: Registry name, or an estimator instance (returned as is; no keyword arguments allowed then).
        **kwargs: Options of the estimator class (e.g. ``strict``, ``num_draws``, ``num_probes``, ``loss_fn``,
            ``max_memory_mb``).

    Raises:
        ValueError: For an unknown name (listing the allowed values) or options given with an instance.
    """
    if isinstance(name, CurvatureEstimator):
        if kwargs:
            raise ValueError("options cannot be given together with an estimator instance")
        return name
    return estimator_class(name)(**kwargs)
