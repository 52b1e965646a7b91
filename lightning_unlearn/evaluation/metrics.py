"""Accuracy-based unlearning metrics: accuracy of a model on a loader, % restored, Tug-of-War (ToW) and gaps.

All accuracies are in percent (0–100). The reference model of % restored and ToW is the model retrained from scratch
without the forget set (or, for poisoning, the model trained on clean data).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_unlearn.batches import unpack_batch

#: Split names :func:`tow` understands, with the direction of a better accuracy in the signed form: ``+1`` = higher is
#: better (accuracy w.r.t. true labels), ``-1`` = lower is better (``forget``: accuracy w.r.t. the poisoned labels).
TOW_SPLITS: dict[str, int] = {"forget": -1, "forget_true": +1, "retain": +1, "test": +1, "val": +1}

_TINY = 1e-9


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a model without either."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextmanager
def evaluating(model: nn.Module, device: str | torch.device | None = None) -> Iterator[torch.device]:
    """Run a block with ``model`` in eval mode, gradients off and (optionally) on ``device``; restore everything after.

    Every submodule's ``training`` flag is restored individually (a model may mix modes, e.g. frozen BatchNorm). When
    ``device`` differs from the model's device the model is moved there (``nn.Module.to`` works in place) and moved
    back on exit.

    Args:
        model: The model to evaluate.
        device: Where to run; default: where the model's parameters are.

    Yields:
        The device inputs must be moved to.
    """
    original = model_device(model)
    target = original if device is None else torch.device(device)
    modes = [(module, module.training) for module in model.modules()]
    moved = target != original
    if moved:
        model.to(target)
    model.eval()
    try:
        with torch.no_grad():
            yield target
    finally:
        for module, mode in modes:
            module.training = mode
        if moved:
            model.to(original)


def iter_logits(
    model: nn.Module, loader: Iterable[Any], device: torch.device, limit: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits, targets)`` of each batch of ``loader``, on ``device``; call inside :func:`evaluating`.

    Args:
        model: The model (already in eval mode on ``device``).
        loader: Batches as understood by :func:`~lightning_unlearn.models.classifier.unpack_batch`.
        device: Device of the model.
        limit: Stop after this many samples; the last batch is truncated so exactly ``limit`` samples are yielded
            (fewer if the loader is shorter).
    """
    seen = 0
    for batch in loader:
        if limit is not None and seen >= limit:
            return
        x, y = unpack_batch(batch)
        if limit is not None and seen + len(y) > limit:
            x, y = x[: limit - seen], y[: limit - seen]
        seen += len(y)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield model(x), y


def evaluate_accuracy(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    attacked_class: int | None = None,
) -> dict[str, float]:
    """Top-1 accuracy (%) of ``model`` on ``loader``, optionally split into the attacked class and the other classes.

    The model runs in eval mode without gradients; its train/eval flags (and device, see :func:`evaluating`) are
    restored afterwards. Accuracies are micro averages over samples, against the labels the loader yields (for the
    forget loader of a poisoned data module these are the poisoned labels).

    Args:
        model: A classifier returning logits of shape ``(batch, classes)``.
        loader: Batches ``(x, y)``, ``(x, y, index)`` or dicts (see ``unpack_batch``).
        device: Where to run; default: the model's device.
        attacked_class: When given, also report ``acc_attacked`` (samples whose label is ``attacked_class``) and
            ``acc_other`` (all other samples).

    Returns:
        ``{"acc", "n"}`` and with ``attacked_class`` also ``{"acc_attacked", "n_attacked", "acc_other", "n_other"}``;
        ``n*`` are sample counts (as floats) and an accuracy over zero samples is NaN.

    Raises:
        ValueError: If the loader yields no samples.
    """
    with evaluating(model, device) as dev:
        logits, labels = predictions(model, loader, dev)
    return accuracy_of(logits, labels, attacked_class)


def predictions(
    model: nn.Module, loader: Iterable[Any], device: torch.device, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(logits, labels)`` of ``loader`` (its first ``limit`` samples, see :func:`iter_logits`) as float32 /
    int64 CPU tensors; call inside :func:`evaluating`.

    One pass gives everything a split is judged by (accuracy, label probabilities, losses), so evaluations that need
    several of them run the model once per split.
    """
    outputs = [(logits.float().cpu(), y.long().cpu()) for logits, y in iter_logits(model, loader, device, limit)]
    if not outputs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])


def accuracy_of(logits: torch.Tensor, labels: torch.Tensor, attacked_class: int | None = None) -> dict[str, float]:
    """Accuracy (%) of ``logits`` against ``labels``, as returned by :func:`evaluate_accuracy`."""
    total = len(labels)
    if total == 0:
        raise ValueError("`loader` yielded no samples; expected a non-empty loader.")
    hits = logits.argmax(-1) == labels
    correct = int(hits.sum())
    out = {"acc": 100.0 * correct / total, "n": float(total)}
    if attacked_class is not None:
        is_attacked = labels == attacked_class
        correct_attacked, total_attacked = int(hits[is_attacked].sum()), int(is_attacked.sum())
        total_other = total - total_attacked
        out["acc_attacked"] = 100.0 * correct_attacked / total_attacked if total_attacked else math.nan
        out["n_attacked"] = float(total_attacked)
        out["acc_other"] = 100.0 * (correct - correct_attacked) / total_other if total_other else math.nan
        out["n_other"] = float(total_other)
    return out


def percent_restored(acc_after: float, acc_before: float, acc_reference: float) -> float:
    """How much of the accuracy lost to the forget set unlearning gave back, in %.

    ``(acc_after - acc_before) / (acc_reference - acc_before) * 100``: 0 = no change, 100 = as good as the reference
    (the model retrained from scratch, or the clean model); it can be negative or exceed 100.

    Args:
        acc_after: Accuracy (%) of the unlearned model.
        acc_before: Accuracy (%) of the model before unlearning.
        acc_reference: Accuracy (%) of the reference model.

    Returns:
        The restored share in %, or NaN when ``|acc_reference - acc_before| < 1e-9`` (nothing was lost).
    """
    lost = acc_reference - acc_before
    if abs(lost) < _TINY:
        return math.nan
    return (acc_after - acc_before) / lost * 100.0


def _check_accuracy(name: str, split: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        msg = f"`{name}[{split!r}]` must be an accuracy in % (a number in [0, 100]), got {value!r}."
        raise ValueError(msg) from None
    if not 0.0 <= value <= 100.0:  # also rejects NaN
        raise ValueError(f"`{name}[{split!r}]` must be an accuracy in % within [0, 100], got {value!r}.")
    return value


def tow(
    unlearned: Mapping[str, float],
    retrained: Mapping[str, float],
    splits: Iterable[str] = ("forget", "retain", "test"),
    signed: bool = False,
) -> float:
    """Tug-of-War: the product over splits of how close the unlearned model's accuracy is to the retrained model's.

    Unsigned (RUM form, the default): ``Π_s (1 - |a_u[s] - a_r[s]| / 100)``, in [0, 1]; 1 = indistinguishable from
    retraining on every split, whichever direction the differences go.

    Signed (``signed=True``, the convention of Tang & Khanna's code): each factor rewards beating the retrained model
    in the split's "good" direction, ``1 + d_s * (a_u[s] - a_r[s]) / 100`` with ``d_s = +1`` where higher accuracy is
    better (``retain``, ``test``, ``val``, ``forget_true`` = forget samples w.r.t. their true labels), i.e.
    ``1 - (a_r - a_u) / 100``, and ``d_s = -1`` for ``forget`` (accuracy w.r.t. the *poisoned* labels, lower is
    better), i.e. ``1 - (a_u - a_r) / 100``. Factors lie in [0, 2], so the product can exceed 1 (at most
    ``2 ** len(splits)``).

    Args:
        unlearned: Accuracies (%) of the unlearned model, keyed by split name.
        retrained: Accuracies (%) of the retrained (reference) model, keyed by split name.
        splits: Which splits enter the product; names from :data:`TOW_SPLITS`.
        signed: Use the signed form instead of the absolute one.

    Returns:
        The ToW score.

    Raises:
        ValueError: On an empty, repeated or unknown split name, a split missing from either mapping, or an accuracy
            outside [0, 100].
    """
    if isinstance(splits, str):
        splits = (splits,)
    splits = tuple(splits)
    if not splits:
        raise ValueError(f"`splits` must name at least one split of {sorted(TOW_SPLITS)}.")
    unknown = [s for s in splits if s not in TOW_SPLITS]
    if unknown:
        raise ValueError(f"`splits` contains unknown split names {unknown}; allowed: {sorted(TOW_SPLITS)}.")
    if len(set(splits)) != len(splits):
        raise ValueError(f"`splits` must not repeat a split, got {list(splits)}.")
    score = 1.0
    for split in splits:
        for name, accs in (("unlearned", unlearned), ("retrained", retrained)):
            if split not in accs:
                raise ValueError(f"`{name}` has no accuracy for split {split!r} (has {sorted(accs)}).")
        a_u = _check_accuracy("unlearned", split, unlearned[split])
        a_r = _check_accuracy("retrained", split, retrained[split])
        if signed:
            score *= 1.0 + TOW_SPLITS[split] * (a_u - a_r) / 100.0
        else:
            score *= 1.0 - abs(a_u - a_r) / 100.0
    return score


def gap(a: float | Mapping[str, float], b: float | Mapping[str, float], keys: Iterable[str] | None = None) -> float:
    """Absolute gap between two accuracies, or the average gap ("Avg. Gap") between two sets of accuracies, in points.

    Args:
        a: An accuracy (%), or accuracies keyed by split/metric name (e.g. the unlearned model's).
        b: The same for the other model (e.g. the retrained reference).
        keys: For mappings: which keys to average over; default: all keys of ``a`` (all must be in ``b``).

    Returns:
        ``|a - b|`` for numbers; ``mean_k |a[k] - b[k]|`` for mappings.

    Raises:
        ValueError: If one argument is a mapping and the other is not, a key is missing, or no keys are left.
    """
    a_is_map, b_is_map = isinstance(a, Mapping), isinstance(b, Mapping)
    if a_is_map != b_is_map:
        raise ValueError("`a` and `b` must both be numbers or both be mappings of accuracies.")
    if not a_is_map:
        return abs(float(a) - float(b))
    keys = list(a) if keys is None else [keys] if isinstance(keys, str) else list(keys)
    if not keys:
        raise ValueError("`keys` must name at least one entry of `a` and `b` (got none).")
    missing = [k for k in keys if k not in a or k not in b]
    if missing:
        raise ValueError(f"`keys` {missing} missing from `a` ({sorted(a)}) or `b` ({sorted(b)}).")
    return sum(abs(float(a[k]) - float(b[k])) for k in keys) / len(keys)


__all__ = [
    "TOW_SPLITS",
    "accuracy_of",
    "evaluate_accuracy",
    "evaluating",
    "gap",
    "iter_logits",
    "model_device",
    "percent_restored",
    "predictions",
    "tow",
]
