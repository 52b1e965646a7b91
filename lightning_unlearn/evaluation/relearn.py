"""Relearning attack: does a little fine-tuning on part of the forget set bring the forgotten behaviour back?

An unlearning method that only hides the poisoned behaviour (rather than removing it) is recovered by a short
fine-tune on a few forget samples, and the recovered behaviour generalises to the forget samples the attack did not
use. The same attack on the model retrained from scratch is the reference: it only shows what the attack samples
themselves teach, so the unlearned model should recover no more than the retrained one.

The attack is reported as a *curve*: the held-out forget accuracy (poisoned labels) every ``eval_every`` steps, and
the area under it (the curve's mean over the attack, in %), so that a model that relearns in 5 steps and one that
needs 40 are told apart even where both end at the same level.

A budget that re-poisons every model measures nothing (with one poisoned label, e.g. a 9 → 4 flip on MNIST, a clean
model learns the flip from 10 % of the forget set within a few steps at ``lr = 0.01``). :func:`calibrate_relearning`
picks the learning rate on the validation split instead: the strongest rate of a grid under which a clean model (the
retrained reference), attacked with the same poison applied to validation images, stays below a ceiling. Neither the
forget set nor the test set is looked at.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lightning_unlearn.batches import unpack_batch
from lightning_unlearn.evaluation.metrics import evaluate_accuracy, model_device

_EVAL_BATCH = 512


def _gather(loader: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for batch in loader:
        x, y = unpack_batch(batch)
        xs.append(x.detach().cpu())
        ys.append(y.detach().cpu())
    if not xs or sum(len(y) for y in ys) == 0:
        raise ValueError("`forget_loader` yielded no samples; expected a non-empty forget set.")
    return torch.cat(xs), torch.cat(ys)


def _chunks(x: torch.Tensor, y: torch.Tensor, size: int = _EVAL_BATCH) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(y), size):
        yield x[start : start + size], y[start : start + size]


class _Chunks:
    """A re-iterable loader over in-memory tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return _chunks(self.x, self.y)


def attack_size(fraction: float, n: int) -> int:
    """``⌈fraction · n⌉`` samples (at least 1), robust to float noise (``0.1 * 150`` is 15, not 16)."""
    return max(1, math.ceil(round(fraction * n, 9)))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    if len(y) == 0:
        return math.nan
    return evaluate_accuracy(model, _Chunks(x, y), device=device)["acc"]


def _test_accuracy(model: nn.Module, loader: Iterable[Any], device: torch.device) -> float:
    try:
        return evaluate_accuracy(model, loader, device=device)["acc"]
    except ValueError:
        raise ValueError("`test_loader` yielded no samples; expected a non-empty test set.") from None


def relearning_attack(
    model: nn.Module,
    forget_loader: Iterable[Any],
    test_loader: Iterable[Any],
    *,
    fraction: float = 0.1,
    steps: int = 20,
    lr: float = 0.01,
    batch_size: int = 32,
    seed: int = 0,
    eval_every: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Fine-tune a copy of ``model`` on part of the forget set (poisoned labels) and measure what comes back.

    1. The forget set is read from ``forget_loader`` in order (its labels must be the *poisoned* ones, e.g.
       ``PoisonedDataModule.forget_dataloader()``) and held in memory.
    2. A permutation seeded by ``seed`` splits it: the first ``k = ⌈fraction · |D_f|⌉`` samples are the attack set,
       the other ``|D_f| - k`` the *remaining* (held-out) forget samples. With the same loader order and seed, the
       unlearned and the retrained model are attacked on the same samples.
    3. A deep copy of the model (the caller's model is never modified) is trained, all parameters unfrozen and in
       train mode, for ``steps`` plain SGD steps of cross-entropy on minibatches of ``min(batch_size, k)`` attack
       samples, drawn from consecutive seeded permutations of the attack set (every batch full size).
       The whole call runs with the global RNG forked and seeded with ``seed`` (dropout, DataLoader seeds), so it is
       reproducible and leaves the caller's RNG state as it was.
    4. Accuracy is measured (eval mode) before and after the attack, and on the remaining forget samples also every
       ``eval_every`` steps (the recovery curve).

    Defaults: ``fraction=0.1`` is the usual "small part of the forget set" of relearning attacks (15 of 150 poisoned
    samples); ``batch_size=32`` makes each step a full-batch step on such a small attack set; ``lr=0.01`` (a fifth of
    ``ClassifierModule``'s training learning rate, no momentum) with ``steps=20`` is a small budget, a handful of passes
    over the attack samples. Larger budgets mostly measure how fast *any* model, the retrained one included, learns the
    attack samples' poisoned labels and generalises them to the rest of the forget set (with a single poison label,
    e.g. targeted 9→4 on MNIST, a clean model reaches > 90% within 10 such steps), and cost more test accuracy; small
    budgets separate a model that still carries the poisoned behaviour from one that never learnt it. Report the
    attack on the retrained model next to the unlearned one either way.

    Args:
        model: The model to attack (unlearned, or retrained as the reference); returns logits.
        forget_loader: D_f with poisoned labels, in a fixed order (not shuffled).
        test_loader: The clean test set.
        fraction: Share of the forget set the attacker fine-tunes on, in (0, 1].
        steps: Number of SGD steps, >= 1.
        lr: SGD learning rate, > 0.
        batch_size: Minibatch size, >= 1 (capped at the attack-set size).
        seed: Seed of the split, the batch order and the RNG during fine-tuning.
        eval_every: Measure the remaining forget samples' accuracy every this many steps (default: only before and
            after, a curve of two points).
        device: Where to fine-tune and evaluate; default: the model's device.

    Returns:
        A dict with ``n_forget`` (= |D_f|), ``n_attack`` (= k), ``n_remaining`` (= |D_f| - k);
        ``forget_acc_before`` / ``forget_acc_after``: accuracy (%) w.r.t. the poisoned labels on the *remaining* forget
        samples (NaN when none remain, i.e. ``fraction=1``); ``recovery`` = after - before, in points (how much
        poisoned behaviour the attack brought back on samples it never saw); ``attack_acc_before`` /
        ``attack_acc_after``: the same on the attack samples; ``test_acc_before`` / ``test_acc_after``: clean test
        accuracy (%); ``curve_steps`` / ``curve``: the steps at which the remaining forget accuracy was measured
        (0 and ``steps`` included) and its values; ``auc``: the area under that curve divided by ``steps`` (the mean
        accuracy over the attack, %; trapezoid rule); and the settings ``fraction``, ``steps``, ``lr``,
        ``batch_size``, ``seed``, ``eval_every``.

    Raises:
        ValueError: On ``fraction`` outside (0, 1], ``steps`` or ``batch_size`` < 1, ``lr`` <= 0, or an empty loader.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"`fraction` must lie in (0, 1], got {fraction!r}.")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"`steps` must be an integer >= 1, got {steps!r}.")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr!r}.")
    if eval_every is not None and (int(eval_every) != eval_every or eval_every < 1):
        raise ValueError(f"`eval_every` must be an integer >= 1 or None, got {eval_every!r}.")
    steps, batch_size = int(steps), int(batch_size)
    eval_every = steps if eval_every is None else int(eval_every)

    dev = model_device(model) if device is None else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    # DataLoader iteration, dropout etc. draw from the global RNG: fork it, so the caller's stream is left untouched
    with torch.random.fork_rng(devices=[dev.index] if dev.type == "cuda" else []):
        x, y = _gather(forget_loader)
        attack = _attack(model, x, y, float(fraction), steps, float(lr), batch_size, seed, eval_every, dev)
        attack["test_acc_before"] = _test_accuracy(model, test_loader, dev)
        attack["test_acc_after"] = _test_accuracy(attack.pop("model"), test_loader, dev)
        return attack


def _attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    fraction: float,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    eval_every: int,
    dev: torch.device,
) -> dict[str, Any]:
    torch.manual_seed(seed)  # dropout and the like draw from the global RNG (forked by the callers)
    n = len(y)
    k = attack_size(fraction, n)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    attack, remaining = order[:k], order[k:]
    x_att, y_att, x_rem, y_rem = x[attack], y[attack], x[remaining], y[remaining]

    attacked = copy.deepcopy(model).to(dev)
    for param in attacked.parameters():
        param.requires_grad_(True)

    result: dict[str, Any] = {
        "n_forget": n,
        "n_attack": k,
        "n_remaining": n - k,
        "forget_acc_before": _accuracy(attacked, x_rem, y_rem, dev),
        "attack_acc_before": _accuracy(attacked, x_att, y_att, dev),
    }
    curve_steps, curve = [0], [result["forget_acc_before"]]

    per_step = min(batch_size, k)
    optimizer = torch.optim.SGD(attacked.parameters(), lr=lr)
    queue = torch.empty(0, dtype=torch.long)
    for step in range(1, steps + 1):
        attacked.train()
        while len(queue) < per_step:
            queue = torch.cat([queue, torch.randperm(k, generator=generator)])
        idx, queue = queue[:per_step], queue[per_step:]
        xb, yb = x_att[idx].to(dev), y_att[idx].to(dev)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(attacked(xb), yb.long()).backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            curve_steps.append(step)
            curve.append(_accuracy(attacked, x_rem, y_rem, dev))

    result["forget_acc_after"] = curve[-1]
    result["recovery"] = result["forget_acc_after"] - result["forget_acc_before"]
    result["attack_acc_after"] = _accuracy(attacked, x_att, y_att, dev)
    result["curve_steps"], result["curve"] = curve_steps, curve
    result["auc"] = curve_area(curve_steps, curve)
    result.update(fraction=fraction, steps=steps, lr=lr, batch_size=batch_size, seed=seed, eval_every=eval_every)
    result["model"] = attacked
    return result


def curve_area(steps: list[int], values: list[float]) -> float:
    """Area under a recovery curve divided by its length: the mean value over the attack (trapezoid rule); NaN when
    any point is NaN (no held-out samples)."""
    if len(steps) < 2 or any(math.isnan(v) for v in values):
        return math.nan
    area = sum((b - a) * (u + v) / 2 for a, b, u, v in zip(steps, steps[1:], values, values[1:], strict=False))
    return area / (steps[-1] - steps[0])


#: Learning rates :func:`calibrate_relearning` tries (plain SGD, batch 32).
CALIBRATION_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def calibrate_relearning(
    clean_model: nn.Module,
    poisoned_validation: Iterable[Any],
    *,
    fraction: float = 0.1,
    steps: int = 50,
    batch_size: int = 32,
    seed: int = 0,
    ceiling: float = 50.0,
    lrs: tuple[float, ...] = CALIBRATION_LRS,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """The strongest attack learning rate under which a clean model does not relearn the poison from the attack.

    The attack of :func:`relearning_attack` (same ``fraction``, ``steps``, ``batch_size``, ``seed``) is run on
    ``clean_model`` (a model never trained on the poison: the retrained reference) with ``poisoned_validation`` as its
    forget set (the training poison applied afresh to the clean validation split, e.g.
    ``PoisonedDataModule.poisoned_validation_dataloader()``). Every rate of ``lrs`` is tried; the largest whose final
    held-out accuracy w.r.t. the poisoned labels stays at or below ``ceiling`` (%) is chosen, the smallest of ``lrs``
    if none does. Attacking with the chosen rate, the clean model does not relearn the poison fully, so what another
    model recovers beyond it is poisoned behaviour it still carries.

    Returns:
        ``{"lr", "ceiling", "candidates": [{"lr", "final", "auc"}, ...], "reached_ceiling": bool}`` (with
        ``reached_ceiling`` False when even the smallest rate exceeded the ceiling).
    """
    if not 0.0 <= ceiling <= 100.0:
        raise ValueError(f"`ceiling` must lie in [0, 100], got {ceiling!r}.")
    if not lrs or any(not lr > 0 for lr in lrs):
        raise ValueError(f"`lrs` must be a non-empty sequence of positive learning rates, got {lrs!r}.")
    dev = model_device(clean_model) if device is None else torch.device(device)
    x, y = _gather(poisoned_validation)
    candidates = []
    with torch.random.fork_rng(devices=[dev.index] if dev.type == "cuda" and dev.index is not None else []):
        for lr in sorted(lrs):
            out = _attack(clean_model, x, y, fraction, steps, float(lr), batch_size, seed, steps, dev)
            candidates.append({"lr": float(lr), "final": out["forget_acc_after"], "auc": out["auc"]})
    below = [c for c in candidates if c["final"] <= ceiling]
    chosen = max(below, key=lambda c: c["lr"]) if below else candidates[0]
    return {"lr": chosen["lr"], "ceiling": ceiling, "candidates": candidates, "reached_ceiling": not below}


__all__ = ["CALIBRATION_LRS", "attack_size", "calibrate_relearning", "curve_area", "relearning_attack"]
