"""``fisher``: the empirical Fisher diagonal (squared per-sample gradients at the true labels)."""

from __future__ import annotations

import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from lightning_unlearn.curvature.squared import SquaredGradientEstimator

__all__ = ["EmpiricalFisher"]


class EmpiricalFisher(SquaredGradientEstimator):
    """Empirical Fisher diagonal: squared per-sample gradients of the cross-entropy at the true labels.

    Takes the memory and algorithm options of :class:`~lightning_unlearn.curvature.squared.SquaredGradientEstimator`.
    """

    name = "fisher"
    target = "empirical_fisher"
    deterministic = True

    def _num_columns(self, num_classes: int) -> int:
        return 1

    def _columns(self, logits: Tensor, targets: Tensor, draws: Tensor | None) -> Tensor:
        if targets.dtype.is_floating_point or targets.dim() != 1:
            raise ValueError("the 'fisher' estimator needs integer class targets of shape (batch,)")
        p = logits.double().softmax(-1)
        return (p - F.one_hot(targets.to(p.device).long(), p.shape[-1]).to(p.dtype))[:, None, :]
