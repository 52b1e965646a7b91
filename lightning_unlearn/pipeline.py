"""The unlearning request end to end: evaluate before, unlearn, evaluate after, compare with a reference, report.

Shared by ``unlearn.py``, ``lightning-unlearn demo`` and the benchmarks, so every number they print is computed the
same way.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from torch import nn

from lightning_unlearn.data.datamodule import PoisonedDataModule
from lightning_unlearn.evaluation import evaluate_accuracy, percent_restored
from lightning_unlearn.run import TrainingRun
from lightning_unlearn.utils import atomic_write_text

REPORT_FILENAME = "report.json"
UNLEARNED_FILENAME = "unlearned.ckpt"
#: The accuracies every model is judged by, as ``<split>/<metric>`` (percent).
SPLITS = ("test", "forget", "forget_true", "retain", "val")


def evaluate_splits(
    net: nn.Module, datamodule: PoisonedDataModule, device: torch.device | str | None = None
) -> dict[str, float]:
    """Accuracies (%) of ``net`` on every split of ``datamodule``'s poisoning.

    Keys: ``test/acc`` (+ ``test/acc_target``, ``test/acc_other`` for targeted poisoning), ``forget/acc`` (forget set
    w.r.t. its poisoned labels), ``forget_true/acc`` (w.r.t. its true labels), ``retain/acc``, ``val/acc``.
    """
    datamodule.setup("fit")
    target = datamodule.target_class
    loaders = {
        "test": datamodule.test_dataloader()[0],
        "forget": datamodule.forget_dataloader(),
        "forget_true": datamodule.corrected_forget_dataloader(),
        "retain": datamodule.retain_dataloader(),
        "val": datamodule.val_dataloader(),
    }
    out: dict[str, float] = {}
    for split, loader in loaders.items():
        if split.startswith("forget") and len(loader.dataset) == 0:
            continue
        values = evaluate_accuracy(net, loader, device=device, target_class=target if split == "test" else None)
        out[f"{split}/acc"] = values["acc"]
        if split == "test" and target is not None:
            out["test/acc_target"], out["test/acc_other"] = values["acc_target"], values["acc_other"]
    return out


def reference_metrics(reference_run: str | Path, datamodule: PoisonedDataModule) -> dict[str, float]:
    """Accuracies of a reference model (retrained without the poisoned samples) on ``datamodule``'s exact splits."""
    classifier = TrainingRun.from_path(reference_run).load_classifier()
    return evaluate_splits(classifier.net, datamodule)


#: Below this gap (accuracy points) between the reference and the poisoned model, % restored is not reported: a
#: share of a gap within test-set noise (0.1 point is one sample of a 1,000-sample class) means nothing.
MIN_GAP = 0.5


def restored(
    before: dict[str, float], after: dict[str, float], reference: dict[str, float], min_gap: float = MIN_GAP
) -> dict[str, float]:
    """% restored per test metric (Warnecke's measure): ``(after − before) / (reference − before) · 100``; NaN where
    ``|reference − before| < min_gap`` points."""
    out = {}
    for key in ("test/acc", "test/acc_target", "test/acc_other"):
        if key in before and key in reference:
            gap = abs(reference[key] - before[key])
            value = percent_restored(after[key], before[key], reference[key]) if gap >= min_gap else math.nan
            out[key.replace("/", "_restored/", 1)] = value
    return out


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def run_unlearning(
    trainer: Trainer, module: Any, reference: dict[str, float] | None = None, out_dir: str | Path | None = None
) -> dict[str, Any]:
    """Evaluate, unlearn with ``trainer.fit(module)``, evaluate again, write ``report.json`` + TensorBoard scalars.

    Args:
        trainer: The Trainer (its ``max_epochs`` is set from the method).
        module: An :class:`~lightning_unlearn.unlearn.UnlearnModule`.
        reference: Accuracies of the retrained-from-scratch model on the same splits (for % restored).
        out_dir: Where ``report.json`` and ``unlearned.ckpt`` go; default: the Trainer's ``log_dir``.

    Returns:
        The report (also written to ``report.json`` on global rank zero).
    """
    module.prepare()
    before = evaluate_splits(module.net, module.datamodule, device=trainer.strategy.root_device)
    trainer.fit_loop.max_epochs = module.max_epochs
    start = time.perf_counter()
    trainer.fit(module)
    wall = time.perf_counter() - start
    after = evaluate_splits(module.net, module.datamodule, device=trainer.strategy.root_device)
    total = sum(p.numel() for p in module.parameters())
    report: dict[str, Any] = {
        "run": str(module.training_run.directory),
        "checkpoint": str(module.training_run.checkpoint),
        "poison": module.datamodule.poison.to_dict(),
        "selection": module.mask.summary(total),
        "method": module.method.report(),
        "profile": {
            "estimator": module.profile.estimator,
            "num_samples": module.profile.num_samples,
            "source": module.timings.get("profile_source"),
        },
        "timings": {
            "profile_seconds": module.timings.get("profile_seconds"),
            "selection_seconds": module.timings.get("selection_seconds"),
            "fit_wall_seconds": wall,
        },
        "before": before,
        "after": after,
    }
    if reference is not None:
        report["reference"] = reference
        report["restored"] = _finite(restored(before, after, reference))
    if trainer.is_global_zero:
        folder = Path(out_dir or trainer.log_dir or module.training_run.directory / "unlearn")
        report["output_dir"] = str(folder)
        save_unlearned(module, folder / UNLEARNED_FILENAME)
        atomic_write_text(folder / REPORT_FILENAME, json.dumps(_jsonable(report), indent=1))
        for logger in trainer.loggers:
            scalars = {f"before/{k}": v for k, v in before.items()} | {f"after/{k}": v for k, v in after.items()}
            scalars |= {k: v for k, v in report.get("restored", {}).items() if v is not None}
            logger.log_metrics(scalars, step=trainer.global_step)
            logger.save()
    return report


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
