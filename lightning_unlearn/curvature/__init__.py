"""Curvature: estimators of the training-loss Hessian diagonal, the profile that stores it, the profiling loop."""

from lightning_unlearn.curvature.compute import (
    accumulate_diagonal,
    default_batch_transform,
    profile_model,
    reduce_diagonal_sums,
)
from lightning_unlearn.curvature.estimators import (
    ESTIMATORS,
    CurvatureEstimator,
    EmpiricalFisher,
    ExactDiagonal,
    HutchinsonDiagonal,
    MonteCarloGGN,
    check_exact,
    find_inexact_modules,
    get_estimator,
    init_sums,
    make_generator,
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
    "EmpiricalFisher",
    "ExactDiagonal",
    "HutchinsonDiagonal",
    "LayerStats",
    "MonteCarloGGN",
    "SharpnessProfile",
    "accumulate_diagonal",
    "architecture_fingerprint",
    "check_exact",
    "default_batch_transform",
    "find_inexact_modules",
    "get_estimator",
    "init_sums",
    "layer_of",
    "make_generator",
    "profile_model",
    "reduce_diagonal_sums",
    "weights_fingerprint",
]
