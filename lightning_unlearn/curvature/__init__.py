"""Curvature: estimators of the training-loss Hessian diagonal, the profile that stores it, the profiling loop."""

from lightning_unlearn.curvature.compute import accumulate_diagonal, default_batch_transform, profile_model
from lightning_unlearn.curvature.estimators import (
    ESTIMATORS,
    CurvatureEstimator,
    check_exact,
    find_inexact_modules,
    get_estimator,
)
from lightning_unlearn.curvature.profile import (
    LayerStats,
    SharpnessProfile,
    architecture_fingerprint,
    layer_of,
    weights_fingerprint,
)

__all__ = [
    "ESTIMATORS",
    "CurvatureEstimator",
    "LayerStats",
    "SharpnessProfile",
    "accumulate_diagonal",
    "architecture_fingerprint",
    "check_exact",
    "default_batch_transform",
    "find_inexact_modules",
    "get_estimator",
    "layer_of",
    "profile_model",
    "weights_fingerprint",
]
