"""Selections chosen per request by the request's criterion: ``Validated`` (the candidate whose searched one-step
update scores best) and ``AutoCandidates`` (``Auto``'s default: the last layer, then the flattest layer)."""

from __future__ import annotations

import torch

from lightning_unlearn.curvature import SharpnessProfile
from lightning_unlearn.selection.base import DEFAULT_LAYER_TYPES, ParameterMask, SelectionStrategy, _whole_layers
from lightning_unlearn.selection.entries import TopKParameters
from lightning_unlearn.selection.layers import _LayerStrategy


class Validated(SelectionStrategy):
    """Choose the selection on the validation split: every candidate gets the one-step method's own searched update,
    and the candidate whose update reaches the lowest validation loss is applied (the others leave no trace).

    The forget gradient is computed once, over the union of the candidates; each candidate then gets its own
    direction (the gradient restricted to it; for the second-order update its own solve) and its own step search, so
    the cost is one step search per candidate, most of it served from the frozen-activation cache. The request's
    report lists every candidate with its step and validation loss. One-step methods only.

    Args:
        k: How many of the flattest layers (smallest mean Hessian diagonal) are candidates.
        last_layer: Make the last layer a candidate.
        topk_fraction: Make the top ``topk_fraction`` single parameters by largest diagonal a candidate (None: no).
        layer_types: Module types that count as layers (default: Linear and convolutions).
    """

    name = "validated"

    def __init__(
        self,
        k: int = 2,
        last_layer: bool = True,
        topk_fraction: float | None = 0.01,
        layer_types: tuple[str, ...] | list[str] | str | None = DEFAULT_LAYER_TYPES,
    ) -> None:
        if int(k) != k or k < 0:
            raise ValueError(f"`k` must be an integer >= 0, got {k!r}.")
        if k == 0 and not last_layer and topk_fraction is None:
            raise ValueError("Validated needs at least one candidate: `k` >= 1, `last_layer` or `topk_fraction`.")
        self.k, self.last_layer = int(k), last_layer
        self.topk = None if topk_fraction is None else TopKParameters(topk_fraction, largest=True)
        self.layers = _LayerStrategy(layer_types)

    def candidates(self, profile: SharpnessProfile) -> list[tuple[str, ParameterMask]]:
        """``(label, mask)`` of every candidate, without duplicates, in a fixed order."""
        stats = sorted(self.layers.candidates(profile), key=lambda s: s.mean)
        out: list[tuple[str, ParameterMask]] = []
        for rank, layer in enumerate(stats[: self.k]):
            label = f"flattest #{rank + 1} ({layer.name})"
            out.append((label, _whole_layers(profile, [layer.name], "smallest", mean_diagonal=layer.mean)))
        if self.last_layer:
            last = self.layers.candidates(profile)[-1]
            if all(mask.layers != [last.name] for _, mask in out):
                out.append((f"last layer ({last.name})", _whole_layers(profile, [last.name], "last")))
        if self.topk is not None:
            out.append((f"top {self.topk.fraction:.2%} entries", self.topk(profile)))
        return out

    def select(self, profile: SharpnessProfile) -> ParameterMask:
        """The union of the candidates: what the hard freeze leaves trainable until the method picks one."""
        candidates = self.candidates(profile)
        masks: dict[str, torch.Tensor] = {}
        for _, mask in candidates:
            for name, m in mask.masks.items():
                masks[name] = masks[name] | m if name in masks else m.clone()
        layers = list(dict.fromkeys(layer for _, mask in candidates for layer in mask.layers))
        return ParameterMask(masks, self.name, layers, {"candidates": [label for label, _ in candidates]})


class AutoCandidates(Validated):
    """:class:`~lightning_unlearn.unlearn.Auto`'s default candidates, cheapest first: the last layer, then the
    flattest layer (the paper's choice) when the profile holds curvature. With a layout-only profile (no curvature
    was computed, :meth:`~lightning_unlearn.curvature.SharpnessProfile.layout_of`) the last layer alone.

    Args:
        layer_types: Module types that count as layers (default: Linear and convolutions).
    """

    name = "auto"
    needs_curvature = False

    def __init__(self, layer_types: tuple[str, ...] | list[str] | str | None = DEFAULT_LAYER_TYPES) -> None:
        super().__init__(k=1, last_layer=True, topk_fraction=None, layer_types=layer_types)

    def candidates(self, profile: SharpnessProfile) -> list[tuple[str, ParameterMask]]:
        last = self.layers.candidates(profile)[-1]
        out = [(f"last layer ({last.name})", _whole_layers(profile, [last.name], "last"))]
        if not profile.is_layout:
            flattest = min(self.layers.candidates(profile), key=lambda s: s.mean)
            if flattest.name != last.name:
                label = f"flattest layer ({flattest.name})"
                out.append((label, _whole_layers(profile, [flattest.name], "smallest", mean_diagonal=flattest.mean)))
        return out
