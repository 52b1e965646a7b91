"""Curvature: estimators of the training-loss Hessian diagonal, the profile that stores it, the profiling loop.

=============  ==============================================  =========================================
name           estimates                                       how
=============  ==============================================  =========================================
``exact``      diag of the generalised Gauss-Newton (GGN);     backprop of a ``C-1`` column factor of the
               equals diag(H) for piecewise-linear networks    cross-entropy Hessian, per-sample squares
``mc``         diag(GGN), unbiased, non-negative               ``k`` sampled labels per input
``hutchinson`` diag(H) for any twice-differentiable network    ``E[v * Hv]``, Rademacher ``v``
``fisher``     diag of the empirical Fisher                    per-sample squared gradients, true labels
=============  ==============================================  =========================================

One module per estimator (:mod:`.exact`, :mod:`.mc`, :mod:`.fisher`, :mod:`.hutchinson`), the interface in
:mod:`.base`, the registry in :mod:`.registry`, the architecture check in :mod:`.checks`; ``exact``, ``mc`` and
``fisher`` share :class:`~.squared.SquaredGradientEstimator` and the private per-sample squared-gradient engine
(:mod:`._engine`, one module per layer kind). The profiling loop is :mod:`.compute`, the stored result :mod:`.profile`.
"""

from lightning_unlearn.curvature.base import CurvatureEstimator
from lightning_unlearn.curvature.checks import check_exact, find_inexact_modules
from lightning_unlearn.curvature.compute import accumulate_diagonal, default_batch_transform, profile_model
from lightning_unlearn.curvature.exact import ExactDiagonal
from lightning_unlearn.curvature.fisher import EmpiricalFisher
from lightning_unlearn.curvature.hutchinson import HutchinsonDiagonal
from lightning_unlearn.curvature.mc import MonteCarloGGN
from lightning_unlearn.curvature.profile import (
    LayerStats,
    SharpnessProfile,
    architecture_fingerprint,
    layer_of,
    weights_fingerprint,
)
from lightning_unlearn.curvature.registry import ESTIMATORS, get_estimator

__all__ = [
    # estimators
    "ESTIMATORS",
    "CurvatureEstimator",
    "EmpiricalFisher",
    "ExactDiagonal",
    "HutchinsonDiagonal",
    "MonteCarloGGN",
    "get_estimator",
    # architecture check
    "check_exact",
    "find_inexact_modules",
    # profiling
    "accumulate_diagonal",
    "default_batch_transform",
    "profile_model",
    # the profile
    "LayerStats",
    "SharpnessProfile",
    "architecture_fingerprint",
    "layer_of",
    "weights_fingerprint",
]
