"""The result of a selection (:class:`ParameterMask`), the interface of a strategy (:class:`SelectionStrategy`) and
the helpers strategies share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_unlearn.curvature import SharpnessProfile

DEFAULT_LAYER_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")


class EmptySelectionError(ValueError):
    """A selection chose no parameter (e.g. ``FisherRatio`` when no entry matters more to the forget set than ``alpha``
    times to the training set, as in random-sample forgetting): there is nothing to update."""


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
    """Base class: ``select(profile)`` returns a non-empty :class:`ParameterMask`.

    :meth:`select_for` is what an unlearning request calls (``UnlearnModule.prepare``): its context (the module, an
    :class:`~lightning_unlearn.unlearn.base.UnlearnContext`) holds the model, its data and the training profile. By
    default it selects from the profile alone; selections that need the model and the data (``saliency``,
    ``fisher_ratio``) override it and read forget-set gradients or per-split importances from the context.
    """

    name = "base"
    #: Whether the strategy reads curvature values (False: a layout-only profile serves it, and a request computes
    #: no profile for it, :meth:`~lightning_unlearn.curvature.SharpnessProfile.layout_of`).
    needs_curvature = True

    def select(self, profile: SharpnessProfile) -> ParameterMask:
        raise NotImplementedError

    def select_for(self, context: Any) -> ParameterMask:
        """The selection of an unlearning request; ``context`` provides ``profile`` (the training-set profile) and,
        for data-aware selections, ``split_gradient``, ``split_profile`` and ``batch_importance``. Default:
        ``self(context.profile)``."""
        return self(context.profile)

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
        return self.checked(self.select(profile))

    def checked(self, mask: ParameterMask) -> ParameterMask:
        """``mask``, refused (:class:`EmptySelectionError`) if it selects nothing."""
        if mask.num_selected == 0:
            raise EmptySelectionError(f"Selection {self.name!r} selected no parameter.")
        return mask


def total_parameters(profile: SharpnessProfile) -> int:
    return int(sum(math.prod(d.shape) for d in profile.diagonals.values()))


def top_entries(values: dict[str, torch.Tensor], k: int, largest: bool = True) -> tuple[dict[str, torch.Tensor], float]:
    """The ``k`` largest (or smallest) entries of all tensors of ``values`` together, one threshold across them: masks
    of the parameters with at least one entry chosen, and the value of the last entry chosen. Ties are broken by
    position (parameters in ``values``' order, entries in row-major order), so the choice is deterministic."""
    names = list(values)
    flat = torch.cat([values[n].detach().reshape(-1).double().cpu() for n in names])
    order = torch.sort(flat, descending=largest, stable=True).indices[:k]
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order] = True
    masks, offset = {}, 0
    for name in names:
        n = values[name].numel()
        part = chosen[offset : offset + n].reshape(values[name].shape)
        if part.any():
            masks[name] = part
        offset += n
    return masks, float(flat[order[-1]])
