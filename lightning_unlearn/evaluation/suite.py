"""Everything one model is judged by in a poisoning experiment, and how an unlearned model compares with the reference.

:func:`evaluate_model` gives one flat dict of metrics for a model on a :class:`PoisonedDataModule`'s exact splits:

* accuracies (%): ``test/acc`` (+ ``test/acc_attacked``, ``test/acc_other`` where the poison attacks one class:
  ``label_flip``, ``targeted``), ``test/asr`` (backdoor: the attack success rate, % of triggered test images of the
  other classes classified as the target class), ``forget/acc`` (forget set w.r.t. its poisoned labels: the *fit*),
  ``forget_true/acc`` (w.r.t. its true labels), ``retain/acc``, ``val/acc``;
* membership inference (with ``EvaluationOptions.mia``): ``mia/svc`` (OPTML's SVC score of the forget set, %),
  ``mia/loss_auc_retain`` and ``mia/loss_auc_forget`` (loss-threshold ROC-AUC against the test set), and SalUn's SVC
  attack on five features, % of forget samples called non-members (``mia/salun_correctness``,
  ``mia/salun_confidence`` (the headline), ``mia/salun_entropy``, ``mia/m_entropy_song_mittal`` (Song & Mittal's
  modified entropy, not SalUn's formula), ``mia/salun_prob``), each with its spread over subsamples (``..._std``:
  0 on the full sets, the default) and the sizes it used (``mia/salun_members``, ``mia/salun_nonmembers`` per fit,
  ``mia/salun_forget``, ``mia/salun_repeats``; formulas in :mod:`~lightning_unlearn.evaluation.mia`);
* the relearning attack (with ``EvaluationOptions.relearn``): ``relearn/forget_acc_before``,
  ``relearn/forget_acc_after`` (poisoned-label accuracy on the forget samples the attack did not use),
  ``relearn/recovery`` (after − before, points), ``relearn/auc`` (the mean of the recovery curve over the attack, %),
  ``relearn/curve@<k>`` (the curve: held-out forget accuracy after ``k`` attack steps) and ``relearn/test_acc_after``.

:func:`poison_effect` states what there is to unlearn before any unlearning: the **harm** (the attacked metric of the
poisoned model against the retrained one) and the **fit** (the poisoned model's forget accuracy w.r.t. the poisoned
labels). For the forgetting scenarios (clean labels) the harm is the gap the forget set makes: ``classwise``, the
forgotten class's test accuracy, trained minus retrained (high vs ≈ 0); ``random_sample``, the forget-set accuracy,
trained minus retrained (on MNIST often below the noise, which the statement then says). :func:`compare` turns the
before / after / reference metrics into ToW (absolute and signed), the average accuracy gap to the reference and %
restored. :func:`calibrated_options` sets the relearning attack's learning rate
on the validation split (see :func:`~lightning_unlearn.evaluation.relearn.calibrate_relearning`). The same functions
evaluate the retrained reference, so every number of a report is computed the same way for every model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_unlearn.evaluation.metrics import accuracy_of, evaluating, gap, percent_restored, predictions, tow
from lightning_unlearn.evaluation.mia import (
    SALUN_MAX_SAMPLES,
    SALUN_SUBSAMPLE_REPEATS,
    loss_auc,
    salun_scores,
    svc_score,
)
from lightning_unlearn.evaluation.relearn import calibrate_relearning, relearning_attack

#: The splits ToW multiplies over (EVALUATION.md): forget (poisoned labels), retain and test accuracy.
TOW_KEYS = {"forget": "forget/acc", "retain": "retain/acc", "test": "test/acc"}
#: Below this gap (accuracy points) between the reference and the poisoned model, % restored is not reported: a
#: share of a gap within test-set noise (0.1 point is one sample of a 1,000-sample class) means nothing.
MIN_GAP = 0.5
#: Metrics % restored is computed for (test accuracies, the backdoor's success rate, the forget-set fit).
RESTORED_KEYS = ("test/acc", "test/acc_attacked", "test/acc_other", "test/asr", "forget/acc")
#: A poison's harm below this many points is within the noise of one training run: two standard deviations of the
#: seed-to-seed difference between two MNIST CNNs' accuracy on one class (1.1-point std per model over five seeds,
#: ``docs/results.md``: 2 · √2 · 1.1 ≈ 3).
HARM_NOISE = 3.0
#: The metric a poison kind attacks, and whether the poison raises it (+1) or lowers it (−1).
ATTACKED_METRICS: dict[str, tuple[str, int, str]] = {
    "label_flip": ("test/acc_attacked", -1, "test accuracy of the attacked class"),
    "targeted": ("test/acc_attacked", -1, "test accuracy of the attacked class"),
    "backdoor": ("test/asr", +1, "attack success rate on triggered test images"),
    "untargeted": ("test/acc", -1, "test accuracy"),
    "pairflip": ("test/acc", -1, "test accuracy"),
    # the forgetting scenarios (clean labels): training on the forget set raises these, forgetting should lower them
    "classwise": ("test/acc_attacked", +1, "test accuracy of the forgotten class"),
    "random_sample": ("forget/acc", +1, "forget-set accuracy"),
    # a user's data that names no attacked class: the harm is stated on what there is, and says so
    "unspecified": (
        "test/acc",
        -1,
        "overall test accuracy (no attacked class was given: set `attacked_class` to state the harm on it)",
    ),
}
#: Kinds whose forget set is clean (a removal request, not a poison): their effect is stated as a gap to forget.
REMOVAL = ("classwise", "random_sample")


@dataclass
class EvaluationOptions:
    """What every model of an unlearning request (before, after, reference) is evaluated on besides accuracies.

    Args:
        mia: Run the membership-inference attacks (SVC score, loss-threshold AUCs, SalUn's five-feature SVC attack;
            needs scikit-learn).
        mia_samples: The SalUn attack's members and non-members. None (default): all of SalUn's sets, its
            protocol, the only choice that does not let a subsample's seed decide the near-binary scores of a
            well-trained model (:mod:`~lightning_unlearn.evaluation.mia`); it costs 40–80 s per model on MNIST
            (10,000 + 10,000) on a 2-core CPU, three models per unlearning report. An integer ``k``: the cheaper
            estimate, ``mia_subsample_repeats`` seeded random subsamples of ``k`` each, scores averaged, their
            spread reported in the ``..._std`` keys.
        mia_subsample_repeats: How many subsamples a ``mia_samples`` cap averages over (>= 1; ignored without one).
        mia_seed: Seed of those subsamples (the same for every model, so all are attacked on the same samples).
        relearn: Run the relearning attack.
        relearn_fraction: Share of the forget set the attacker fine-tunes on, in (0, 1].
        relearn_steps: SGD steps of the attack (>= 1).
        relearn_lr: Learning rate of the attack (> 0).
        relearn_seed: Seed of the attack's split and batch order (the same for every model, so all are attacked
            on the same samples).
        relearn_eval_every: Points of the recovery curve: the held-out forget accuracy every this many steps.
        relearn_calibrate: Where a retrained reference is given, replace ``relearn_lr`` by the rate
            :func:`~lightning_unlearn.evaluation.relearn.calibrate_relearning` picks on the validation split with it.
        relearn_ceiling: The calibration's ceiling (%): the reference attacked on the poisoned validation images must
            end at or below it.
        retain_samples: Evaluate the retain set on its first ``retain_samples`` samples only (None: all of it). The
            SVC attack uses the first |test| retain samples as members either way; ``retain/acc`` then estimates
            the retain accuracy on that part (for large models on a CPU, where the retain set dominates the cost).
    """

    mia: bool = True
    mia_samples: int | None = SALUN_MAX_SAMPLES
    mia_subsample_repeats: int = SALUN_SUBSAMPLE_REPEATS
    mia_seed: int = 0
    relearn: bool = True
    relearn_fraction: float = 0.1
    relearn_steps: int = 50
    relearn_lr: float = 0.01
    relearn_seed: int = 0
    relearn_eval_every: int = 5
    relearn_calibrate: bool = True
    relearn_ceiling: float = 50.0
    retain_samples: int | None = None

    def __post_init__(self) -> None:
        if self.mia_samples is not None and (int(self.mia_samples) != self.mia_samples or self.mia_samples < 1):
            raise ValueError(f"`mia_samples` must be an integer >= 1 or None, got {self.mia_samples!r}.")
        if int(self.mia_subsample_repeats) != self.mia_subsample_repeats or self.mia_subsample_repeats < 1:
            raise ValueError(f"`mia_subsample_repeats` must be an integer >= 1, got {self.mia_subsample_repeats!r}.")
        if not 0.0 < float(self.relearn_fraction) <= 1.0:
            raise ValueError(f"`relearn_fraction` must lie in (0, 1], got {self.relearn_fraction!r}.")
        if int(self.relearn_steps) != self.relearn_steps or self.relearn_steps < 1:
            raise ValueError(f"`relearn_steps` must be an integer >= 1, got {self.relearn_steps!r}.")
        if not self.relearn_lr > 0:
            raise ValueError(f"`relearn_lr` must be > 0, got {self.relearn_lr!r}.")
        if int(self.relearn_eval_every) != self.relearn_eval_every or self.relearn_eval_every < 1:
            raise ValueError(f"`relearn_eval_every` must be an integer >= 1, got {self.relearn_eval_every!r}.")
        if not 0.0 <= float(self.relearn_ceiling) <= 100.0:
            raise ValueError(f"`relearn_ceiling` must lie in [0, 100], got {self.relearn_ceiling!r}.")
        if self.retain_samples is not None and (
            int(self.retain_samples) != self.retain_samples or self.retain_samples < 1
        ):
            raise ValueError(f"`retain_samples` must be an integer >= 1 or None, got {self.retain_samples!r}.")

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
    target = datamodule.attacked_class
    tests = datamodule.test_dataloader()  # a user's data may have no test split (`UnlearnData(test=None)`)
    loaders = {"test": tests[0]} if tests else {}
    loaders["forget"] = datamodule.forget_dataloader()
    if getattr(datamodule, "has_corrected_labels", True):  # a user's data may have no corrected labels
        loaders["forget_true"] = datamodule.corrected_forget_dataloader()
    loaders["retain"] = _first(datamodule.retain_dataloader(), options.retain_samples)
    loaders["val"] = datamodule.val_dataloader()
    if "triggered" in getattr(datamodule, "test_split_names", ()):
        loaders["triggered"] = datamodule.triggered_test_dataloader()
    outputs = {}
    with evaluating(net, device) as dev:
        for split, loader in loaders.items():
            if split.startswith("forget") and len(loader.dataset) == 0:
                continue
            outputs[split] = predictions(net, loader, dev)
    metrics: dict[str, float] = {}
    triggered = outputs.pop("triggered", None)
    if triggered is not None:
        metrics["test/asr"] = accuracy_of(*triggered)["acc"]
    for split, (logits, labels) in outputs.items():
        values = accuracy_of(logits, labels, target if split == "test" else None)
        metrics[f"{split}/acc"] = values["acc"]
        if split == "test" and target is not None:
            metrics["test/acc_attacked"], metrics["test/acc_other"] = values["acc_attacked"], values["acc_other"]
    if "forget" not in outputs or "test" not in outputs:  # MIA and relearning compare with unseen test samples
        return metrics
    if options.mia:
        probs = {s: F.softmax(o[0], -1).gather(1, o[1].unsqueeze(1)).squeeze(1) for s, o in outputs.items()}
        loss = {s: F.cross_entropy(o[0], o[1], reduction="none") for s, o in outputs.items()}
        n = min(len(probs["test"]), len(probs["retain"]))  # OPTML: the first |test| retain samples are the members
        metrics["mia/svc"] = svc_score(probs["retain"][:n], probs["test"][:n], probs["forget"])
        metrics["mia/loss_auc_retain"] = loss_auc(loss["retain"], loss["test"])
        metrics["mia/loss_auc_forget"] = loss_auc(loss["forget"], loss["test"])
        salun = salun_scores(
            outputs["retain"],
            outputs["test"],
            outputs["forget"],
            max_samples=options.mia_samples,
            subsample_repeats=options.mia_subsample_repeats,
            seed=options.mia_seed,
        )
        metrics |= {salun_metric_key(name): value for name, value in salun.items()}
    if options.relearn:
        attack = relearning_attack(
            net,
            datamodule.forget_dataloader(),
            loaders["test"],
            fraction=options.relearn_fraction,
            steps=options.relearn_steps,
            lr=options.relearn_lr,
            seed=options.relearn_seed,
            eval_every=options.relearn_eval_every,
            device=device,
        )
        for key in ("forget_acc_before", "forget_acc_after", "recovery", "auc", "test_acc_after"):
            metrics[f"relearn/{key}"] = float(attack[key])
        for step, value in zip(attack["curve_steps"], attack["curve"], strict=True):
            metrics[f"relearn/curve@{step}"] = float(value)
    return metrics


def salun_metric_key(name: str) -> str:
    """The metric key of a :func:`~lightning_unlearn.evaluation.mia.salun_scores` entry: ``mia/salun_<name>``,
    except Song & Mittal's modified entropy (and its spread), which is not SalUn's formula: ``mia/<name>``."""
    return f"mia/{name}" if name.startswith("m_entropy_song_mittal") else f"mia/salun_{name}"


def _first(loader: DataLoader, count: int | None) -> DataLoader:
    """``loader`` over its dataset's first ``count`` samples (all with None)."""
    if count is None or count >= len(loader.dataset):
        return loader
    return DataLoader(Subset(loader.dataset, range(count)), batch_size=loader.batch_size)


def calibrated_options(
    reference: nn.Module,
    datamodule: Any,
    options: EvaluationOptions | None = None,
    device: torch.device | str | None = None,
) -> tuple[EvaluationOptions, dict[str, Any] | None]:
    """``options`` with the relearning attack's learning rate calibrated on the validation split with ``reference``
    (a model retrained without the poison), and the calibration's record; unchanged (record None) when the attack or
    its calibration is off, or there is no poison; for data without a poisoned validation split (a user's
    ``UnlearnData``) the attack keeps its own ``relearn_lr``, uncalibrated (``relearn_calibrate`` false)."""
    options = options or EvaluationOptions()
    if not (options.relearn and options.relearn_calibrate):
        return options, None
    datamodule.setup("fit")
    if datamodule.record is None or not len(datamodule.record):
        return options, None
    if not hasattr(datamodule, "poisoned_validation_dataloader"):  # a user's data: no poisoned validation split
        return replace(options, relearn_calibrate=False), None
    record = calibrate_relearning(
        reference,
        datamodule.poisoned_validation_dataloader(),
        fraction=options.relearn_fraction,
        steps=options.relearn_steps,
        seed=options.relearn_seed,
        ceiling=options.relearn_ceiling,
        device=device,
    )
    return replace(options, relearn_lr=record["lr"], relearn_calibrate=False), record


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
    for key in ("mia/svc", "mia/salun_confidence", "relearn/forget_acc_after", "relearn/auc"):
        if key in after and key in reference:
            out[f"gap_{key.replace('/', '_')}"] = abs(after[key] - reference[key])
    return out | restored(before, after, reference)


def poison_effect(before: dict[str, float], reference: dict[str, float], kind: str) -> dict[str, Any]:
    """What there is to unlearn: the poison's **harm** and the poisoned model's **fit**, stated before unlearning.

    For the forgetting scenarios (clean data; see :mod:`lightning_unlearn.data.poison`) the same keys say what
    training on the forget set did: ``classwise``, harm = the forgotten class's test accuracy, trained minus retrained
    (``test/acc_attacked``), fit = forget-set accuracy (retrained ≈ 0); ``random_sample``, harm = forget-set accuracy,
    trained minus retrained (``forget/acc``: the generalisation gap, which equals the memorisation), fit = the same
    forget-set accuracy.

    Args:
        before: Metrics of the poisoned (or trained-on-everything) model (:func:`evaluate_model`).
        reference: Metrics of the model retrained without the poison (the forget set), on the same splits.
        kind: The poison kind or forgetting scenario (``PoisonSpec.kind``).

    Returns:
        ``metric`` (the attacked metric's key) and ``label``; ``poisoned`` and ``retrained`` (its values); ``harm``
        (points by which the poison worsens it: positive = harmful); ``fit`` and ``fit_retrained`` (forget accuracy
        w.r.t. the poisoned labels of both models) and ``memorisation`` (their difference); ``plain`` (harm or
        memorisation ≥ :data:`HARM_NOISE`: there is something to unlearn); ``statement`` (one sentence saying all of
        it, and saying so when both are within the noise).
    """
    fit, fit_retrained = before.get("forget/acc"), reference.get("forget/acc")
    memorisation = None if fit is None or fit_retrained is None else fit - fit_retrained
    out: dict[str, Any] = {"fit": fit, "fit_retrained": fit_retrained, "memorisation": memorisation}
    if kind not in ATTACKED_METRICS:
        return out | {"metric": None, "harm": None, "plain": False, "statement": "No poison: nothing to unlearn."}
    key, direction, label = ATTACKED_METRICS[kind]
    if key not in before or key not in reference:
        return out | {"metric": key, "harm": None, "plain": False, "statement": f"{key} was not measured."}
    harm = direction * (before[key] - reference[key])
    memorised = memorisation is not None and memorisation >= HARM_NOISE
    plain = harm >= HARM_NOISE or memorised
    out |= {"metric": key, "label": label, "poisoned": before[key], "retrained": reference[key]}
    out |= {"harm": harm, "plain": plain, "noise": HARM_NOISE}
    if kind in REMOVAL:
        return out | {"statement": _removal_statement(out, kind)}
    statement = (
        f"Harm {harm:.2f} points: {label} {before[key]:.2f} % poisoned vs {reference[key]:.2f} % retrained; "
        f"fit {_pct(fit)} (forget-set accuracy w.r.t. the poisoned labels; retrained {_pct(fit_retrained)})."
    )
    if harm < HARM_NOISE and memorised:
        statement += (
            f" The harm is below the noise level ({HARM_NOISE:g} points): what there is to unlearn is the "
            f"memorised poison ({memorisation:.2f} points of fit above the retrained model)."
        )
    elif not plain:
        statement += (
            f" Harm and fit are below the noise level ({HARM_NOISE:g} points): no unlearning result on this run can "
            "show that the poison's effect was removed."
        )
    out["statement"] = statement
    return out


def _removal_statement(effect: dict[str, Any], kind: str) -> str:
    """:func:`poison_effect`'s sentence for a forgetting scenario (clean labels: a gap to forget, not a harm)."""
    label, harm, noise = effect["label"], effect["harm"], HARM_NOISE
    statement = (
        f"Gap to forget {harm:.2f} points: {label} {effect['poisoned']:.2f} % trained on it vs "
        f"{effect['retrained']:.2f} % retrained without it"
    )
    if kind != "random_sample":
        statement += f"; fit {_pct(effect['fit'])} (forget-set accuracy; retrained {_pct(effect['fit_retrained'])})"
    statement += "."
    if not effect["plain"]:
        statement += (
            f" The gap is below the noise level ({noise:g} points): accuracy cannot tell the trained model from the "
            "retrained one on this forget set, so no accuracy can show that it was forgotten; membership inference "
            "is the evidence that matters here."
        )
    return statement


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} %"


__all__ = [
    "ACCURACY_ONLY",
    "ATTACKED_METRICS",
    "HARM_NOISE",
    "MIN_GAP",
    "TOW_KEYS",
    "EvaluationOptions",
    "calibrated_options",
    "compare",
    "evaluate_model",
    "evaluate_splits",
    "poison_effect",
    "restored",
    "salun_metric_key",
]
