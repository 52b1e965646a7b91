"""Everything one model is judged by in a poisoning experiment, and how an unlearned model compares with the reference.

:func:`evaluate_model` gives one flat dict of metrics for a model on a :class:`PoisonedDataModule`'s exact splits:

* accuracies (%): ``test/acc`` (+ ``test/acc_target``, ``test/acc_other`` for targeted poisoning), ``forget/acc``
  (forget set w.r.t. its poisoned labels), ``forget_true/acc`` (w.r.t. its true labels), ``retain/acc``, ``val/acc``;
* membership inference (with ``EvaluationOptions.mia``): ``mia/svc`` (OPTML's SVC score of the forget set, %),
  ``mia/loss_auc_retain`` and ``mia/loss_auc_forget`` (loss-threshold ROC-AUC against the test set);
* the relearning attack (with ``EvaluationOptions.relearn``): ``relearn/forget_acc_before``,
  ``relearn/forget_acc_after`` (poisoned-label accuracy on the forget samples the attack did not use),
  ``relearn/recovery`` (after − before, points) and ``relearn/test_acc_after``.

:func:`compare` turns the before / after / reference metrics into ToW (absolute and signed), the average accuracy gap
to the reference and % restored. The same functions evaluate the retrained reference, so every number of a report is
computed the same way for every model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lightning_unlearn.evaluation.metrics import accuracy_of, evaluating, gap, percent_restored, predictions, tow
from lightning_unlearn.evaluation.mia import loss_auc, svc_score
from lightning_unlearn.evaluation.relearn import relearning_attack

#: The splits ToW multiplies over (EVALUATION.md): forget (poisoned labels), retain and test accuracy.
TOW_KEYS = {"forget": "forget/acc", "retain": "retain/acc", "test": "test/acc"}
#: Below this gap (accuracy points) between the reference and the poisoned model, % restored is not reported: a
#: share of a gap within test-set noise (0.1 point is one sample of a 1,000-sample class) means nothing.
MIN_GAP = 0.5
#: Test metrics % restored is computed for.
RESTORED_KEYS = ("test/acc", "test/acc_target", "test/acc_other")


@dataclass
class EvaluationOptions:
    """What every model of an unlearning request (before, after, reference) is evaluated on besides accuracies.

    Args:
        mia: Run the membership-inference attacks (SVC score and loss-threshold AUCs; needs scikit-learn).
        relearn: Run the relearning attack.
        relearn_fraction: Share of the forget set the attacker fine-tunes on, in (0, 1].
        relearn_steps: SGD steps of the attack (>= 1).
        relearn_lr: Learning rate of the attack (> 0).
        relearn_seed: Seed of the attack's split and batch order (the same for every model, so all are attacked
            on the same samples).
    """

    mia: bool = True
    relearn: bool = True
    relearn_fraction: float = 0.1
    relearn_steps: int = 20
    relearn_lr: float = 0.01
    relearn_seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < float(self.relearn_fraction) <= 1.0:
            raise ValueError(f"`relearn_fraction` must lie in (0, 1], got {self.relearn_fraction!r}.")
        if int(self.relearn_steps) != self.relearn_steps or self.relearn_steps < 1:
            raise ValueError(f"`relearn_steps` must be an integer >= 1, got {self.relearn_steps!r}.")
        if not self.relearn_lr > 0:
            raise ValueError(f"`relearn_lr` must be > 0, got {self.relearn_lr!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Accuracies only (the cheapest evaluation).
ACCURACY_ONLY = EvaluationOptions(mia=False, relearn=False)


def evaluate_splits(net: nn.Module, datamodule: Any, device: torch.device | str | None = None) -> dict[str, float]:
    """Accuracies (%) of ``net`` on every split of ``datamodule``'s poisoning (keys: see the module docstring)."""
    return evaluate_model(net, datamodule, ACCURACY_ONLY, device)


def evaluate_model(
    net: nn.Module,
    datamodule: Any,
    options: EvaluationOptions | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """All metrics of one model on ``datamodule``'s splits (accuracies, MIA, relearning attack; see module docstring).

    The model runs once per split (in eval mode, without gradients); accuracies and the MIA features (label
    probabilities, losses) all come from those outputs. The relearning attack fine-tunes a copy. The model's state
    is left as it was.
    """
    options = options or EvaluationOptions()
    datamodule.setup("fit")
    target = datamodule.target_class
    loaders = {
        "test": datamodule.test_dataloader()[0],
        "forget": datamodule.forget_dataloader(),
        "forget_true": datamodule.corrected_forget_dataloader(),
        "retain": datamodule.retain_dataloader(),
        "val": datamodule.val_dataloader(),
    }
    outputs = {}
    with evaluating(net, device) as dev:
        for split, loader in loaders.items():
            if split.startswith("forget") and len(loader.dataset) == 0:
                continue
            outputs[split] = predictions(net, loader, dev)
    metrics: dict[str, float] = {}
    for split, (logits, labels) in outputs.items():
        values = accuracy_of(logits, labels, target if split == "test" else None)
        metrics[f"{split}/acc"] = values["acc"]
        if split == "test" and target is not None:
            metrics["test/acc_target"], metrics["test/acc_other"] = values["acc_target"], values["acc_other"]
    if "forget" not in outputs:
        return metrics
    if options.mia:
        probs = {s: F.softmax(o[0], -1).gather(1, o[1].unsqueeze(1)).squeeze(1) for s, o in outputs.items()}
        loss = {s: F.cross_entropy(o[0], o[1], reduction="none") for s, o in outputs.items()}
        n = min(len(probs["test"]), len(probs["retain"]))  # OPTML: the first |test| retain samples are the members
        metrics["mia/svc"] = svc_score(probs["retain"][:n], probs["test"][:n], probs["forget"])
        metrics["mia/loss_auc_retain"] = loss_auc(loss["retain"], loss["test"])
        metrics["mia/loss_auc_forget"] = loss_auc(loss["forget"], loss["test"])
    if options.relearn:
        attack = relearning_attack(
            net,
            datamodule.forget_dataloader(),
            datamodule.test_dataloader()[0],
            fraction=options.relearn_fraction,
            steps=options.relearn_steps,
            lr=options.relearn_lr,
            seed=options.relearn_seed,
            device=device,
        )
        for key in ("forget_acc_before", "forget_acc_after", "recovery", "test_acc_after"):
            metrics[f"relearn/{key}"] = float(attack[key])
    return metrics


def restored(
    before: dict[str, float], after: dict[str, float], reference: dict[str, float], min_gap: float = MIN_GAP
) -> dict[str, float]:
    """% restored per test metric (Warnecke's measure): ``(after − before) / (reference − before) · 100``; NaN where
    ``|reference − before| < min_gap`` points. Keys ``test_restored/acc``, ``test_restored/acc_target``, ..."""
    out = {}
    for key in RESTORED_KEYS:
        if key in before and key in reference and key in after:
            lost = abs(reference[key] - before[key])
            value = percent_restored(after[key], before[key], reference[key]) if lost >= min_gap else math.nan
            out[key.replace("/", "_restored/", 1)] = value
    return out


def compare(before: dict[str, float], after: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """How close ``after`` came to the retrained ``reference``: ToW (absolute, RUM form, and signed), the average
    gap over the ToW splits (points), the gap of each MIA score, and % restored (see :func:`restored`)."""
    splits = [s for s, key in TOW_KEYS.items() if key in after and key in reference]
    unlearned = {s: after[TOW_KEYS[s]] for s in splits}
    retrained = {s: reference[TOW_KEYS[s]] for s in splits}
    out = {
        "tow": tow(unlearned, retrained, splits),
        "tow_signed": tow(unlearned, retrained, splits, signed=True),
        "avg_gap": gap(unlearned, retrained),
    }
    for key in ("mia/svc", "relearn/forget_acc_after"):
        if key in after and key in reference:
            out[f"gap_{key.replace('/', '_')}"] = abs(after[key] - reference[key])
    return out | restored(before, after, reference)


__all__ = [
    "ACCURACY_ONLY",
    "MIN_GAP",
    "TOW_KEYS",
    "EvaluationOptions",
    "compare",
    "evaluate_model",
    "evaluate_splits",
    "restored",
]
