"""``mc``: the Monte-Carlo GGN diagonal (labels sampled from the model's own predictions)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_unlearn.curvature.squared import SquaredGradientEstimator

__all__ = ["MonteCarloGGN"]


class MonteCarloGGN(SquaredGradientEstimator):
    """Monte-Carlo GGN diagonal: squared per-sample gradients at labels sampled from the model's own predictions.

    For each input, ``num_draws`` labels ``ŷ ~ softmax(logits)`` are drawn and ``(Jᵀ(p - e_ŷ))² / num_draws`` is added.
    Since ``E[(p - e_ŷ)(p - e_ŷ)ᵀ] = diag(p) - p pᵀ``, this is an unbiased, non-negative estimate of the GGN diagonal
    at about the cost of one backward pass per draw.

    Args:
        num_draws: Labels drawn per input (``k``).
        **options: Memory and algorithm options of :class:`~lightning_unlearn.curvature.squared.
            SquaredGradientEstimator`.
    """

    name = "mc"
    target = "ggn"
    deterministic = False

    def __init__(self, *, num_draws: int = 1, **options: Any) -> None:
        super().__init__(**options)
        if int(num_draws) < 1:
            raise ValueError(f"`num_draws` must be >= 1, got {num_draws}.")
        self.num_draws = int(num_draws)

    @classmethod
    def options_for(cls, *, num_draws: int = 1, strict: bool = True, loss_fn: Any = None) -> dict[str, Any]:
        return {"num_draws": num_draws}

    def options(self) -> dict[str, Any]:
        return {"num_draws": self.num_draws, **super().options()}

    def _num_columns(self, num_classes: int) -> int:
        return self.num_draws

    def _draw(self, n: int, generator: torch.Generator | None) -> Tensor | None:
        return torch.rand(n, self.num_draws, generator=generator, dtype=torch.float64)

    def _columns(self, logits: Tensor, targets: Tensor, draws: Tensor | None) -> Tensor:
        p = logits.double().softmax(-1)
        cdf = p.cumsum(-1)
        labels = torch.searchsorted(cdf, draws.to(p.device).contiguous()).clamp_(max=p.shape[-1] - 1)  # (m, k)
        columns = p[:, None, :].repeat(1, self.num_draws, 1)
        columns.scatter_add_(2, labels[:, :, None], torch.full_like(labels[:, :, None], -1.0, dtype=p.dtype))
        return columns / math.sqrt(self.num_draws)
