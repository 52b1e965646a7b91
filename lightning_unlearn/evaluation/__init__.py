"""Evaluation of unlearning: accuracies, % restored, Tug-of-War, membership inference (OPTML/SalUn SVC, loss AUC; LiRA's
statistics in :mod:`~lightning_unlearn.evaluation.lira`), relearning attack, cost."""

from lightning_unlearn.evaluation.cost import METHODS, Cost, measure
from lightning_unlearn.evaluation.metrics import (
    TOW_SPLITS,
    evaluate_accuracy,
    evaluating,
    gap,
    iter_logits,
    model_device,
    percent_restored,
    tow,
)
from lightning_unlearn.evaluation.mia import (
    SVC_PARAMS,
    label_probabilities,
    losses,
    mia_loss_auc,
    mia_salun,
    mia_summary,
    mia_svc,
    salun_scores,
)
from lightning_unlearn.evaluation.relearn import attack_size, calibrate_relearning, curve_area, relearning_attack

__all__ = [
    "METHODS",
    "SVC_PARAMS",
    "TOW_SPLITS",
    "Cost",
    "attack_size",
    "calibrate_relearning",
    "curve_area",
    "evaluate_accuracy",
    "evaluating",
    "gap",
    "iter_logits",
    "label_probabilities",
    "losses",
    "measure",
    "mia_loss_auc",
    "mia_salun",
    "mia_summary",
    "mia_svc",
    "model_device",
    "percent_restored",
    "relearning_attack",
    "salun_scores",
    "tow",
]
