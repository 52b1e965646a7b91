"""Choosing an iterative method's learning rate and number of epochs (``UnlearnModule(lr_grid=...)``).

The method runs its whole schedule (``epochs``) once per rate of the grid, inside one ``Trainer.fit``: epochs
``k·E … k·E + E − 1`` belong to rate ``k``. Each block starts from the original weights with a fresh optimizer
state and sees the data in the same order (the module sets its samplers' epoch to the epoch *within* the block).
After **every** epoch the request's criterion (:func:`~lightning_unlearn.unlearn.request.criterion.score`: the
forgetting target's by default, the validation loss with ``criterion="loss"``) scores the weights, so the search
chooses a rate *and* how many of its epochs to keep (early stopping). After the last block the best weights are kept
— "no change" (rate 0) included, so the search never leaves a model that scores worse than the original.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_unlearn.unlearn.request.criterion import score

__all__ = ["LearningRateSearch"]


class LearningRateSearch:
    """One search over ``grid`` for a method of ``epochs`` epochs per rate; :attr:`record` is what reports show:
    ``candidates`` (each rate's and epoch's ``lr``, ``epochs``, ``score``, ``val_loss``, ``val_acc``; rate 0 = the
    original model) and the chosen ``lr``, ``epochs``, ``score``, ``val_loss``, ``val_acc``.

    Args:
        grid: The learning rates.
        epochs: Epochs of the method per rate.
        criterion: What scores the weights (:data:`~lightning_unlearn.unlearn.request.criterion.CRITERIA`).
    """

    def __init__(self, grid: list[float], epochs: int, criterion: str = "target") -> None:
        self.grid, self.epochs, self.criterion = list(grid), int(epochs), criterion
        self.record: dict[str, Any] = {}
        self._original: dict[str, torch.Tensor] = {}
        self._best: dict[str, Any] = {}
        self._best_weights: dict[str, torch.Tensor] | None = None

    @staticmethod
    def check_grid(grid: list[float] | None, method: Any) -> list[float] | None:
        """``grid`` as floats, or a clear error: it must be a non-empty list of positive rates, for an iterative
        ``method``."""
        if grid is None:
            return None
        if method.one_step:
            raise ValueError(f"`lr_grid` applies to iterative methods; {method.name!r} searches its step size itself.")
        if not grid or any(not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)) for lr in grid):
            raise ValueError(f"`lr_grid` must be a non-empty list of positive learning rates, got {grid!r}.")
        return [float(lr) for lr in grid]

    def block_epoch(self, epoch: int) -> int:
        """The epoch within its rate's block (what the samplers shuffle by)."""
        return epoch % self.epochs

    def _score(self, module: Any, lr: float, epochs: int) -> dict[str, Any]:
        value, measured, _ = score(module, self.criterion)
        return {"lr": lr, "epochs": epochs, "score": value, **measured}

    def start_epoch(self, module: Any, epoch: int) -> None:
        """At the first epoch of each rate's block: the original weights, this rate, a fresh optimizer state."""
        block, within = divmod(epoch, self.epochs)
        if within != 0:
            return
        params = dict(module.net.named_parameters())
        if block == 0:
            self._original = {n: p.detach().clone() for n, p in params.items()}
            self._best, self._best_weights = self._score(module, 0.0, 0), None
            self.record = {"criterion": self.criterion, "candidates": [dict(self._best)], "lr": None}
        else:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(self._original[name])
        lr = self.grid[block]
        optimizers = module.optimizers(use_pl_optimizer=False)
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            optimizer.state.clear()  # momentum / Adam moments of the previous rate
            for group in optimizer.param_groups:
                group["lr"] = lr

    def end_epoch(self, module: Any, epoch: int) -> None:
        """After every epoch: score the weights (the best rate and epoch so far are kept); after the last block keep
        the best."""
        block, within = divmod(epoch, self.epochs)
        candidate = self._score(module, self.grid[block], within + 1)
        self.record["candidates"].append(candidate)
        if math.isfinite(candidate["score"]) and candidate["score"] < self._best["score"]:
            self._best = candidate
            self._best_weights = {n: p.detach().clone() for n, p in module.net.named_parameters()}
        if within != self.epochs - 1 or block < len(self.grid) - 1:
            return
        weights = self._best_weights or self._original
        with torch.no_grad():
            for name, p in module.net.named_parameters():
                p.copy_(weights[name])
        self.record.update(self._best)
        if self._best["lr"] == 0.0:
            rank_zero_warn(f"lr_grid: no learning rate improved the {self.criterion} criterion; nothing changed.")
        module.log_dict({"unlearn/lr": self._best["lr"], "unlearn/lr_score": self._best["score"]})
        self._original, self._best_weights = {}, None
