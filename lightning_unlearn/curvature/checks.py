"""Whether a model's GGN diagonal is its Hessian diagonal: :func:`check_exact` and :func:`find_inexact_modules`."""

from __future__ import annotations

import warnings

from torch import nn

from lightning_unlearn.curvature._engine.registry import RULES, rule_for, supported_names
from lightning_unlearn.curvature._support import display

__all__ = ["PIECEWISE_LINEAR_MODULES", "SUPPORTED_LAYERS", "check_exact", "find_inexact_modules"]

#: Parameter-holding layers whose per-sample squared gradients the ``exact``/``mc``/``fisher`` estimators compute
#: (the keys of the engine's ``{module type: rule}`` map).
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = tuple(RULES)

#: Parameter-free modules that are piecewise linear (in eval mode), so they keep ``diag(H) = diag(GGN)``.
PIECEWISE_LINEAR_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)

try:  # a LightningModule's torchmetrics objects hold state, not parameters, and never run in `forward`
    from torchmetrics import Metric, MetricCollection

    _NOT_IN_FORWARD: tuple[type, ...] = (Metric, MetricCollection)
except ImportError:  # pragma: no cover - torchmetrics is a dependency
    _NOT_IN_FORWARD = ()
# Containers compute nothing themselves (their children are checked one by one), even when empty.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def find_inexact_modules(model: nn.Module) -> list[str]:
    """Describe every module that breaks ``diag(H) = diag(GGN)`` under cross-entropy (empty list: exact).

    See :func:`check_exact` for the rules.

    Args:
        model: The network.
    """
    return [problem for problem, _ in _problems(model)]


def _problems(model: nn.Module) -> list[tuple[str, bool]]:
    """``(description, computable)`` of every module that breaks ``diag(H) = diag(GGN)``; ``computable``: whether the
    ``exact`` engine can still compute the GGN diagonal (``False``: a parameter-holding layer it has no rule for, or
    one whose rule refuses it in eval mode, such as a BatchNorm without running statistics)."""
    problems: list[tuple[str, bool]] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if any(name.startswith(prefix + ".") for prefix in skipped):
            continue
        if isinstance(module, _NOT_IN_FORWARD):  # metrics and bare containers are never called by `forward`
            skipped.append(name)
            continue
        has_own_params = any(True for _ in module.parameters(recurse=False))
        is_leaf = not any(True for _ in module.children())
        rule = rule_for(module)
        if rule is not None:
            reason = rule.inexact(module)
            if reason is not None:
                problems.append((f"{display(name)} ({kind}) {reason}", _computable_in_eval(rule, name, module)))
        elif has_own_params:  # computed by the engine's generic path; GGN and Hessian diagonals may differ
            problems.append((f"{display(name)} ({kind}) holds parameters but is not one of {supported_names()}", True))
        elif is_leaf and not isinstance(module, (*PIECEWISE_LINEAR_MODULES, *_CONTAINERS)):
            problems.append((f"{display(name)} ({kind}) is not known to be piecewise linear", True))
        elif isinstance(module, _DROPOUTS) and module.training:
            problems.append((f"{display(name)} ({kind}) is in training mode", True))
    return problems


def _computable_in_eval(rule: type, name: str, module: nn.Module) -> bool:
    """Whether the engine's rule accepts ``module`` once the profiling loop has put it in eval mode."""
    training = module.training
    module.training = False
    try:
        rule.check(name, module, "exact")
        return True
    except ValueError:
        return False
    finally:
        module.training = training


def check_exact(model: nn.Module, *, strict: bool = True) -> list[str]:
    """Check that the GGN diagonal of ``model`` under cross-entropy is its Hessian diagonal.

    Walks all modules. The check passes when every leaf module is one of :data:`SUPPORTED_LAYERS` (Linear,
    Conv1d/2d/3d, or BatchNorm1d/2d/3d in eval mode with running statistics) or a piecewise-linear parameter-free
    module (ReLU, LeakyReLU, ReLU6, Hardtanh, max/avg and adaptive pooling, Flatten/Unflatten, Identity, zero/constant
    padding, Dropout in eval mode). Container modules
    (``nn.Sequential``, ResNet blocks, ...) are fine as long as they hold no parameters themselves; additions such as
    residual connections inside their ``forward`` keep exactness.

    Functional operations called inside a ``forward`` (``F.gelu``, ``torch.tanh``, ``F.layer_norm``, a softmax, ...)
    cannot be detected by walking modules: a model that uses them passes this check although its GGN diagonal is not
    its Hessian diagonal. Use the ``hutchinson`` estimator for such models.

    What ``strict=False`` allows: the ``exact`` estimator computes the GGN diagonal of any differentiable network —
    GELU, tanh, softmax between its supported layers, and parameters of any other module (LayerNorm, attention,
    embeddings, free parameters: the engine's generic ``torch.func`` path) — which is then not the Hessian's. Only a
    BatchNorm without running statistics is refused whatever ``strict`` (its samples are coupled by the batch).

    Args:
        model: The network (in the mode it will be evaluated in; the profiling loop puts it in eval mode first).
        strict: ``True``: raise when the check fails. ``False``: only warn that the result is then the GGN diagonal,
            not the Hessian's (layers the engine cannot compute at all are still refused).

    Returns:
        The list of problems found (empty when the diagonal is exact).

    Raises:
        ValueError: With ``strict=True``, naming every offending module (qualified name and type); whatever
            ``strict``, for layers the ``exact`` estimator cannot compute, advising ``estimator='hutchinson'``.
    """
    found = _problems(model)
    problems = [problem for problem, _ in found]
    uncomputable = [problem for problem, computable in found if not computable]
    if uncomputable:
        raise ValueError(
            f"The 'exact' estimator cannot profile this {type(model).__name__}, whatever `strict`: "
            f"{'; '.join(uncomputable)}. Put the layer in eval mode with running statistics, or use "
            "estimator='hutchinson'."
        )
    if problems:
        listing = "; ".join(problems)
        if strict:
            raise ValueError(
                f"diag(Hessian) = diag(GGN) does not hold for this {type(model).__name__}: {listing}. Use the exact "
                "estimator with strict=False for the exact GGN diagonal (any architecture), or estimator='hutchinson' "
                "for an estimate of the Hessian diagonal."
            )
        warnings.warn(
            f"{type(model).__name__} is not piecewise linear ({listing}): the 'exact' estimator computes the GGN "
            "diagonal, which is then not the Hessian diagonal.",
            stacklevel=2,
        )
    return problems
