"""Choosing an iterative method's learning rate on validation (``UnlearnModule(lr_grid=...)``).

The method runs its whole schedule (``epochs``) once per rate of the grid, inside one ``Trainer.fit``: epochs
``k·E … k·E + E − 1`` belong to rate ``k``. Each block starts from the original weights with a fresh optimizer
state and sees the data in the same order (the module sets its samplers' epoch to the epoch *within* the block);
after it, the validation loss scores the rate. After the last block the weights of the best rate are kept —
"no change" (rate 0) included, so the search never leaves a model that scores worse on validation than the original.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["LearningRateSearch"]


class LearningRateSearch:
    """One search over ``grid`` for a method of ``epochs`` epochs per rate; :attr:`record` is what reports show:
    ``candidates`` (each rate's ``lr``, ``val_loss``, ``val_acc``; rate 0 = the original model) and the chosen
    ``lr``, ``val_loss``, ``val_acc``."""

    def __init__(self, grid: list[float], epochs: int) -> None:
        self.grid, self.epochs = list(grid), int(epochs)
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

    def start_epoch(self, module: Any, epoch: int) -> None:
        """At the first epoch of each rate's block: the original weights, this rate, a fresh optimizer state."""
        block, within = divmod(epoch, self.epochs)
        if within != 0:
            return
        params = dict(module.net.named_parameters())
        if block == 0:
            acc, loss = module.validate()
            self._original = {n: p.detach().clone() for n, p in params.items()}
            self._best, self._best_weights = {"lr": 0.0, "val_loss": loss, "val_acc": acc}, None
            self.record = {"candidates": [dict(self._best)], "lr": None}
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
        """At the last epoch of each rate's block: score it on validation; after the last block keep the best."""
        block, within = divmod(epoch, self.epochs)
        if within != self.epochs - 1:
            return
        acc, loss = module.validate()
        lr = self.grid[block]
        self.record["candidates"].append({"lr": lr, "val_loss": loss, "val_acc": acc})
        if math.isfinite(loss) and loss < self._best["val_loss"]:
            self._best = {"lr": lr, "val_loss": loss, "val_acc": acc}
            self._best_weights = {n: p.detach().clone() for n, p in module.net.named_parameters()}
        if block < len(self.grid) - 1:
            return
        weights = self._best_weights or self._original
        with torch.no_grad():
            for name, p in module.net.named_parameters():
                p.copy_(weights[name])
        self.record.update(self._best)
        if self._best["lr"] == 0.0:
            rank_zero_warn("lr_grid: no learning rate improved the validation loss; the model is unchanged.")
        module.log_dict({"unlearn/lr": self._best["lr"], "unlearn/lr_val_loss": self._best["val_loss"]})
        self._original, self._best_weights = {}, None
