"""The unlearning request end to end: evaluate before, unlearn, evaluate after, compare with a reference, report.

Shared by ``unlearn.py``, ``lightning-unlearn demo`` and the benchmarks, so every number they print is computed the
same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer

from lightning_unlearn.data.datamodule import PoisonedDataModule
from lightning_unlearn.evaluation.cost import measure
from lightning_unlearn.evaluation.figures import curve_of, log_figure, relearn_figure
from lightning_unlearn.evaluation.suite import (
    EvaluationOptions,
    calibrated_options,
    compare,
    evaluate_model,
    poison_effect,
)
from lightning_unlearn.run import TrainingRun
from lightning_unlearn.utils import atomic_write_text

REPORT_FILENAME = "report.json"
UNLEARNED_FILENAME = "unlearned.ckpt"


def reference_metrics(
    reference_run: str | Path, datamodule: PoisonedDataModule, options: EvaluationOptions | None = None
) -> dict[str, float]:
    """All metrics (:func:`~lightning_unlearn.evaluation.suite.evaluate_model`) of a reference model, retrained
    without the poisoned samples, on ``datamodule``'s exact splits (the poisoned run's forget/retain/test sets)."""
    classifier = TrainingRun.from_path(reference_run).load_classifier()
    return evaluate_model(classifier.net, datamodule, options)


def evaluate_reference(
    reference_run: str | Path, datamodule: PoisonedDataModule, options: EvaluationOptions | None = None
) -> tuple[EvaluationOptions, dict[str, float], dict[str, Any] | None]:
    """Calibrate the relearning attack with the reference model on the validation split (see
    :func:`~lightning_unlearn.evaluation.suite.calibrated_options`), then evaluate the reference with it.

    Returns:
        ``(options, metrics, calibration)``: the options every model of the request must be evaluated with (the
        calibrated attack), the reference's metrics, and the calibration's record (None when it is off).
    """
    net = TrainingRun.from_path(reference_run).load_classifier().net
    options, calibration = calibrated_options(net, datamodule, options)
    return options, evaluate_model(net, datamodule, options), calibration


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def run_unlearning(
    trainer: Trainer,
    module: Any,
    reference: dict[str, float] | None = None,
    out_dir: str | Path | None = None,
    evaluation: EvaluationOptions | None = None,
    before: dict[str, float] | None = None,
    overwrite: bool = False,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate, unlearn with ``trainer.fit(module)``, evaluate again, write ``report.json`` + TensorBoard scalars.

    Args:
        trainer: The Trainer (its ``max_epochs`` is set from the method).
        module: An :class:`~lightning_unlearn.unlearn.UnlearnModule`.
        reference: Metrics of the retrained-from-scratch model on the same splits (:func:`reference_metrics`, with the
            same ``evaluation`` options): adds ToW, gaps and % restored (``report["comparison"]``).
        out_dir: Where ``report.json`` and ``unlearned.ckpt`` go; default: the Trainer's ``log_dir``.
        evaluation: What the models are evaluated on besides accuracies (MIA, relearning attack); default: all.
        before: Metrics of the model before unlearning, if already computed with the same options (several requests
            on one run); default: computed here.
        overwrite: Replace the results of an earlier request in the output folder; by default a folder that already
            holds ``report.json`` is refused before any work.
        calibration: The relearning attack's calibration record (:func:`evaluate_reference`), stored in the report.

    Returns:
        The report (also written to ``report.json`` on global rank zero). ``before``/``after``/``reference`` hold the
        flat metrics of :func:`~lightning_unlearn.evaluation.suite.evaluate_model`; ``cost`` the wall time and peak
        memory of the unlearning ``fit`` (profile and selection timed apart in ``timings``).

    Raises:
        FileExistsError: If the output folder already holds ``report.json`` and ``overwrite`` is False.
    """
    # the output folder, decided once on every rank (under DDP `trainer.log_dir` is a collective)
    folder = Path(out_dir or trainer.log_dir or module.training_run.directory / "unlearn")
    if (folder / REPORT_FILENAME).is_file() and not overwrite:
        raise FileExistsError(
            f"The output folder {str(folder)!r} already holds {REPORT_FILENAME} from an earlier request; "
            "pass `overwrite=True` (`--overwrite` on the command line) to replace it, or choose another folder."
        )
    evaluation = evaluation or EvaluationOptions()
    device = trainer.strategy.root_device
    module.prepare_before_fit(trainer)
    prepared_in_fit = module.guard is None  # ranks launched as scripts prepare together in `setup`
    module.datamodule.setup("fit")
    if before is None:
        before = evaluate_model(module.net, module.datamodule, evaluation, device)
    trainer.fit_loop.max_epochs = module.max_epochs
    with measure(device) as cost:
        trainer.fit(module)
    # profile and selection are timed apart (`timings`); the request's cost is the update plus the selection
    selection = module.timings.get("selection_seconds") or 0.0
    preparation = (module.timings.get("profile_seconds") or 0.0) + selection if prepared_in_fit else 0.0
    seconds = cost.seconds - preparation + selection
    after = evaluate_model(module.net, module.datamodule, evaluation, device)
    total = sum(p.numel() for p in module.parameters())
    report: dict[str, Any] = {
        "run": str(module.training_run.directory),
        "checkpoint": str(module.training_run.checkpoint),
        "poison": module.datamodule.spec.to_dict(),
        "selection": module.mask.summary(total),
        "method": module.method.report() | _lr_search(module),
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
        "cost": {
            "seconds": max(seconds, 0.0),
            "peak_mib": cost.peak_bytes / 2**20,
            "memory_method": cost.method,
        },
        "evaluation": evaluation.to_dict(),
        "before": before,
        "after": after,
    }
    if reference is not None:
        report["reference"] = reference
        report["poison_effect"] = _finite(poison_effect(before, reference, module.datamodule.spec.kind))
        report["comparison"] = _finite(compare(before, after, reference))
        report["restored"] = {k: v for k, v in report["comparison"].items() if "_restored/" in k}
    if calibration is not None:
        report["relearn_calibration"] = calibration
    if trainer.is_global_zero:
        report["output_dir"] = str(folder)
        save_unlearned(module, folder / UNLEARNED_FILENAME)
        atomic_write_text(folder / REPORT_FILENAME, json.dumps(_jsonable(report), indent=1))
        for logger in trainer.loggers:
            models = {"before": before, "after": after} | ({"reference": reference} if reference is not None else {})
            # the recovery curves (`relearn/curve@<step>`) go out as series over attack steps instead
            scalars = {f"{m}/{k}": v for m, values in models.items() for k, v in values.items() if "@" not in k}
            scalars |= {f"comparison/{k}": v for k, v in report.get("comparison", {}).items() if v is not None}
            scalars |= {"cost/seconds": report["cost"]["seconds"], "cost/peak_mib": report["cost"]["peak_mib"]}
            effect = report.get("poison_effect", {})
            scalars |= {f"poison/{k}": effect[k] for k in ("harm", "fit", "fit_retrained") if effect.get(k) is not None}
            logger.log_metrics(scalars, step=trainer.global_step)
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


def _lr_search(module: Any) -> dict[str, Any]:
    """The learning-rate search's chosen rate and candidates (``UnlearnModule(lr_grid=...)``), if one ran."""
    search = getattr(module, "lr_search", None)
    return {"lr": search["lr"], "lr_search": search["candidates"]} if search else {}


def save_unlearned(module: Any, path: Path) -> Path:
    """Save the unlearned network as a ``ClassifierModule`` checkpoint (atomically), loadable like a training one."""
    from lightning_unlearn.utils import atomic_write

    state = {
        "state_dict": {k: v.detach().cpu() for k, v in module.net.state_dict(prefix="net.").items()},
        "hyper_parameters": dict(module.classifier_hparams),
        "datamodule_hyper_parameters": dict(module.datamodule.hparams),
        "pytorch-lightning_version": __import__("lightning").__version__,
    }
    return atomic_write(path, lambda handle: torch.save(state, handle))


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
