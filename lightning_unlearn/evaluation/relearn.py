"""Relearning attack: does a little fine-tuning on part of the forget set bring the forgotten behaviour back?

An unlearning method that only hides the poisoned behaviour (rather than removing it) is recovered by a short
fine-tune on a few forget samples, and the recovered behaviour generalises to the forget samples the attack did not
use. The same attack on the model retrained from scratch is the reference: it only shows what the attack samples
themselves teach, so the unlearned model should recover no more than the retrained one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lightning_unlearn.evaluation.metrics import evaluate_accuracy, model_device
from lightning_unlearn.models.classifier import unpack_batch

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
    device: str | torch.device | None = None,
) -> dict[str, float]:
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
    4. Accuracy is measured (eval mode) before and after the attack.

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
        device: Where to fine-tune and evaluate; default: the model's device.

    Returns:
        A dict with ``n_forget`` (= |D_f|), ``n_attack`` (= k), ``n_remaining`` (= |D_f| - k);
        ``forget_acc_before`` / ``forget_acc_after``: accuracy (%) w.r.t. the poisoned labels on the *remaining* forget
        samples (NaN when none remain, i.e. ``fraction=1``); ``recovery`` = after - before, in points (how much
        poisoned behaviour the attack brought back on samples it never saw); ``attack_acc_before`` /
        ``attack_acc_after``: the same on the attack samples; ``test_acc_before`` / ``test_acc_after``: clean test
        accuracy (%); and the settings ``fraction``, ``steps``, ``lr``, ``batch_size``, ``seed``.

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
    steps, batch_size = int(steps), int(batch_size)

    dev = model_device(model) if device is None else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    # DataLoader iteration, dropout etc. draw from the global RNG: fork it, so the caller's stream is left untouched
    with torch.random.fork_rng(devices=[dev.index] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        return _attack(model, forget_loader, test_loader, float(fraction), steps, float(lr), batch_size, seed, dev)


def _attack(
    model: nn.Module,
    forget_loader: Iterable[Any],
    test_loader: Iterable[Any],
    fraction: float,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    dev: torch.device,
) -> dict[str, float]:
    x, y = _gather(forget_loader)
    n = len(y)
    k = attack_size(fraction, n)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    attack, remaining = order[:k], order[k:]
    x_att, y_att, x_rem, y_rem = x[attack], y[attack], x[remaining], y[remaining]

    attacked = copy.deepcopy(model).to(dev)
    for param in attacked.parameters():
        param.requires_grad_(True)

    result: dict[str, float] = {
        "n_forget": n,
        "n_attack": k,
        "n_remaining": n - k,
        "forget_acc_before": _accuracy(attacked, x_rem, y_rem, dev),
        "attack_acc_before": _accuracy(attacked, x_att, y_att, dev),
        "test_acc_before": _test_accuracy(attacked, test_loader, dev),
    }

    per_step = min(batch_size, k)
    optimizer = torch.optim.SGD(attacked.parameters(), lr=lr)
    queue = torch.empty(0, dtype=torch.long)
    attacked.train()
    for _ in range(steps):
        while len(queue) < per_step:
            queue = torch.cat([queue, torch.randperm(k, generator=generator)])
        idx, queue = queue[:per_step], queue[per_step:]
        xb, yb = x_att[idx].to(dev), y_att[idx].to(dev)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(attacked(xb), yb.long()).backward()
        optimizer.step()

    result["forget_acc_after"] = _accuracy(attacked, x_rem, y_rem, dev)
    result["recovery"] = result["forget_acc_after"] - result["forget_acc_before"]
    result["attack_acc_after"] = _accuracy(attacked, x_att, y_att, dev)
    result["test_acc_after"] = _test_accuracy(attacked, test_loader, dev)
    result.update(fraction=fraction, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    return result


__all__ = ["attack_size", "relearning_attack"]
