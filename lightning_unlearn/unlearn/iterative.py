"""Iterative baselines: fine-tuning on the retain set and NegGrad+.

Both run under manual optimization; every step zeroes the gradient of frozen entries before ``optimizer.step()`` and
restores them after it (:class:`~lightning_unlearn.unlearn.freeze.FreezeGuard`), so the hard freeze holds with any
optimizer, weight decay and momentum included. The network stays in ``eval()`` mode (BatchNorm statistics and
dropout frozen) so that frozen layers really do not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch.utilities import CombinedLoader

from lightning_unlearn.unlearn.base import UnlearnMethod, weighted_mean

if TYPE_CHECKING:
    from lightning_unlearn.unlearn.module import UnlearnModule


def rank_count(module: UnlearnModule, weight: torch.Tensor) -> torch.Tensor:
    """The real samples of all ranks' batches divided by the number of ranks, ``Σ_ranks Σ w / world`` (one scalar
    all-reduce; padding has weight 0, see ``ShardSampler``). With one process: the batch's sample count."""
    return module.all_reduce_sum({"n": weight.sum()})["n"] / module.world_size


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """``Σ w·ℓ / count`` over this rank's batch; with ``count`` from :func:`rank_count`, DDP's average of the ranks'
    gradients is exactly the mean over the real samples of all ranks' batches (one process: the batch mean)."""
    return weighted_mean(F.cross_entropy(logits, targets, reduction="none"), weight, count)


def optimizer_step(module: UnlearnModule, loss: torch.Tensor) -> None:
    """One manual-optimization step that respects the hard freeze."""
    optimizer = module.optimizers()
    optimizer.zero_grad()
    module.manual_backward(loss)
    module.guard.zero_frozen_grads()
    optimizer.step()
    module.guard.restore()


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

    def forget_and_retain(self, module: UnlearnModule) -> CombinedLoader:
        """Forget pairs ``(x, y_poisoned, y_true, idx, weight)`` with retain batches ``(x, y, idx, weight)``
        alongside; one epoch: one pass over D_f."""
        dm = module.datamodule
        forget = module.loader(dm.forget_pairs_dataloader().dataset, shuffle=True, batch_size=self.batch_size)
        retain = module.loader(dm.retain_dataloader().dataset, shuffle=True, batch_size=self.batch_size)
        return CombinedLoader({"forget": forget, "retain": retain}, mode="min_size")

    def report(self) -> dict[str, Any]:
        return {"method": self.name, "epochs": self.epochs, "batch_size": self.batch_size}


class Finetune(IterativeMethod):
    """Fine-tune on the retain set D_r with cross-entropy (the seed paper's baseline uses all parameters)."""

    name = "finetune"

    def train_dataloader(self, module: UnlearnModule) -> Any:
        return module.loader(module.datamodule.retain_dataloader().dataset, shuffle=True, batch_size=self.batch_size)

    def training_step(self, module: UnlearnModule, batch: Any, batch_idx: int) -> torch.Tensor:
        module.net.eval()
        x, y, weight = batch[0], batch[1], batch[-1]
        loss = cross_entropy(module.net(x), y, weight, rank_count(module, weight))
        optimizer_step(module, loss)
        module.log("unlearn/retain_loss", loss, prog_bar=True)
        return loss


class NegGradPlus(IterativeMethod):
    """NegGrad+: ``β (L_retain + L_corrected) − (1 − β) L_forget``.

    Descent on the retain set and on the corrected forget set (true labels), ascent on the forget set with its
    poisoned labels.

    Args:
        beta: Weight of the descent terms in [0, 1].
    """

    name = "neggrad_plus"

    def __init__(self, epochs: int = 1, batch_size: int = 128, beta: float = 0.9) -> None:
        super().__init__(epochs, batch_size)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"`beta` must lie in [0, 1], got {beta}.")
        self.beta = beta

    def train_dataloader(self, module: UnlearnModule) -> Any:
        return self.forget_and_retain(module)

    def training_step(self, module: UnlearnModule, batch: Any, batch_idx: int) -> torch.Tensor:
        module.net.eval()
        (xf, yp, yt, _, wf), (xr, yr, _, wr) = batch["forget"], batch["retain"]
        nf, nr = rank_count(module, wf), rank_count(module, wr)
        logits_f = module.net(xf)
        descent = cross_entropy(module.net(xr), yr, wr, nr) + cross_entropy(logits_f, yt, wf, nf)
        loss = self.beta * descent - (1 - self.beta) * cross_entropy(logits_f, yp, wf, nf)
        optimizer_step(module, loss)
        module.log("unlearn/loss", loss, prog_bar=True)
        return loss

    def report(self) -> dict[str, Any]:
        return {**super().report(), "beta": self.beta}
