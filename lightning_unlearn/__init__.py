"""lightning-unlearn: sharpness-aware machine unlearning for PyTorch Lightning.

The public API, by what a user does with it (the subpackages hold the rest; ``docs/architecture.md`` is the map):

* **profile** the Hessian diagonal after training: :class:`SharpnessProfiler` (a callback for any Trainer), or
  :func:`profile_model` without one; the result is a :class:`SharpnessProfile`; estimators by name in
  :data:`ESTIMATORS`;
* **select** the parameters that may change: the strategies of :data:`STRATEGIES` (:class:`SmallestLayer`, ...,
  :class:`Validated`; from the model and its data: :class:`Saliency`, :class:`FisherRatio`), each giving a
  :class:`ParameterMask`;
* **unlearn** with :class:`UnlearnModule` and a method of :data:`METHODS` (:class:`FirstOrder`, :class:`SecondOrder`,
  :class:`Finetune`, :class:`NegGradPlus`, :class:`SamForget`, :class:`SharpMinMax`, :class:`SSD`; the
  toolkits' baselines :class:`RandomLabel`, :class:`L1Sparse`, :class:`SCRUB`; and :class:`FirstOrderRemoval` for
  removal without corrected labels): a training run of this library, or your own model with its data as
  :class:`UnlearnData` (or a data module with the same loaders); without Trainer code: :func:`unlearn_model`;
* **evaluate**: :func:`evaluate_model` (every metric of one model), :func:`poison_effect` (harm and fit),
  :func:`compare` (ToW, % restored), :class:`EvaluationOptions`;
* **data and models** of the experiments: :class:`PoisonedDataModule`, :class:`PoisonSpec`, :class:`ClassifierModule`.
"""

from lightning_unlearn.callbacks import SharpnessProfiler
from lightning_unlearn.curvature import (
    ESTIMATORS,
    CurvatureEstimator,
    EmpiricalFisher,
    ExactDiagonal,
    HutchinsonDiagonal,
    MonteCarloGGN,
    SharpnessProfile,
    get_estimator,
    profile_model,
)
from lightning_unlearn.data import PoisonedDataModule, PoisonRecord, PoisonSpec, UnlearnData
from lightning_unlearn.evaluation.suite import EvaluationOptions, compare, evaluate_model, poison_effect
from lightning_unlearn.models import ClassifierModule
from lightning_unlearn.selection import (
    STRATEGIES,
    AllLayers,
    FisherRatio,
    LargestLayer,
    LastLayer,
    NamedLayers,
    ParameterMask,
    RandomEntries,
    RandomLayer,
    Saliency,
    SelectionStrategy,
    SmallestLayer,
    TopKParameters,
    Validated,
)
from lightning_unlearn.unlearn import (
    METHODS,
    SCRUB,
    SSD,
    Finetune,
    FirstOrder,
    FirstOrderRemoval,
    L1Sparse,
    NegGradPlus,
    RandomLabel,
    SamForget,
    SecondOrder,
    SharpMinMax,
    UnlearnMethod,
    UnlearnModule,
    unlearn_model,
)

__version__ = "0.1.0"

__all__ = [
    # profile: the callback, the Trainer-free function, the result, the estimators
    "SharpnessProfiler",
    "profile_model",
    "SharpnessProfile",
    "ESTIMATORS",
    "get_estimator",
    "CurvatureEstimator",
    "ExactDiagonal",
    "MonteCarloGGN",
    "EmpiricalFisher",
    "HutchinsonDiagonal",
    # select
    "STRATEGIES",
    "SelectionStrategy",
    "ParameterMask",
    "SmallestLayer",
    "LargestLayer",
    "LastLayer",
    "AllLayers",
    "NamedLayers",
    "RandomLayer",
    "RandomEntries",
    "TopKParameters",
    "Validated",
    "Saliency",
    "FisherRatio",
    # unlearn
    "UnlearnModule",
    "UnlearnData",
    "unlearn_model",
    "METHODS",
    "UnlearnMethod",
    "FirstOrder",
    "SecondOrder",
    "Finetune",
    "NegGradPlus",
    "SamForget",
    "SharpMinMax",
    "FirstOrderRemoval",
    "RandomLabel",
    "L1Sparse",
    "SCRUB",
    "SSD",
    # evaluate
    "EvaluationOptions",
    "evaluate_model",
    "poison_effect",
    "compare",
    # data and models of the experiments
    "PoisonedDataModule",
    "PoisonSpec",
    "PoisonRecord",
    "ClassifierModule",
    "__version__",
]
