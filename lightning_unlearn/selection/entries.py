"""Element-wise strategies from the profile: the top fraction of entries by diagonal, and random entries (their
control)."""

from __future__ import annotations

import torch

from lightning_unlearn.curvature import SharpnessProfile
from lightning_unlearn.selection.base import ParameterMask, SelectionStrategy, top_entries, total_parameters


class RandomEntries(SelectionStrategy):
    """``round(fraction × total)`` single entries (at least one) drawn uniformly without replacement over every
    parameter of the model with ``seed``: the control for the element-wise selections (``topk``, ``saliency``), which
    choose as many entries by a score. Entries are numbered as in :func:`top_entries` (parameters in profile order,
    entries row-major), so a seed gives the same mask on every machine.

    Args:
        fraction: Share of all entries to select, in (0, 1].
        seed: Seed of the draw.
    """

    name = "random_entries"
    needs_curvature = False

    def __init__(self, fraction: float = 0.01, seed: int = 0) -> None:
        if isinstance(fraction, bool) or not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"`fraction` must lie in (0, 1], got {fraction!r}.")
        if isinstance(seed, bool) or int(seed) != seed:
            raise ValueError(f"`seed` must be an integer, got {seed!r}.")
        self.fraction, self.seed = float(fraction), int(seed)

    def select(self, profile: SharpnessProfile) -> ParameterMask:
        total = total_parameters(profile)
        k = max(1, round(self.fraction * total))
        order = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))[:k]
        chosen = torch.zeros(total, dtype=torch.bool)
        chosen[order] = True
        masks, offset = {}, 0
        for name, diagonal in profile.diagonals.items():
            part = chosen[offset : offset + diagonal.numel()].reshape(diagonal.shape)
            if part.any():
                masks[name] = part
            offset += diagonal.numel()
        return ParameterMask(masks, self.name, [], {"fraction": self.fraction, "seed": self.seed})


class TopKParameters(SelectionStrategy):
    """The ``fraction`` of single parameters with the largest (or smallest) Hessian diagonal, across all layers.

    Exactly ``round(fraction * total)`` entries are selected (at least one); ties are broken by position.
    """

    name = "topk"

    def __init__(self, fraction: float = 0.01, largest: bool = True) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"`fraction` must lie in (0, 1], got {fraction}.")
        self.fraction = fraction
        self.largest = largest

    def select(self, profile: SharpnessProfile) -> ParameterMask:
        k = max(1, round(self.fraction * total_parameters(profile)))
        masks, threshold = top_entries(profile.diagonals, k, self.largest)
        return ParameterMask(
            masks, self.name, [], {"fraction": self.fraction, "largest": self.largest, "threshold": threshold}
        )
