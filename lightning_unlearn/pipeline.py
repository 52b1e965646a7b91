"""The unlearning request end to end: evaluate before, unlearn, evaluate after, compare with a reference, report.

Shared by ``unlearn.py``, ``lightning-unlearn demo`` and the benchmarks, so every number they print is computed the
same way.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lightning_unlearn.checkpoints import read_checkpoint, verify_archive
from lightning_unlearn.console import quiet
from lightning_unlearn.curvature import SharpnessProfile, weights_fingerprint
from lightning_unlearn.data.identity import sample_digests, split_fingerprint
from lightning_unlearn.evaluation.cost import fit_memory, main_process_device, measure
from lightning_unlearn.evaluation.distance import output_distance, split_outputs
from lightning_unlearn.evaluation.figures import curve_of, log_figure, relearn_figure
from lightning_unlearn.evaluation.suite import (
    EvaluationOptions,
    compare,
    evaluate_model,
    poison_effect,
)
from lightning_unlearn.ledger import HISTORY_KEY, check_repeat, history_of, new_entry
from lightning_unlearn.outputs import OutputClaim, launched_as_rank_zero
from lightning_unlearn.run import (
    DATAMODULE_STATE_KEY,
    PROFILE_FILENAME,
    InterruptedTrainingWarning,
    check_profile,
)
from lightning_unlearn.unlearn.adapters.source import (
    own_unlearned_checkpoint,
    profile_training_set,
)
from lightning_unlearn.unlearn.request.results import finite, lr_search_record, poison_kind, request_scalars
from lightning_unlearn.unlearn.request.target import target_summary
from lightning_unlearn.utils import TEMP_PATTERN, atomic_write, atomic_write_text, disk_full

REPORT_FILENAME = "report.json"
UNLEARNED_FILENAME = "unlearned.ckpt"
#: The files an unlearning request writes into its output folder (besides TensorBoard's ``events.out.tfevents.*``):
#: a folder holding anything else is never replaced, even with ``overwrite``.
REQUEST_FILES = (REPORT_FILENAME, UNLEARNED_FILENAME, "config.yaml", "hparams.yaml", PROFILE_FILENAME)


def request_foreign(folder: Path) -> list[str]:
    """Entries of an existing output folder that no unlearning request writes (a training run's files, the outputs
    of requests chained on this one, anything else)."""
    foreign = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        ours = name in REQUEST_FILES or name.startswith("events.out.tfevents.") or TEMP_PATTERN.match(name)
        if not (ours and entry.is_file() and not entry.is_symlink()):
            foreign.append(name + ("/" if entry.is_dir() else ""))
    return foreign


def describe_request_folder(folder: Path) -> str:
    """What an existing output folder holds, in words (for the refusal to replace it)."""
    names = sorted(p.name for p in folder.iterdir())
    if REPORT_FILENAME in names:
        return f"{REPORT_FILENAME} from an earlier request"
    shown = ", ".join(names[:5]) + (" …" if len(names) > 5 else "")
    return f"{shown} (no {REPORT_FILENAME}: not a finished request)"


def claim_request_folder(folder: str | Path, overwrite: bool = False) -> OutputClaim:
    """Claim an unlearning request's output folder before any work (:class:`~lightning_unlearn.outputs.OutputClaim`):
    refused while another request writes it, when it already holds something (unless ``overwrite``), and always
    when it holds anything a request does not write (:func:`request_foreign`)."""
    return OutputClaim.acquire(
        folder,
        overwrite=overwrite,
        describe=describe_request_folder,
        foreign=request_foreign,
        what="unlearning request",
    )


def run_unlearning(
    trainer: Trainer,
    module: Any,
    reference: dict[str, float] | None = None,
    out_dir: str | Path | None = None,
    evaluation: EvaluationOptions | None = None,
    before: dict[str, float] | None = None,
    overwrite: bool = False,
    calibration: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Evaluate, unlearn with ``trainer.fit(module)``, evaluate again, write ``report.json`` + TensorBoard scalars.

    Before any work the request is checked (a non-empty forget set that is not the whole training split, a model
    that was trained on it, the Trainer's epochs) and its output folder claimed exclusively
    (:func:`claim_request_folder`): the outputs are written into a staging folder beside it and put in place whole at
    the end, so a failed or killed request leaves no partial folder, and an ``overwrite`` leaves the earlier result or
    the new one, never a mix.

    Args:
        trainer: The Trainer (its ``max_epochs`` is set from the method; leave it unset).
        module: An :class:`~lightning_unlearn.unlearn.UnlearnModule`.
        reference: Metrics of the retrained-from-scratch model on the same splits (:func:`reference_metrics`, with the
            same ``evaluation`` options): adds ToW, gaps and % restored (``report["comparison"]``).
        out_dir: Where ``report.json`` and ``unlearned.ckpt`` go. Default: the folder the command line claimed for the
            Trainer's logger; with another logger its ``log_dir`` (written in place, files created exclusively); with
            no logger ``<run>/unlearn/<method>_<selection>/version_<n>``.
        evaluation: What the models are evaluated on besides accuracies (MIA, relearning attack); default: all.
        before: Metrics of the model before unlearning, if already computed with the same options (several requests
            on one run); default: computed here.
        overwrite: Replace the results of an earlier request in the output folder; by default a folder that already
            holds anything is refused before any work.
        calibration: The relearning attack's calibration record (:func:`evaluate_reference`), stored in the report.
        force: Unlearn a forget set that an earlier request of the checkpoint's chain already unlearned (refused by
            default: :func:`~lightning_unlearn.ledger.check_repeat`).

    Returns:
        The report (also written to ``report.json`` on global rank zero). ``before``/``after``/``reference`` hold the
        flat metrics of :func:`~lightning_unlearn.evaluation.suite.evaluate_model`; ``cost`` the wall time and peak
        memory of the unlearning ``fit`` (profile and selection timed apart in ``timings``).

    Raises:
        FileExistsError: If the output folder already holds something and ``overwrite`` is False, holds anything a
            request does not write, or another request is writing it.
        ValueError: If the forget set is empty or the whole training split, the model never trained on it, the
            Trainer sets ``max_epochs``, the profile does not fit the checkpoint, or the chain already unlearned this
            forget set (without ``force``).
        OSError: "no space left on the device" in plain words (nothing of the request is committed).
    """
    expected = module.max_epochs
    if trainer.fit_loop.max_epochs not in (None, expected):
        raise ValueError(
            f"The Trainer's `max_epochs`={trainer.fit_loop.max_epochs} is not used by unlearning: the method sets the "
            f"epochs ({expected} for {module.method.name!r}). Set the method's `epochs` (`--model.method.init_args."
            "epochs`) instead, and leave `max_epochs` unset."
        )
    if module.training_run is not None:
        module.training_run.check_unlearnable(module.datamodule.record, module.datamodule.drop_poisoned)
    module.ledger = start_ledger(module, force)  # a repeated forget set is refused before any output or work
    claim, folder = _claim_output(trainer, module, out_dir, overwrite)
    try:
        report = _unlearn(trainer, module, reference, folder, claim, evaluation, before, overwrite, calibration)
        if claim is not None:
            for logger in trainer.loggers:
                logger.finalize("success")  # close the event files before the folder moves
            claim.commit()
    except BaseException as err:
        if claim is not None:
            claim.abort()
        full = disk_full(err, folder or "the output folder", "Nothing of this request was committed.")
        if full is not None:
            raise full from err
        raise
    return report


def _claim_output(
    trainer: Trainer, module: Any, out_dir: str | Path | None, overwrite: bool
) -> tuple[OutputClaim | None, Path | None]:
    """The request's claim (on the process that writes, global rank zero) and final output folder."""
    writer = launched_as_rank_zero()
    if out_dir is None and trainer.loggers:
        log_dir = trainer.log_dir  # on every rank: under DDP it is a collective
        claim = OutputClaim.of_staging(log_dir)
        if claim is not None:  # claimed by the command line, which pointed the logger at the staging folder
            return claim, claim.final
        if log_dir is not None:  # the caller's own logger writes there too: claimed in place, files exclusive
            folder = Path(log_dir)
            if (folder / REPORT_FILENAME).exists() and not overwrite:
                raise FileExistsError(
                    f"The output folder {str(folder)!r} already holds {REPORT_FILENAME} from an earlier request; pass "
                    "`overwrite=True` (`--overwrite` on the command line) to replace it, or choose another folder."
                )
            return None, folder
    if out_dir is None and module.training_run is None:
        raise ValueError("An own model's request needs an output folder: pass `out_dir` (`--output_dir`) or a logger.")
    if out_dir is None:
        name = f"{type(module.method).__name__}_{type(module.selection).__name__}".lower()
        parent = module.training_run.home / "unlearn" / name  # a chained request beside the earlier one, not in it
        return (OutputClaim.acquire_version(parent, foreign=request_foreign) if writer else None), None
    folder = Path(out_dir)
    if writer:
        return claim_request_folder(folder, overwrite), folder
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:  # every rank refuses what rank zero refuses
        raise FileExistsError(
            f"The output folder {str(folder)!r} already holds {describe_request_folder(folder)}; pass "
            "`overwrite=True` (`--overwrite` on the command line) to replace it, or choose another folder."
        )
    return None, folder


def _prepare_profile(module: Any, device: torch.device) -> None:
    """Before the module loads or computes its profile: verify the file's checksums; compute a profile that
    ``profile=PATH`` names but that does not exist yet, into that path (a read-only run can be unlearned with a
    profile elsewhere); refuse early when the run directory cannot take a computed profile."""
    if module.profile is not None or (module.training_run is None and not getattr(module, "profile_path", None)):
        return  # an own model's profile: given as an object, or computed by the module on its training data
    given = getattr(module, "profile_path", None)
    if not given and not module.needs_curvature:
        return  # nothing reads curvature: the module works from the model's layout (or the run's saved profile)
    if not given and not module.training_run.stores_profile:
        return  # an unlearned checkpoint's profile is computed by the module and kept in the request's own folder
    path = Path(given) if given else module.training_run.profile_path
    if path.is_file():  # checked before the module loads it and selects with it
        verify_archive(path, "sharpness profile")
        check_profile(
            SharpnessProfile.load(path),
            module.names_root,
            str(path),
            bool(getattr(module, "allow_stale_profile", False)),
        )
        return
    if given is None:
        if not os.access(module.training_run.directory, os.W_OK):
            raise PermissionError(
                f"The run directory {str(module.training_run.directory)!r} holds no sharpness profile and is not "
                "writable: pass `--model.profile PATH` (`profile=PATH`) to compute it and write it elsewhere."
            )
        return
    if not launched_as_rank_zero():
        return  # rank zero computes it before its ranks meet in `fit`
    home = module.device
    module.to(device)
    try:
        limit = getattr(module, "profile_max_samples", None)
        profile = profile_training_set(
            module.names_root, module.source.output_transform, module.datamodule, module.estimator, limit,
            device=torch.device(device),
        )  # fmt: skip
    finally:
        module.to(home)
    checkpoint = module.training_run.checkpoint if module.training_run is not None else module.source.checkpoint
    profile.metadata.update(split="train", checkpoint=str(checkpoint))
    profile.save(path)


def start_ledger(module: Any, force: bool) -> dict[str, Any]:
    """The request's place in its checkpoint's unlearning chain (:mod:`lightning_unlearn.ledger`): the parent's
    history, the forget set's sample digests and fingerprint, and the parent's weights; a forget set that the chain
    already unlearned is refused unless ``force`` (partial overlaps are warned about)."""
    module.datamodule.setup("fit")
    digests = sample_digests(module.datamodule.forget_dataloader())
    run, checkpoint = module.training_run, module.source.checkpoint
    if run is not None:
        state, checkpoint = run.state(), run.checkpoint
    else:
        state = read_checkpoint(checkpoint, "Lightning checkpoint", "model") if checkpoint is not None else {}
    history = history_of(state)
    notes = check_repeat(history, digests, force)
    for note in notes:
        rank_zero_warn(note)
    return {
        "history": history,
        "digests": digests,
        "fingerprint": split_fingerprint(digests),
        "notes": notes,
        "forced": any(note.endswith("repeated with force.") for note in notes),
        "parent": {
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "run": None if run is None else str(run.directory),
            "weights": weights_fingerprint(module.names_root),
        },
    }


def _check_prepared(module: Any, after_fit: bool = False) -> None:
    """Check the profile the module loaded or computed (:func:`~lightning_unlearn.run.check_profile`) and warn when
    it averages fewer samples than the training set. After ``fit`` (ranks that prepared in ``setup``) the weights have
    moved: their fingerprint was checked when the profile was loaded, before the update."""
    profile = module.profile
    if profile.is_layout:
        return  # no curvature: nothing to check against the model beyond its layout (built from it)
    run = module.training_run
    where = str(getattr(module, "profile_path", None) or (run.profile_path if run is not None else "computed"))
    stale = after_fit or bool(getattr(module, "allow_stale_profile", False))
    check_profile(profile, module.names_root, where, allow_stale=stale)
    total = len(module.datamodule.train_dataset())
    if profile.num_samples < total:
        rank_zero_warn(
            f"The profile {where!r} averages {profile.num_samples:,} of the {total:,} training samples (a "
            "`max_samples` profile); the selection ranks parameters by that estimate."
        )


def _unlearn(
    trainer: Trainer,
    module: Any,
    reference: dict[str, float] | None,
    folder: Path | None,
    claim: OutputClaim | None,
    evaluation: EvaluationOptions | None,
    before: dict[str, float] | None,
    overwrite: bool,
    calibration: dict[str, Any] | None,
) -> dict[str, Any]:
    evaluation = evaluation or EvaluationOptions()
    # this process's device: the Trainer's, except the CPU when ranks will be forked onto CUDA devices (ddp_fork)
    device = main_process_device(trainer)
    run = module.training_run
    training = run.training_status() if run is not None else {"complete": None}
    if training["complete"] is False:
        rank_zero_warn(
            f"The training run {str(module.training_run.directory)!r} looks interrupted: its checkpoint is from "
            f"epoch {training['epoch'] + 1} of {training['max_epochs']} (config.yaml) and it wrote no results.json. "
            "The request unlearns this checkpoint as it is.",
            category=InterruptedTrainingWarning,
        )
    # a missing `profile=PATH` is computed by this process: on the Trainer's device unless ranks will be forked
    _prepare_profile(module, device)
    module.prepare_before_fit(trainer)
    prepared_in_fit = module.guard is None  # ranks launched as scripts prepare together in `setup`
    if not prepared_in_fit:
        _check_prepared(module)
    module.datamodule.setup("fit")
    if before is None:
        before = evaluate_model(module.net, module.datamodule, evaluation, device)
    module.target_record["before"] = module.target_reading(device)
    trainer.fit_loop.max_epochs = module.max_epochs
    module.evaluation = None  # this request evaluates (MIA, relearning attack included) and logs itself, below
    with measure(device) as cost, quiet():  # Lightning's notes on a one-step fit (no optimizer, few batches) are noise
        trainer.fit(module)
    if prepared_in_fit:
        _check_prepared(module, after_fit=True)
    # profile and selection are timed apart (`timings`); the request's cost is the update plus the selection
    selection = module.timings.get("selection_seconds") or 0.0
    preparation = (module.timings.get("profile_seconds") or 0.0) + selection if prepared_in_fit else 0.0
    seconds = cost.seconds - preparation + selection
    after = evaluate_model(module.net, module.datamodule, evaluation, device)
    module.target_record["after"] = module.target_reading(device)
    total = sum(p.numel() for p in module.names_root.parameters())
    dm = module.datamodule
    source = {"run": str(run.directory), "checkpoint": str(run.checkpoint)} if run is not None else {
        "model": type(module.names_root).__name__,
        "checkpoint": None if module.source.checkpoint is None else str(module.source.checkpoint),
    }  # fmt: skip
    poison = dm.spec.to_dict() if hasattr(dm, "spec") else {"kind": poison_kind(dm), "target": dm.attacked_class}
    report: dict[str, Any] = {
        **source,
        "training": training,
        "poison": poison,
        "forget_samples": len(dm.record),
        "selection": module.mask.summary(total),
        "method": module.method.report() | lr_search_record(module),
        "profile": {
            "estimator": module.profile.estimator,
            "num_samples": module.profile.num_samples,
            "source": module.timings.get("profile_source"),
        },
        "timings": {
            "profile_seconds": module.timings.get("profile_seconds"),
            "selection_seconds": module.timings.get("selection_seconds"),
            "fit_wall_seconds": cost.seconds,
        },
        # the ranks' own peak where they measured it (ddp_spawn/ddp_fork ranks are other processes than this one)
        "cost": {"seconds": max(seconds, 0.0), **fit_memory(module.timings, cost)},
        "evaluation": evaluation.to_dict(),
        "target": target_summary(module.target_record),
        "before": before,
        "after": after,
    }
    if reference is not None:
        report["reference"] = dict(reference)
        report["poison_effect"] = finite(poison_effect(before, reference, poison["kind"]))
        report["comparison"] = finite(compare(before, after, reference))
        if getattr(reference, "outputs", None):  # the reference's logits: per-sample distances of the outputs
            model_outputs = split_outputs(module.net, module.datamodule, device)
            report["comparison"].update(finite(output_distance(model_outputs, reference.outputs)))
        report["restored"] = {k: v for k, v in report["comparison"].items() if "_restored/" in k}
    if calibration is not None:
        report["relearn_calibration"] = calibration
    ledger = getattr(module, "ledger", None)
    if ledger is not None:
        report["history"] = {
            "step": len(ledger["history"]) + 1,
            "forget_sha256": ledger["fingerprint"],
            "parent_weights": ledger["parent"]["weights"],
            "weights": weights_fingerprint(module.names_root),
            "notes": ledger["notes"],
        }
    if trainer.is_global_zero:
        final = claim.final if claim is not None else folder
        target = claim.staging if claim is not None else folder
        exclusive = claim is None and not overwrite  # in place (the caller's logger folder): never replace
        report["output_dir"] = str(final)
        save_unlearned(module, target / UNLEARNED_FILENAME, exclusive=exclusive, report=report)
        if run is not None and not run.stores_profile and not getattr(module, "profile_path", None):
            # a chained request's computed profile: in its own folder (the earlier request's is not written into)
            state = module.profile.state_dict()
            atomic_write(target / PROFILE_FILENAME, lambda handle: torch.save(state, handle), exclusive=exclusive)
        atomic_write_text(target / REPORT_FILENAME, json.dumps(_jsonable(report), indent=1), exclusive=exclusive)
        for logger in trainer.loggers:
            logger.log_metrics(request_scalars(report), step=trainer.global_step)
        log_relearn_curves(trainer.loggers, report)
        for logger in trainer.loggers:
            logger.save()
    return report


def log_relearn_curves(loggers: list[Any], report: dict[str, Any]) -> None:
    """The relearning attack's recovery curve of every model in ``report`` as scalar series (x = attack step) and as
    one figure."""
    curves = {
        label: curve_of(report[key])
        for key, label in (("before", "poisoned (before)"), ("after", "unlearned (after)"), ("reference", "retrained"))
        if key in report
    }
    curves = {label: curve for label, curve in curves.items() if curve[0]}
    if not curves:
        return
    for logger in loggers:
        for label, (steps, values) in curves.items():
            tag = f"relearn_curve/{label.split(' ')[0]}"
            for step, value in zip(steps, values, strict=True):
                logger.log_metrics({tag: value}, step=step)
    log_figure(loggers, "relearn/recovery_curves", lambda: relearn_figure(curves))


def save_unlearned(module: Any, path: Path, exclusive: bool = False, report: dict[str, Any] | None = None) -> Path:
    """Save the unlearned network as a ``ClassifierModule`` checkpoint (atomically), which reopens wherever a training
    checkpoint does (``unlearn.py --model.run``, ``lightning-unlearn profile``, ``sweep``, :class:`TrainingRun`):
    the classifier's and the data module's own hyper-parameters, the poison record (in the data module's state, as
    Lightning stores it) and where it came from (``unlearned_from``). An own model's: its own checkpoint's layout
    (:func:`~lightning_unlearn.unlearn.adapters.source.own_unlearned_checkpoint`). Both carry the chain's audit ledger
    with this request appended (``unlearning_history``, :mod:`lightning_unlearn.ledger`; ``report`` gives its key
    metrics)."""
    if module.training_run is None:
        state = own_unlearned_checkpoint(module)
        state.update(_history(module, report))
        return atomic_write(path, lambda handle: torch.save(state, handle), exclusive=exclusive)
    datamodule = module.datamodule
    data = {k: v for k, v in dict(datamodule.hparams).items() if not str(k).startswith("_")}
    data["poison_record"] = None  # the record travels inside the checkpoint, not as a path
    mask = getattr(module, "mask", None)
    state = {
        "state_dict": {k: v.detach().cpu() for k, v in module.net.state_dict(prefix="net.").items()},
        "hyper_parameters": dict(module.classifier_hparams),
        "datamodule_hyper_parameters": data,
        DATAMODULE_STATE_KEY: {"poison_record": datamodule.record.to_dict()},
        "unlearned_from": {
            "run": str(module.training_run.directory),
            "checkpoint": str(module.training_run.checkpoint),
            "method": module.method.name,
            "selection": None if mask is None else mask.strategy,
        },
        "pytorch-lightning_version": __import__("lightning").__version__,
        **_history(module, report),
    }
    return atomic_write(path, lambda handle: torch.save(state, handle), exclusive=exclusive)


def _history(module: Any, report: dict[str, Any] | None) -> dict[str, Any]:
    """``{"unlearning_history": …}``: the parent's chain with this request appended ({} outside a request)."""
    ledger = getattr(module, "ledger", None)
    if ledger is None:
        return {}
    mask = getattr(module, "mask", None)
    history = new_entry(
        ledger["history"],
        digests=ledger["digests"],
        fingerprint=ledger["fingerprint"],
        method=module.method.name,
        selection=None if mask is None else mask.strategy,
        parent=ledger["parent"],
        weights=weights_fingerprint(module.names_root),
        report=report,
        forced=ledger["forced"],
    )
    return {HISTORY_KEY: history}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (torch.Tensor,)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value
