"""The forgetting target of a request, and the one criterion every choice of a request is scored by.

A request must know what success looks like on the forget set from what its user has, without a retrained model.
One target per kind of deletion (``../shared/EVALUATION.md``), each read as a **gap in mean probability** between the
forget set and a **held-out level** that the validation split gives for the same model:

====================  ==========================================  ===============================================
target                forget statistic (per forget sample)        held-out level (validation split, same model)
====================  ==========================================  ===============================================
``corrected``         p(corrected label | x): the corrected       p(y | x) of validation samples of the same
                      labels are known (label flip; backdoor      classes, weighted to the forget set's corrected
                      with its true labels)                       classes: "as well as held-out data, not better"
``unseen``            p(trained-on label | x): a sample never     p(y | x) of validation samples of the same
                      seen looks like held-out data (random-      classes; for labels drawn wrong at random (the
                      sample deletion, memorised noise, any       ``untargeted`` poison), the chance of a random
                      plain deletion)                             wrong label, (1 − p(y | x)) / (C − 1)
``class_removed``     p(removed class | x): an unseen class is    0: a model that never saw the class does not
                      never predicted                             predict it
``trigger_removed``   p(poisoned label | x) of the triggered      p(poisoned label | x) of clean validation
                      forget inputs (a backdoor without true      samples of the other classes: the trigger no
                      labels)                                     longer changes the prediction
====================  ==========================================  ===============================================

The **distance** to the target is ``|mean forget statistic − level|`` (0 = met; the report also states its standard
error, and the target counts as met within two of them). The **criterion** scores a candidate model by

    score = utility + distance,    utility = validation cross-entropy (nats) on the classes the retrained model is
                                   still trained for (a removed class weighs 0)

so that one nat of validation loss weighs as much as the whole probability gap: a step that forgets is taken when the
gap it closes is larger than the validation loss it costs. Both parts are measured on held-out data and the forget set
only — never on test data, never with a retrained model. The step and damping of one-step updates, the learning rate
and number of epochs of iterative methods, the validated selection's candidates and :class:`~lightning_unlearn.unlearn.
methods.auto.Auto`'s choice of method and selection are all scored by it (``criterion="target"``, the default).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["TARGETS", "TargetReading", "ForgettingTarget", "infer_target", "paired_noise", "target_summary"]

TARGETS = ("corrected", "unseen", "class_removed", "trigger_removed")
#: The target of each poison kind of the library's records (a backdoor whose true labels are withheld: see
#: :func:`infer_target`).
KIND_TARGETS = {
    "label_flip": "corrected",
    "targeted": "corrected",
    "untargeted": "corrected",
    "pairflip": "corrected",
    "backdoor": "corrected",
    "classwise": "class_removed",
    "random_sample": "unseen",
}


def infer_target(datamodule: Any, requested: str | None = None) -> str:
    """The request's target: ``requested`` if given, else the data's own (``forgetting_target``), else from the poison
    record's kind; without a record, ``corrected`` when the data has corrected labels and ``unseen`` otherwise.

    Raises:
        ValueError: For a target not in :data:`TARGETS`, or ``corrected`` without corrected labels.
    """
    target = requested or getattr(datamodule, "forgetting_target", None)
    if target is None:
        spec = getattr(datamodule, "spec", None)
        kind = getattr(spec, "kind", None)
        target = KIND_TARGETS.get(kind) if kind is not None else None
        if target is None:
            target = "corrected" if getattr(datamodule, "has_corrected_labels", False) else "unseen"
    if target not in TARGETS:
        raise ValueError(f"`target` (the forgetting target) must be one of {TARGETS}, got {target!r}.")
    if target == "corrected" and not getattr(datamodule, "has_corrected_labels", True):
        raise ValueError(
            "The forgetting target 'corrected' needs the forget samples' corrected labels, and the data has none: "
            "use 'unseen' (a deletion), 'class_removed' or 'trigger_removed'."
        )
    return target


@dataclass
class TargetReading:
    """One model's position with respect to the target and the criterion.

    Attributes:
        target: The target's name.
        forget: Mean forget statistic (a probability).
        level: The held-out level (a probability).
        distance: ``|forget − level|``.
        noise: Standard error of ``forget − level`` (sampling of both sets).
        utility: Validation cross-entropy on the retained classes (nats).
        val_acc: Validation accuracy on the retained classes (%).
        score: ``utility + distance``: lower is better.
    """

    target: str
    forget: float
    level: float
    distance: float
    noise: float
    utility: float
    val_acc: float
    score: float

    @property
    def met(self) -> bool:
        """Whether the target is met within two standard errors."""
        return self.distance <= 2.0 * self.noise

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor) -> tuple[float, float]:
    """The weighted mean of ``values`` and its sampling variance (NaN and 0 without weight)."""
    total = float(weight.sum())
    if total <= 0:
        return math.nan, 0.0
    mean = float((weight * values).sum() / total)
    spread = float((weight * (values - mean) ** 2).sum() / total)
    return mean, spread * float((weight**2).sum()) / total**2


class ForgettingTarget:
    """A request's target and criterion (see the module docstring), over the forget set and the validation split.

    Args:
        target: One of :data:`TARGETS`.
        forget_labels: The labels the model was trained with on the forget set (its order).
        corrected_labels: The forget set's corrected labels (``corrected``; for ``unseen`` their true classes, if
            known, weight the held-out level).
        random_labels: ``unseen`` only: the trained-on labels were drawn wrong at random (memorised noise), so the
            held-out level is the chance of a random wrong label.
        val_labels: The validation split's labels (its order).
    """

    def __init__(
        self,
        target: str,
        forget_labels: torch.Tensor,
        val_labels: torch.Tensor,
        corrected_labels: torch.Tensor | None = None,
        random_labels: bool = False,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"`target` must be one of {TARGETS}, got {target!r}.")
        if target == "corrected" and corrected_labels is None:
            raise ValueError("The forgetting target 'corrected' needs the forget set's corrected labels.")
        self.target = target
        self.forget_labels = forget_labels.long().cpu()
        self.val_labels = val_labels.long().cpu()
        self.corrected_labels = None if corrected_labels is None else corrected_labels.long().cpu()
        self.random_labels = random_labels
        #: ``class_removed``: the removed class; ``trigger_removed``: the poisoned label (the forget set's commonest).
        self.label = int(torch.mode(self.forget_labels).values) if len(self.forget_labels) else None

    @property
    def statistic(self) -> str:
        """The forget statistic in words."""
        return {
            "corrected": "p(corrected label | forget input)",
            "unseen": "p(trained-on label | forget input)",
            "class_removed": f"p(class {self.label} | forget input)",
            "trigger_removed": f"p(poisoned label {self.label} | triggered forget input)",
        }[self.target]

    def class_weights(self, num_classes: int) -> torch.Tensor:
        """Per-class weights of the utility: 0 for a removed class, 1 otherwise."""
        weights = torch.ones(num_classes, dtype=torch.float64)
        if self.target == "class_removed" and self.label is not None:
            weights[self.label] = 0.0
        return weights

    def _level_terms(self, val_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-validation-sample terms of the held-out level and their weights (the level is their weighted mean)."""
        y = self.val_labels.to(val_probs.device)
        num_classes = val_probs.shape[1]
        own = val_probs.gather(1, y[:, None]).squeeze(1)
        if self.target == "trigger_removed":
            return val_probs[:, self.label], (y != self.label).double()
        if self.target == "unseen" and self.random_labels:
            terms = (1.0 - own) / max(num_classes - 1, 1)
            classes = self.corrected_labels if self.corrected_labels is not None else None
        else:
            terms = own
            classes = self.corrected_labels if self.target == "corrected" else self.forget_labels
        if classes is None:
            return terms, torch.ones_like(terms, dtype=torch.float64)
        # weight each validation sample so that the classes count as often as among the forget samples
        forget_counts = torch.bincount(classes, minlength=num_classes).double().to(val_probs.device)
        val_counts = torch.bincount(y, minlength=num_classes).double()
        per_class = torch.where(val_counts > 0, forget_counts / val_counts.clamp_min(1), 0.0)
        if per_class.sum() == 0:  # no validation sample of the forget set's classes: all of them, equally
            per_class = torch.ones_like(per_class)
        return terms, per_class[y]

    def forget_terms(self, forget_probs: torch.Tensor) -> torch.Tensor:
        """The forget statistic per forget sample."""
        if self.target == "corrected":
            labels = self.corrected_labels
        elif self.target == "unseen":
            labels = self.forget_labels
        else:
            labels = torch.full_like(self.forget_labels, self.label)
        return forget_probs.gather(1, labels.to(forget_probs.device)[:, None]).squeeze(1)

    def read(self, forget_logits: torch.Tensor, val_logits: torch.Tensor) -> TargetReading:
        """The target's reading and the criterion's score for a model with these outputs (logits in the forget set's
        and the validation split's order)."""
        parts = self.per_sample(forget_logits, val_logits)
        return self.reading(parts)

    def per_sample(self, forget_logits: torch.Tensor, val_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-sample parts of a reading (kept by searches to tell two candidates apart from noise)."""
        forget_probs = torch.softmax(forget_logits.double(), dim=1)
        val_log_probs = torch.log_softmax(val_logits.double(), dim=1)
        y = self.val_labels.to(val_logits.device)
        level, level_weight = self._level_terms(val_log_probs.exp())
        utility_weight = self.class_weights(val_logits.shape[1]).to(val_logits.device)[y]
        return {
            "forget": self.forget_terms(forget_probs).cpu(),
            "level": level.cpu(),
            "level_weight": level_weight.cpu(),
            "val_loss": (-val_log_probs.gather(1, y[:, None]).squeeze(1)).cpu(),
            "val_hit": (val_logits.argmax(1) == y).double().cpu(),
            "utility_weight": utility_weight.cpu(),
        }

    def reading(self, parts: dict[str, torch.Tensor]) -> TargetReading:
        forget = parts["forget"]
        if self.target == "class_removed":
            level, level_var = 0.0, 0.0
        else:
            level, level_var = _weighted_mean(parts["level"], parts["level_weight"])
        mean_forget = float(forget.mean()) if len(forget) else math.nan
        forget_var = float(forget.var()) / len(forget) if len(forget) > 1 else 0.0
        distance = abs(mean_forget - level)
        u_weight = parts["utility_weight"]
        u_total = float(u_weight.sum())
        loss = parts["val_loss"]
        # a removed class's samples weigh 0 even when their loss is infinite
        utility = float(torch.where(u_weight > 0, u_weight * loss, 0.0).sum()) / u_total if u_total else math.nan
        val_acc = 100.0 * float((u_weight * parts["val_hit"]).sum()) / u_total if u_total else math.nan
        return TargetReading(
            target=self.target,
            forget=mean_forget,
            level=level,
            distance=distance,
            noise=math.sqrt(forget_var + level_var),
            utility=utility,
            val_acc=val_acc,
            score=_finite(utility) + _finite(distance),
        )


def paired_noise(target: ForgettingTarget, first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    """Standard error of the difference of two candidates' scores, from their per-sample parts on the same samples
    (paired): the utility's per-sample loss differences, and the forget statistic's and the level's per-sample
    differences (the distance's sign taken from the first candidate)."""
    u_weight = first["utility_weight"]
    var = _weighted_mean(torch.where(u_weight > 0, first["val_loss"] - second["val_loss"], 0.0), u_weight)[1]
    forget_diff = first["forget"] - second["forget"]
    if len(forget_diff) > 1:
        var += float(forget_diff.var()) / len(forget_diff)
    if target.target != "class_removed":
        var += _weighted_mean(first["level"] - second["level"], first["level_weight"])[1]
    return math.sqrt(var)


def target_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The report's ``target``: which forgetting target, its statistic, the reading before and after the update, and
    in words how close the result came to it."""
    before, after = record.get("before") or {}, record.get("after") or {}
    summary = {k: before[k] for k in ("target", "statistic") if k in before}
    summary |= {"before": before, "after": after}
    if before and after:
        fields = ("target", "statistic")
        summary["before"] = {k: v for k, v in before.items() if k not in fields}
        summary["after"] = {k: v for k, v in after.items() if k not in fields}
        state = "met" if after.get("met") else "not met"
        summary["statement"] = (
            f"forgetting target {before['target']!r} ({before['statistic']}): distance {before['distance']:.4f} "
            f"before, {after['distance']:.4f} after ({state}; held-out level {after['level']:.4f}, noise "
            f"{after['noise']:.4f}); validation loss on the retained classes {before['utility']:.4f} -> "
            f"{after['utility']:.4f}"
        )
        moved = abs(after["level"] - before["level"])
        if moved > 2.0 * math.hypot(before.get("noise", 0.0), after.get("noise", 0.0)):
            # the level is the model's own held-out level: a poison that harms held-out data (a label flip that
            # generalises to the class) lowers it too, and then a small distance before means "equally harmed"
            summary["statement"] += (
                f"; the held-out level itself moved ({before['level']:.4f} before): the poison reached held-out data "
                f"too, so the distance before compares the forget set with equally harmed held-out samples"
            )
        if not after.get("met"):
            summary["statement"] += (
                ". Not met: a larger update may reach it (Auto with a larger budget_epochs, or an iterative method: "
                "docs/results.md, 'Which request for which deletion')"
            )
    return summary
