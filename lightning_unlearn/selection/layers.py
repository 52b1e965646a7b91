"""Layer-wise strategies: the flattest, sharpest or last layer, all layers, named layers, a random layer."""

from __future__ import annotations

from typing import Any

import torch

from lightning_unlearn.curvature import SharpnessProfile
from lightning_unlearn.selection.base import DEFAULT_LAYER_TYPES, ParameterMask, SelectionStrategy, _whole_layers


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
    needs_curvature = False

    def select(self, profile: SharpnessProfile) -> ParameterMask:
        last = self.candidates(profile)[-1]
        return _whole_layers(profile, [last.name], self.name, mean_diagonal=last.mean)


class AllLayers(SelectionStrategy):
    """Every parameter."""

    name = "all"
    needs_curvature = False

    def select(self, profile: SharpnessProfile) -> ParameterMask:
        return _whole_layers(profile, list(profile.layers), self.name)


class NamedLayers(SelectionStrategy):
    """The layers named in ``layers`` (module names as in the profile, e.g. ``net.fc1``)."""

    name = "named"
    needs_curvature = False

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
    needs_curvature = False

    def __init__(self, seed: int = 0, layer_types: tuple[str, ...] | list[str] | str | None = DEFAULT_LAYER_TYPES):
        super().__init__(layer_types)
        self.seed = seed

    def select(self, profile: SharpnessProfile) -> ParameterMask:
        stats = self.candidates(profile)
        pick = int(torch.randint(len(stats), (1,), generator=torch.Generator().manual_seed(self.seed)))
        return _whole_layers(profile, [stats[pick].name], self.name, mean_diagonal=stats[pick].mean, seed=self.seed)
