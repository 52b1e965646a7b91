"""Iterative baselines: fine-tuning on the retain set and NegGrad+ (and the loaders the SAM-style methods share).

Both run under manual optimization; every step zeroes the gradient of frozen entries before ``optimizer.step()`` and
restores them after it (:class:`~lightning_unlearn.unlearn.request.freeze.FreezeGuard`), so the hard freeze holds
with any optimizer, weight decay and momentum included. The network stays in ``eval()`` mode (BatchNorm statistics and
dropout frozen) so that frozen layers really do not change.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch.utilities import CombinedLoader

from lightning_unlearn.unlearn.base import UnlearnContext, UnlearnMethod, weighted_mean


def rank_count(module: UnlearnContext, weight: torch.Tensor) -> torch.Tensor:
    """The real samples of all ranks' batches divided by the number of ranks, ``Σ_ranks Σ w / world`` (one scalar
    all-reduce; padding has weight 0, see ``ShardSampler``). With one process: the batch's sample count."""
    return rank_counts(module, weight)[0]


def rank_counts(module: UnlearnContext, *weights: torch.Tensor) -> list[torch.Tensor]:
    """:func:`rank_count` of several batches' weights with one all-reduce for all of them (a step that pairs a forget
    and a retain batch needs both counts: one collective instead of two)."""
    total = module.all_reduce_sum({str(i): w.sum() for i, w in enumerate(weights)})
    return [total[str(i)] / module.world_size for i in range(len(weights))]


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """``Σ w·ℓ / count`` over this rank's batch; with ``count`` from :func:`rank_count`, DDP's average of the ranks'
    gradients is exactly the mean over the real samples of all ranks' batches (one process: the batch mean)."""
    return weighted_mean(F.cross_entropy(logits, targets, reduction="none"), weight, count)


def optimizer_step(module: UnlearnContext, loss: torch.Tensor) -> None:
    """One manual-optimization step that respects the hard freeze."""
    optimizer = module.optimizers()
    optimizer.zero_grad()
    module.manual_backward(loss)
    module.guard.zero_frozen_grads()
    optimizer.step()
    module.guard.restore()


#: What one epoch of a method that pairs forget and retain batches passes over (see :class:`PairedMethod`).
EPOCH_OVER = ("forget", "retain")


class IterativeMethod(UnlearnMethod):
    """Base of methods that train for ``epochs`` passes over their data.

    Args:
        epochs: Passes over the method's data (the Trainer's ``max_epochs`` is set from it).
        batch_size: Batch size of each of the method's loaders.
    """

    def __init__(self, epochs: int = 1, batch_size: int = 128) -> None:
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"`epochs` and `batch_size` must be >= 1, got {epochs} and {batch_size}.")
        self.epochs = epochs
        self.batch_size = batch_size

    def report(self) -> dict[str, Any]:
        return {"method": self.name, "epochs": self.epochs, "batch_size": self.batch_size}


class PairedMethod(IterativeMethod):
    """Base of methods whose every step sees a forget batch and a retain batch (NegGrad+, SAM-forget, Sharp MinMax).

    Args:
        epochs: Passes over the data (see ``epoch_over``).
        batch_size: Batch size of the forget and of the retain loader.
        epoch_over: What one epoch passes over: ``"forget"`` — the forget set once, a retain batch alongside each
            forget batch (the epoch ends with the shorter loader); ``"retain"`` — the retain set once, the forget
            batches cycled (the official Sharp MinMax / NegGrad+ code's ``zip(retain, cycle(forget))``: about
            ``|D_r| / |D_f|`` times more steps per epoch).
    """

    def __init__(self, epochs: int = 1, batch_size: int = 128, epoch_over: str = "forget") -> None:
        super().__init__(epochs, batch_size)
        if epoch_over not in EPOCH_OVER:
            raise ValueError(f"`epoch_over` must be one of {EPOCH_OVER}, got {epoch_over!r}.")
        self.epoch_over = epoch_over

    def train_dataloader(self, module: UnlearnContext) -> Any:
        return self.forget_and_retain(module)

    def forget_and_retain(self, module: UnlearnContext) -> CombinedLoader:
        """Forget pairs ``(x, y_poisoned, y_true, idx, weight)`` under ``"forget"`` and retain batches
        ``(x, y, idx, weight)`` under ``"retain"``, as many batches per epoch as ``epoch_over`` says.

        Under ``epoch_over="retain"`` a forget loader shorter than the retain loader restarts when it runs out (in
        the same order within an epoch, as ``itertools.cycle`` replays it); every rank runs the same number of
        batches (both loaders are padded per rank, see ``ShardSampler``).
        """
        dm = module.datamodule
        forget = module.loader(dm.forget_pairs_dataloader().dataset, shuffle=True, batch_size=self.batch_size)
        retain = module.loader(dm.retain_dataloader().dataset, shuffle=True, batch_size=self.batch_size)
        mode = "max_size_cycle" if self.epoch_over == "retain" and len(forget) < len(retain) else "min_size"
        return CombinedLoader({"forget": forget, "retain": retain}, mode=mode)

    def report(self) -> dict[str, Any]:
        return {**super().report(), "epoch_over": self.epoch_over}


class Finetune(IterativeMethod):
    """Fine-tune on the retain set D_r with cross-entropy (the seed paper's baseline uses all parameters)."""

    name = "finetune"

    def train_dataloader(self, module: UnlearnContext) -> Any:
        return module.loader(module.datamodule.retain_dataloader().dataset, shuffle=True, batch_size=self.batch_size)

    def training_step(self, module: UnlearnContext, batch: Any, batch_idx: int) -> torch.Tensor:
        module.net.eval()
        x, y, weight = batch[0], batch[1], batch[-1]
        loss = cross_entropy(module.net(x), y, weight, rank_count(module, weight))
        optimizer_step(module, loss)
        module.log("unlearn/retain_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(weight))
        return loss


class NegGradPlus(PairedMethod):
    """NegGrad+ as Tang & Khanna's code (and Kurmanji et al.) define it: ``α L_retain − (1 − α) L_forget``.

    ``L_retain`` is the cross-entropy on the retain set, ``L_forget`` the cross-entropy of the forget set with the
    labels the model was trained on (the poisoned ones): descent on D_r, ascent on D_f, one optimizer step on the
    weighted sum. ``corrected_weight`` adds ``c · L_corrected``, the cross-entropy of the forget set with its true
    labels (off by default: it is not part of NegGrad+; with it the method also fine-tunes on the corrected forget
    set — this project's earlier variant was ``alpha=β, corrected_weight=β`` with ``β = 0.9``).

    Args:
        epochs: Passes over the data (see ``epoch_over``).
        batch_size: Batch size of the forget and retain loaders.
        alpha: Weight ``α`` in [0, 1] of the retain term; the forget term gets ``1 − α`` (official default 0.99).
        corrected_weight: Weight ``c >= 0`` of the corrected-label forget term (0 = NegGrad+ proper).
        epoch_over: ``"forget"`` or ``"retain"`` (the official recipe), see :class:`PairedMethod`.
    """

    name = "neggrad_plus"

    def __init__(
        self,
        epochs: int = 1,
        batch_size: int = 128,
        alpha: float = 0.99,
        corrected_weight: float = 0.0,
        epoch_over: str = "forget",
    ) -> None:
        super().__init__(epochs, batch_size, epoch_over)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must lie in [0, 1], got {alpha}.")
        if corrected_weight < 0:
            raise ValueError(f"`corrected_weight` must be >= 0 (0 = NegGrad+ proper), got {corrected_weight}.")
        self.alpha = alpha
        self.corrected_weight = corrected_weight
        self.needs_corrected_labels = corrected_weight > 0  # the corrected-label term; NegGrad+ proper needs none

    def training_step(self, module: UnlearnContext, batch: Any, batch_idx: int) -> torch.Tensor:
        module.net.eval()
        (xf, yp, yt, _, wf), (xr, yr, _, wr) = batch["forget"], batch["retain"]
        nf, nr = rank_counts(module, wf, wr)
        logits_f = module.net(xf)
        loss = self.alpha * cross_entropy(module.net(xr), yr, wr, nr) - (1 - self.alpha) * cross_entropy(
            logits_f, yp, wf, nf
        )
        if self.corrected_weight:
            loss = loss + self.corrected_weight * cross_entropy(logits_f, yt, wf, nf)
        optimizer_step(module, loss)
        module.log("unlearn/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(wr))
        return loss

    def report(self) -> dict[str, Any]:
        return {**super().report(), "alpha": self.alpha, "corrected_weight": self.corrected_weight}
