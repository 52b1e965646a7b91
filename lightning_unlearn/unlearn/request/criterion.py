"""The one criterion every choice of a request is scored by, and how two candidates are told apart from noise.

``criterion="target"`` (the default) scores a candidate model by the forgetting target's criterion
(:mod:`~lightning_unlearn.unlearn.request.target`: validation loss on the retained classes plus the distance to the
target); ``"loss"`` by the validation cross-entropy alone (the paper's recipe, kept for its rows), optionally joined by
the corrected forget set (``forget_weight``); ``"acc"`` by validation accuracy (ties: the loss). Lower scores are
better. One-step step sizes and damping (:mod:`~lightning_unlearn.unlearn.methods.one_step`), the validated
selection's candidates, :class:`~lightning_unlearn.unlearn.methods.auto.Auto`'s method and selection, and iterative
methods' learning rate and epochs (:mod:`~lightning_unlearn.unlearn.request.lr_search`) all call :func:`score`.

Discrete choices (a selection, a method) are decided with :func:`prefer`: a later candidate replaces the current best
only when it scores lower by more than twice the standard error of the paired difference of the two scores (the same
validation and forget samples); otherwise the earlier one — first in the order of preference, the cheaper — stays,
and the choice says the two were within noise. So the same request at another thread count, whose last digits
differ, makes the same choice.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_unlearn.unlearn.request.target import paired_noise

__all__ = ["CRITERIA", "score", "prefer"]

#: What a search can score by (one-step methods also take ``"fixed"``: no search).
CRITERIA = ("target", "loss", "acc")


def score(
    module: Any,
    criterion: str,
    class_weights: torch.Tensor | None = None,
    forget_weight: float = 0.0,
) -> tuple[float, dict[str, Any], dict[str, torch.Tensor] | None]:
    """Score the module's network as it is now.

    Returns:
        ``(score, measurements, parts)``: the score (lower is better; non-finite counts as +∞), what it was made of
        (``val_loss``, ``val_acc``; for ``target`` also ``distance``, ``forget_stat``, ``level``, ``noise``), and for
        ``target`` the per-sample parts :func:`prefer` compares candidates with (None otherwise).
    """
    if criterion == "target":
        reading, parts = module.read_target()
        measured = {
            "val_loss": reading.utility,
            "val_acc": reading.val_acc,
            "distance": reading.distance,
            "forget_stat": reading.forget,
            "level": reading.level,
            "noise": reading.noise,
        }
        return reading.score, measured, parts
    acc, loss = module.validate(class_weights)
    measured = {"val_acc": acc, "val_loss": loss}
    if forget_weight > 0:
        forget_acc, forget_loss = module.validate(split="corrected_forget")
        measured |= {"forget_acc": forget_acc, "forget_loss": forget_loss}
        acc = (acc + forget_weight * forget_acc) / (1.0 + forget_weight)
        loss = loss + forget_weight * forget_loss
    loss_score = loss if math.isfinite(loss) else math.inf
    # accuracy moves in steps of 1/|val|; the loss (scaled far below that) only breaks its ties
    value = loss_score if criterion != "acc" else -acc + 1e-6 * min(loss_score, 1e4)
    return value, measured, None


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def prefer(best: dict[str, Any] | None, candidate: dict[str, Any], target: Any = None) -> tuple[bool, str | None]:
    """Whether ``candidate`` replaces ``best`` (both evaluations with ``score`` and, under the target criterion,
    ``_parts``), and a note when the two were within noise.

    Without per-sample parts (``loss``/``acc``): the lower score wins, ties to the smaller step.
    """
    if best is None:
        return True, None
    first, second = _finite(best["score"]), _finite(candidate["score"])
    parts_a, parts_b = best.get("_parts"), candidate.get("_parts")
    if parts_a is None or parts_b is None or target is None or not (math.isfinite(first) and math.isfinite(second)):
        return (second, candidate.get("step", 0.0)) < (first, best.get("step", 0.0)), None
    noise = paired_noise(target, parts_a, parts_b)
    if first - second > 2.0 * noise:
        return True, None
    if second < first:
        return False, (
            f"{_label(candidate)} scored {second:.5f}, below {_label(best)}'s {first:.5f} by less than twice the noise "
            f"of their difference ({noise:.5f}): kept {_label(best)}, the earlier (cheaper) candidate"
        )
    return False, None


def _label(evaluation: dict[str, Any]) -> str:
    parts = [str(evaluation[k]) for k in ("selection", "direction") if evaluation.get(k) is not None]
    parts += [f"{k}={evaluation[k]:g}" for k in ("damping_relative",) if k in evaluation]
    return " / ".join(parts) or f"step {evaluation.get('step', 0.0):.3g}"
