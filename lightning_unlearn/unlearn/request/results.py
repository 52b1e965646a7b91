"""What one unlearning request measured, as a report and as logger scalars, from Python and the CLI alike.

``UnlearnModule(evaluate=True)`` (the default) evaluates the model when its fit starts and when it ends (accuracies
on the forget set with its trained-on and corrected labels, the retain set, validation and, where the data has one,
the test split with the attacked class apart), compares both with a ``reference`` (a model retrained without the
forget set) when given one, and logs everything to the Trainer's loggers under the keys ``unlearn.py`` uses
(``before/…``, ``after/…``, ``reference/…``, ``comparison/…``, ``poison/…``); :attr:`RequestEvaluation.report` holds
it. ``unlearn.py`` evaluates more (membership inference, the relearning attack) itself and logs with
:func:`request_scalars` too.
"""

from __future__ import annotations

import math
import time
from typing import Any

from torch import nn

from lightning_unlearn.evaluation.distance import ReferenceMetrics, output_distance, split_outputs
from lightning_unlearn.evaluation.suite import ACCURACY_ONLY, compare, evaluate_model, poison_effect
from lightning_unlearn.unlearn.request.target import target_summary

__all__ = ["RequestEvaluation", "request_scalars", "poison_kind", "finite", "lr_search_record"]


def finite(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with NaN / inf floats as None (valid JSON, blank table cells)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def lr_search_record(module: Any) -> dict[str, Any]:
    """The learning-rate search's chosen rate and candidates (``UnlearnModule(lr_grid=...)``), if one ran."""
    search = getattr(module, "lr_search", None)
    return {"lr": search["lr"], "lr_search": search["candidates"]} if search else {}


def poison_kind(datamodule: Any) -> str:
    """The poison kind whose attacked metric states the harm: the data module's poison, or for a user's data
    ``targeted`` with an ``attacked_class`` and ``unspecified`` without (overall test accuracy, said to be that and
    not the attack's metric)."""
    spec = getattr(datamodule, "spec", None)
    if spec is not None:
        return spec.kind
    return "targeted" if getattr(datamodule, "attacked_class", None) is not None else "unspecified"


def request_scalars(report: dict[str, Any]) -> dict[str, float]:
    """The logger scalars of a request's report: every model's metrics (``before/``, ``after/``, ``reference/``; the
    relearning curves' points excepted, they go out as series), ``comparison/``, ``cost/`` and ``poison/``."""
    models = {m: report[m] for m in ("before", "after", "reference") if isinstance(report.get(m), dict)}
    scalars = {f"{m}/{k}": v for m, values in models.items() for k, v in values.items() if "@" not in k}
    scalars |= {f"comparison/{k}": v for k, v in report.get("comparison", {}).items() if v is not None}
    cost = report.get("cost", {})
    scalars |= {f"cost/{k}": cost[k] for k in ("seconds", "peak_mib") if cost.get(k) is not None}
    effect = report.get("poison_effect", {})
    scalars |= {f"poison/{k}": effect[k] for k in ("harm", "fit", "fit_retrained") if effect.get(k) is not None}
    return {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float)) and math.isfinite(v)}


class RequestEvaluation:
    """Before / after / reference evaluation of one request inside its fit (global rank zero only).

    Args:
        reference: A model retrained without the forget set (an ``nn.Module`` mapping inputs to logits), or its
            metrics (a dict as :func:`~lightning_unlearn.evaluation.evaluate_model` returns); None: no comparison.
    """

    def __init__(self, reference: nn.Module | dict[str, float] | None = None) -> None:
        if reference is not None and not isinstance(reference, (nn.Module, dict)):
            raise TypeError(
                f"`reference` must be a model retrained without the forget set (an nn.Module) or its metrics (a dict), "
                f"got {type(reference).__name__}."
            )
        self.reference = reference
        self.before: dict[str, float] | None = None
        #: The request's report (after the fit): see the module docstring.
        self.report: dict[str, Any] = {}
        self._start = 0.0

    def start(self, module: Any) -> None:
        """The model as it is before the update (and the reference, once)."""
        self.before = evaluate_model(module.net, module.datamodule, ACCURACY_ONLY, module.device)
        module.target_record["before"] = module.target_reading()
        if isinstance(self.reference, nn.Module):
            net = self.reference
            self.reference = ReferenceMetrics(evaluate_model(net, module.datamodule, ACCURACY_ONLY, module.device))
            self.reference.outputs = split_outputs(net, module.datamodule, module.device)
        self._start = time.perf_counter()

    def finish(self, module: Any) -> dict[str, Any]:
        """Evaluate the unlearned model, build :attr:`report` and log its scalars to the module's loggers."""
        seconds = time.perf_counter() - self._start
        after = evaluate_model(module.net, module.datamodule, ACCURACY_ONLY, module.device)
        module.target_record["after"] = module.target_reading()
        total = sum(p.numel() for p in module.names_root.parameters())
        profile = None
        if module.profile is not None:
            source = module.timings.get("profile_source")
            profile = {
                "estimator": module.profile.estimator,
                "num_samples": module.profile.num_samples,
                "source": source,
            }
        report: dict[str, Any] = {
            "model": type(module.names_root).__name__,
            "forget_samples": len(module.datamodule.record),
            "selection": None if module.mask is None else module.mask.summary(total),
            "method": module.method.report() | lr_search_record(module),
            "profile": profile,
            "timings": {k: v for k, v in module.timings.items() if isinstance(v, (int, float))},
            "cost": {"seconds": seconds},
            "target": target_summary(module.target_record),
            "before": self.before,
            "after": after,
        }
        if isinstance(self.reference, dict):
            kind = poison_kind(module.datamodule)
            report["reference"] = dict(self.reference)
            report["poison_effect"] = finite(poison_effect(self.before, self.reference, kind))
            report["comparison"] = finite(compare(self.before, after, self.reference))
            if getattr(self.reference, "outputs", None):
                outputs = split_outputs(module.net, module.datamodule, module.device)
                report["comparison"].update(finite(output_distance(outputs, self.reference.outputs)))
            report["restored"] = {k: v for k, v in report["comparison"].items() if "_restored/" in k}
        self.report = report
        trainer = module.attached_trainer
        if trainer is not None:
            for logger in trainer.loggers:
                logger.log_metrics(request_scalars(report), step=trainer.global_step)
                logger.save()
        return report
