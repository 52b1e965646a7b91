"""Selection: turn a sharpness profile into the set of parameters unlearning may change; everything else is frozen.

Each strategy is a small object with ``select(profile) -> ParameterMask``, looked up by name in :data:`STRATEGIES`.
A *layer* is a module that owns parameters directly (weight and bias together); by default only Linear and
convolution layers are candidates for the layer-wise strategies (``layer_types`` widens that, e.g. to BatchNorm).

=================== ==================================================================================================
strategy            selects
=================== ==================================================================================================
``smallest``        the layer with the smallest mean Hessian diagonal (flattest; the seed paper's text, its Fig. 1)
``largest``         the layer with the largest mean Hessian diagonal (sharpest; the seed paper's abstract)
``topk``            the ``fraction`` of single parameters with the largest (or, ``largest=False``, smallest) diagonal
``last``            the last layer in model order (the classic last-layer baseline)
``all``             every parameter
``named``           the layers named in ``layers``
``random``          one layer drawn uniformly with ``seed`` (a control)
``validated``       the candidate (by default the ``k`` flattest layers, the last layer and the top 1 % entries) whose
                    searched one-step update has the lowest validation loss, chosen per request
=================== ==================================================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_unlearn.curvature import SharpnessProfile

DEFAULT_LAYER_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")


@dataclass
class ParameterMask:
    """Which parameters (and, element-wise, which entries) unlearning may change.

    Attributes:
        masks: Parameter name → boolean tensor of its shape (True = may change). Parameters absent from the dict,
            or whose mask is all False, are frozen.
        strategy: Name of the strategy that made the mask.
        layers: The layers selected (empty for element-wise strategies).
        details: What the strategy saw (e.g. the mean diagonal of the chosen layer).
    """

    masks: dict[str, torch.Tensor]
    strategy: str
    layers: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def num_selected(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def trainable(self) -> list[str]:
        """Names of parameters with at least one selected entry."""
        return [name for name, m in self.masks.items() if bool(m.any())]

    def is_full(self, name: str) -> bool:
        """Whether every entry of parameter ``name`` is selected (no element-wise masking needed)."""
        return name in self.masks and bool(self.masks[name].all())

    def summary(self, total: int | None = None) -> dict[str, Any]:
        out = {"strategy": self.strategy, "layers": self.layers, "num_selected": self.num_selected, **self.details}
        if total:
            out["fraction_selected"] = self.num_selected / total
        return out


def _whole_layers(profile: SharpnessProfile, layers: list[str], strategy: str, **details: Any) -> ParameterMask:
    masks = {}
    for layer in layers:
        for name in profile.layers[layer]:
            masks[name] = torch.ones_like(profile.diagonals[name], dtype=torch.bool)
    return ParameterMask(masks, strategy, list(layers), details)


class SelectionStrategy:
    """Base class: ``select(profile)`` returns a non-empty :class:`ParameterMask`."""

    name = "base"

    def select(self, profile: SharpnessProfile) -> ParameterMask:
        raise NotImplementedError

    def __call__(self, profile: SharpnessProfile) -> ParameterMask:
        """Select from ``profile``.

        Raises:
            ValueError: If the profile is empty or holds non-finite (NaN/inf) values, or nothing was selected.
        """
        if not profile.diagonals or profile.total == 0:
            raise ValueError(f"Selection {self.name!r}: the profile holds no parameter (empty `diagonals`).")
        bad = [name for name, d in profile.diagonals.items() if not torch.isfinite(d).all()]
        if bad:
            raise ValueError(
                f"Selection {self.name!r}: the profile holds non-finite (NaN/inf) curvature values in {bad[:3]}; "
                "recompute it (e.g. `lightning-unlearn profile RUN_DIR`)."
            )
        mask = self.select(profile)
        if mask.num_selected == 0:
            raise ValueError(f"Selection {self.name!r} selected no parameter.")
        return mask


class _LayerStrategy(SelectionStrategy):
    def __init__(self, layer_types: tuple[str, ...] | list[str] | str | None = DEFAULT_LAYER_TYPES) -> None:
        self.layer_types = None if layer_types in (None, "all") else tuple(layer_types)

    def candidates(self, profile: SharpnessProfile) -> list[Any]:
        stats = [s for s in profile.layer_stats() if self.layer_types is None or s.type in self.layer_types]
        if not stats:
            kinds = sorted({s.type for s in profile.layer_stats()})
            raise ValueError(f"`layer_types`={self.layer_types} matches no layer of the profile (it has {kinds}).")
        return stats


class SmallestLayer(_LayerStrategy):
    """The layer with the smallest mean Hessian diagonal (ties: the earlier layer)."""

    name = "smallest"

    def select(self, profile: SharpnessProfile) -> ParameterMask:
        best = min(self.candidates(profile), key=lambda s: s.mean)
        return _whole_layers(profile, [best.name], self.name, mean_diagonal=best.mean)


class LargestLayer(_LayerStrategy):
    """The layer with the largest mean Hessian diagonal (ties: the earlier layer)."""

    name = "largest"

    def select(self, profile: SharpnessProfile) -> ParameterMask:
        best = max(self.candidates(profile), key=lambda s: s.mean)
        return _whole_layers(profile, [best.name], self.name, mean_diagonal=best.mean)


class LastLayer(_LayerStrategy):
    """The last candidate layer in model order (the output layer of a classifier)."""

    name = "last"

    def select(self, profile: SharpnessProfile) -> ParameterMask:
        last = self.candidates(profile)[-1]
        return _whole_layers(profile, [last.name], self.name, mean_diagonal=last.mean)


class AllLayers(SelectionStrategy):
    """Every parameter."""

    name = "all"

    def select(self, profile: SharpnessProfile) -> ParameterMask:
        return _whole_layers(profile, list(profile.layers), self.name)


class NamedLayers(SelectionStrategy):
    """The layers named in ``layers`` (module names as in the profile, e.g. ``net.fc1``)."""

    name = "named"

    def __init__(self, layers: list[str]) -> None:
        if not layers:
            raise ValueError("`layers` must name at least one layer.")
        self.layer_names = list(layers)

    def select(self, profile: SharpnessProfile) -> ParameterMask:
        unknown = [name for name in self.layer_names if name not in profile.layers]
        if unknown:
            raise ValueError(f"`layers` names unknown layers {unknown}; the profile has {list(profile.layers)}.")
        return _whole_layers(profile, self.layer_names, self.name)


class RandomLayer(_LayerStrategy):
    """One candidate layer drawn uniformly at random with ``seed`` (a control for the sharpness-based choice)."""

    name = "random"

    def __init__(self, seed: int = 0, layer_types: tuple[str, ...] | list[str] | str | None = DEFAULT_LAYER_TYPES):
        super().__init__(layer_types)
        self.seed = seed

    def select(self, profile: SharpnessProfile) -> ParameterMask:
        stats = self.candidates(profile)
        pick = int(torch.randint(len(stats), (1,), generator=torch.Generator().manual_seed(self.seed)))
        return _whole_layers(profile, [stats[pick].name], self.name, mean_diagonal=stats[pick].mean, seed=self.seed)


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
        names = list(profile.diagonals)
        flat = torch.cat([profile.diagonals[n].reshape(-1).double() for n in names])
        k = max(1, round(self.fraction * flat.numel()))
        # stable ordering: sort by value, ties by position
        order = torch.sort(flat, descending=self.largest, stable=True).indices[:k]
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[order] = True
        masks, offset = {}, 0
        for name in names:
            n = profile.diagonals[name].numel()
            part = chosen[offset : offset + n].reshape(profile.diagonals[name].shape)
            if part.any():
                masks[name] = part
            offset += n
        threshold = float(flat[order[-1]])
        return ParameterMask(
            masks, self.name, [], {"fraction": self.fraction, "largest": self.largest, "threshold": threshold}
        )


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


STRATEGIES: dict[str, type[SelectionStrategy]] = {
    cls.name: cls
    for cls in (SmallestLayer, LargestLayer, TopKParameters, LastLayer, AllLayers, NamedLayers, RandomLayer, Validated)
}


def get_strategy(name: str, **kwargs: Any) -> SelectionStrategy:
    """Build a strategy by name (one of :data:`STRATEGIES`)."""
    if name not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {tuple(STRATEGIES)}, got {name!r}.")
    return STRATEGIES[name](**kwargs)


def total_parameters(profile: SharpnessProfile) -> int:
    return int(sum(math.prod(d.shape) for d in profile.diagonals.values()))
