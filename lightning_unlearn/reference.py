"""The reference of a request: a model retrained without the forget set, checked to be one, and evaluated on the
request's exact splits.

A reference is refused when the files show it is not retrained without the forget set (:func:`check_reference` for a
training run of this library, :func:`reference_net` for a user's checkpoint): the poisoned model itself (the same file
or weights), any model of the poisoned checkpoint's unlearning chain (:mod:`lightning_unlearn.ledger`), an unlearned
model, or a run whose poison record shows that it trained on forget samples. Every file is read weights-only
(:mod:`lightning_unlearn.checkpoints`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_unlearn.checkpoints import read_checkpoint
from lightning_unlearn.curvature import weights_fingerprint
from lightning_unlearn.data.datamodule import PoisonedDataModule
from lightning_unlearn.evaluation.distance import ReferenceMetrics, split_outputs
from lightning_unlearn.evaluation.suite import EvaluationOptions, calibrated_options, evaluate_model
from lightning_unlearn.ledger import chain_weights, history_of
from lightning_unlearn.run import TrainingRun
from lightning_unlearn.unlearn.adapters.source import LogitsOf, ModelSource, load_model

__all__ = ["check_reference", "reference_metrics", "evaluate_reference", "reference_net"]


def check_reference(reference: TrainingRun, poisoned: TrainingRun) -> None:
    """Refuse a reference that is not a model retrained without the forget set, as far as the files can tell:
    the poisoned model itself (the same checkpoint file, or the same weights), any model of the poisoned checkpoint's
    unlearning chain (:mod:`lightning_unlearn.ledger`), an unlearned model, or a run whose poison record shows that
    it trained on forget samples (trained without ``drop_poisoned``, or dropping other samples of the same split).
    Warn when it was trained on another split or poison record (its comparison would not be like for like).

    Raises:
        ValueError: Naming what the reference is instead.
    """
    retrain = "pass the run retrained without the poisoned samples (`train.py fit -c <config> -c configs/retrain.yaml`)"
    where = str(reference.checkpoint)
    same = reference.checkpoint.resolve() == poisoned.checkpoint.resolve()
    if not same:
        ours, theirs = poisoned.state().get("state_dict") or {}, reference.state().get("state_dict") or {}
        same = ours.keys() == theirs.keys() and all(
            torch.is_tensor(ours[k])
            and torch.is_tensor(theirs[k])
            and ours[k].shape == theirs[k].shape
            and torch.equal(ours[k], theirs[k])
            for k in ours
        )
    if same:
        raise ValueError(
            f"`reference` {where!r} is the poisoned model itself (same checkpoint or identical weights as "
            f"{str(poisoned.checkpoint)!r}): {retrain}."
        )
    theirs_state = reference.state()
    if "unlearned_from" in theirs_state:
        raise ValueError(
            f"`reference` {where!r} is an unlearned model (written by an unlearning request), not one retrained "
            f"without the forget set: {retrain}."
        )
    ancestors = chain_weights(history_of(poisoned.state()))
    if ancestors:
        fingerprint = weights_fingerprint(reference.load_classifier())
        if fingerprint in ancestors:
            raise ValueError(
                f"`reference` {where!r} holds the weights of {ancestors[fingerprint]} in the unlearning chain of "
                f"{str(poisoned.checkpoint)!r}: it was trained with the forget set. {retrain[0].upper()}{retrain[1:]}."
            )
    try:
        theirs_record, ours_record = reference.checkpoint_record(), poisoned.checkpoint_record()
    except ValueError:
        return
    if theirs_record is None or ours_record is None:
        return
    dropped = bool((theirs_state.get("datamodule_hyper_parameters") or {}).get("drop_poisoned"))
    same_split = (theirs_record.dataset, theirs_record.dataset_size) == (ours_record.dataset, ours_record.dataset_size)
    if same_split:
        kept = set(ours_record.indices) - (set(theirs_record.indices) if dropped else set())
        if kept:
            how = "without `drop_poisoned`" if not dropped else "dropping other samples than the forget set"
            raise ValueError(
                f"`reference` {where!r} was trained with {len(kept):,} of the {len(ours_record):,} forget samples in "
                f"its training set (its poison record: trained {how}), so it is not a model retrained without the "
                f"forget set: {retrain}."
            )
    if theirs_record.differences(ours_record):
        rank_zero_warn(
            f"The reference {where!r} was trained with another poison record than the poisoned "
            f"run ({'; '.join(theirs_record.differences(ours_record))}): it was not retrained without exactly this "
            "forget set, so its comparison is not like for like."
        )


def reference_metrics(
    reference_run: str | Path,
    datamodule: PoisonedDataModule,
    options: EvaluationOptions | None = None,
    poisoned: TrainingRun | None = None,
) -> dict[str, float]:
    """All metrics (:func:`~lightning_unlearn.evaluation.suite.evaluate_model`) of a reference model, retrained
    without the poisoned samples, on ``datamodule``'s exact splits (the poisoned run's forget/retain/test sets); with
    ``poisoned``, the reference is checked first (:func:`check_reference`)."""
    return evaluate_model(reference_net(reference_run, poisoned), datamodule, options)


def evaluate_reference(
    reference_run: str | Path,
    datamodule: PoisonedDataModule,
    options: EvaluationOptions | None = None,
    poisoned: TrainingRun | ModelSource | None = None,
    device: torch.device | str | None = None,
) -> tuple[EvaluationOptions, dict[str, float], dict[str, Any] | None]:
    """Calibrate the relearning attack with the reference model on the validation split (see
    :func:`~lightning_unlearn.evaluation.suite.calibrated_options`), then evaluate the reference with it.

    Args:
        reference_run: The reference's run directory or checkpoint (for an own model: a checkpoint of its class).
        datamodule: The poisoned run's data module (its exact splits).
        options: What to evaluate besides accuracies.
        poisoned: The poisoned run: the reference is checked against it (:func:`check_reference`); or an own
            model's source (``UnlearnModule.source``): the reference is loaded like it.
        device: Where to calibrate and evaluate: the device the request's own evaluations run on
            (:func:`~lightning_unlearn.evaluation.cost.main_process_device` of its Trainer); None: the CPU.

    Returns:
        ``(options, metrics, calibration)``: the options every model of the request must be evaluated with (the
        calibrated attack), the reference's metrics (a :class:`ReferenceMetrics`, with its outputs), and the
        calibration's record (None when it is off).
    """
    net = reference_net(reference_run, poisoned)
    options, calibration = calibrated_options(net, datamodule, options, device)
    metrics = ReferenceMetrics(evaluate_model(net, datamodule, options, device))
    metrics.outputs = split_outputs(net, datamodule, device)
    return options, metrics, calibration


def reference_net(reference_run: str | Path, poisoned: TrainingRun | Any | None) -> torch.nn.Module:
    """The reference's logits network: a training run's classifier, or with ``poisoned`` an own-model module (a
    :class:`~lightning_unlearn.unlearn.adapters.source.ModelSource`) a checkpoint of the same class, read
    weights-only. An own model's reference is refused when it is the model itself (file or weights), an unlearned
    checkpoint, or one of the models of its unlearning chain (:mod:`lightning_unlearn.ledger`)."""
    if isinstance(poisoned, ModelSource):
        if Path(reference_run).resolve() == (poisoned.checkpoint or Path()).resolve():
            raise ValueError(f"`reference` {str(reference_run)!r} is the model to unlearn itself.")
        state = read_checkpoint(reference_run, "Lightning checkpoint", "reference")
        if "unlearned_from" in state:
            raise ValueError(
                f"`reference` {str(reference_run)!r} is an unlearned model (written by an unlearning request), not one "
                "retrained without the forget set."
            )
        net = load_model(
            reference_run, poisoned.model_class or type(poisoned.names_root), poisoned.trusted_classes, "reference"
        )
        known = chain_weights(history_of(read_checkpoint(poisoned.checkpoint))) if poisoned.checkpoint else {}
        known.setdefault(weights_fingerprint(poisoned.names_root), "the model to unlearn")
        if (fingerprint := weights_fingerprint(net)) in known:
            raise ValueError(
                f"`reference` {str(reference_run)!r} holds the weights of {known[fingerprint]}: it was trained with "
                "the forget set, so it is no model retrained without it."
            )
        return net if poisoned.output_transform is None else LogitsOf(net, poisoned.output_transform)
    reference = TrainingRun.from_path(reference_run)
    if poisoned is not None:
        check_reference(reference, poisoned)
    return reference.load_classifier().net
