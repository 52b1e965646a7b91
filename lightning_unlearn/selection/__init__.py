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
``random``          one layer drawn uniformly with ``seed`` (a control for the layer-wise strategies)
``random_entries``  a ``fraction`` of single entries drawn uniformly over the whole model with ``seed`` (the control
                    for the element-wise ones: ``topk``, ``saliency``)
``validated``       the candidate (by default the ``k`` flattest layers, the last layer and the top 1 % entries) whose
                    searched one-step update scores best by the request's criterion, chosen per request
``auto``            ``Auto``'s candidates, cheapest first: the last layer, then the flattest layer (when the profile
                    has curvature)
``saliency``        the top ``fraction`` of entries by ``|∇ forget loss|`` over the whole model (SalUn's weight
                    saliency; needs the model and data)
``fisher_ratio``    the entries with forget importance > ``alpha`` × training-set importance (SSD's selection; needs
                    the model and data)
=================== ==================================================================================================

Data-aware selections override :meth:`SelectionStrategy.select_for`, which an unlearning request calls with its
module (model, data, profile); the others select from the profile alone. Strategies that read no curvature values
(``needs_curvature = False``: last, all, named, random layer or entries, auto, saliency, fisher_ratio) run on a
layout-only profile, so a request that uses only them computes no profile. One module per family: :mod:`.base` (the
mask and the interface), :mod:`.layers`, :mod:`.entries`, :mod:`.validated`, :mod:`.data_aware`.
"""
from __future__ import annotations

from typing import Any

from lightning_unlearn.selection.base import (
    DEFAULT_LAYER_TYPES,
    EmptySelectionError,
    ParameterMask,
    SelectionStrategy,
    top_entries,
    total_parameters,
)
from lightning_unlearn.selection.data_aware import FisherRatio, Saliency
from lightning_unlearn.selection.entries import RandomEntries, TopKParameters
from lightning_unlearn.selection.layers import (
    AllLayers,
    LargestLayer,
    LastLayer,
    NamedLayers,
    RandomLayer,
    SmallestLayer,
)
from lightning_unlearn.selection.validated import AutoCandidates, Validated

STRATEGIES: dict[str, type[SelectionStrategy]] = {
    cls.name: cls
    for cls in (
        SmallestLayer, LargestLayer, TopKParameters, LastLayer, AllLayers, NamedLayers, RandomLayer, RandomEntries,
        Validated, AutoCandidates, Saliency, FisherRatio,
    )
}  # fmt: skip


def get_strategy(name: str, **kwargs: Any) -> SelectionStrategy:
    """Build a strategy by name (one of :data:`STRATEGIES`)."""
    if name not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {tuple(STRATEGIES)}, got {name!r}.")
    return STRATEGIES[name](**kwargs)


__all__ = [
    "DEFAULT_LAYER_TYPES",
    "STRATEGIES",
    "AllLayers",
    "AutoCandidates",
    "EmptySelectionError",
    "FisherRatio",
    "LargestLayer",
    "LastLayer",
    "NamedLayers",
    "ParameterMask",
    "RandomEntries",
    "RandomLayer",
    "Saliency",
    "SelectionStrategy",
    "SmallestLayer",
    "TopKParameters",
    "Validated",
    "get_strategy",
    "top_entries",
    "total_parameters",
]
