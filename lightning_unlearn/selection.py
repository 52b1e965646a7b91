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
                    searched one-step update has the lowest validation loss, chosen per request
``saliency``        the top ``fraction`` of entries by ``|∇ forget loss|`` over the whole model (SalUn's weight
                    saliency; needs the model and data)
``fisher_ratio``    the entries with forget importance > ``alpha`` × training-set importance (SSD's selection; needs
                    the model and data)
=================== ==================================================================================================

Data-aware selections override :meth:`SelectionStrategy.select_for`, which an unlearning request calls with its
module (model, data, profile); the others select from the profile alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_unlearn.curvature import SharpnessProfile
from lightning_unlearn.importance import check_importance, importance_of

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


class _DataAware(SelectionStrategy):
    def select(self, profile: SharpnessProfile) -> ParameterMask:
        raise ValueError(
            f"The {type(self).__name__} selection needs the model and its forget set, not only a profile: use it in an "
            "unlearning request (UnlearnModule(selection=...), `unlearn.py`), which calls `select_for(module)`."
        )


class Saliency(_DataAware):
    """SalUn's weight saliency (Fan et al. 2024; OPTML-Group/Unlearn-Saliency at ac880a2,
    ``Classification/generate_mask.py``): the top ``fraction`` of all entries of the model by ``|∇_θ L_forget|``, one
    threshold across every parameter.

    ``L_forget`` is the cross-entropy over the forget set at the labels the model was trained on. Their script sums
    the gradients of each batch's *mean* loss over a shuffled forget loader (``save_gradient_ratio``; versions before
    b874ee9 also took an SGD step between batches and kept the smallest entries); here it is the gradient of the mean
    loss over the whole forget set at the trained weights
    (:meth:`~lightning_unlearn.unlearn.request.splits.SplitStatistics.split_gradient`), which is theirs divided by
    the number of batches when all batches have the same size (the order, hence the mask, is the same). As there,
    ``int(fraction × total)`` entries are chosen (at least one); ties are broken by position (deterministically, like
    :class:`~lightning_unlearn.selection.TopKParameters`).

    Args:
        fraction: Share of all entries to select, in (0, 1] (SalUn writes masks for 0.1 … 1.0; its README's example
            uses 0.5).
    """

    name = "saliency"

    def __init__(self, fraction: float = 0.5) -> None:
        if isinstance(fraction, bool) or not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"`fraction` must lie in (0, 1], got {fraction!r}.")
        self.fraction = float(fraction)

    def select_for(self, context: Any) -> ParameterMask:
        saliency = {name: g.abs() for name, g in context.split_gradient("forget").items()}
        k = max(1, int(self.fraction * sum(g.numel() for g in saliency.values())))
        masks, threshold = top_entries(saliency, k, largest=True)
        details = {"fraction": self.fraction, "threshold": threshold, "score": "|grad of mean forget loss|"}
        return self.checked(ParameterMask(masks, self.name, [], details))


class FisherRatio(_DataAware):
    """SSD's synapse selection (Foster et al. 2024, if-loops/selective-synaptic-dampening ``src/ssd.py``,
    ``modify_weight``): the entries whose importance on the forget set exceeds ``alpha`` times their importance on the
    full training set, ``I_forget > α · I_full`` (strict), over every parameter of the model.

    Importance (:func:`~lightning_unlearn.importance.importance_of`): by default SSD's own (``importance="batch"``:
    squared batch gradients of the mean cross-entropy, averaged over batches of ``batch_size`` = 128 as in their
    scripts); ``"fisher"`` (the project's empirical Fisher: per-sample squared gradients), ``"exact"`` or ``"mc"``
    use a per-sample diagonal profile of each split instead. The forget set carries the labels the model was trained
    on; the full training set is the training set as trained on (SSD's ``full_train_dl``: retain then forget).

    Args:
        alpha: SSD's ``selection_weighting`` α (> 0); their default 10.
        importance: ``"batch"`` (SSD), ``"fisher"``, ``"exact"`` or ``"mc"``.
        batch_size: Batch size of the ``"batch"`` importance.
    """

    name = "fisher_ratio"

    def __init__(self, alpha: float = 10.0, importance: str = "batch", batch_size: int = 128) -> None:
        if isinstance(alpha, bool) or not float(alpha) > 0 or not torch.isfinite(torch.tensor(float(alpha))):
            raise ValueError(f"`alpha` must be a finite number > 0, got {alpha!r}.")
        check_importance(importance, batch_size)
        self.alpha, self.importance, self.batch_size = float(alpha), importance, int(batch_size)

    def importances(self, context: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(I_forget, I_full)`` by parameter name."""
        forget = importance_of(context, "forget", self.importance, self.batch_size)
        full = importance_of(context, "train", self.importance, self.batch_size)
        return forget, full

    def select_for(self, context: Any) -> ParameterMask:
        forget, full = self.importances(context)
        masks = {}
        for name, f in forget.items():
            chosen = (f > self.alpha * full[name].to(f.device, f.dtype)).cpu()
            if chosen.any():
                masks[name] = chosen
        details = {"alpha": self.alpha, "importance": self.importance}
        if self.importance == "batch":
            details["batch_size"] = self.batch_size
        return self.checked(ParameterMask(masks, self.name, [], details))


STRATEGIES: dict[str, type[SelectionStrategy]] = {
    cls.name: cls
    for cls in (
        SmallestLayer, LargestLayer, TopKParameters, LastLayer, AllLayers, NamedLayers, RandomLayer, RandomEntries,
        Validated, Saliency, FisherRatio,
    )
}  # fmt: skip


def get_strategy(name: str, **kwargs: Any) -> SelectionStrategy:
    """Build a strategy by name (one of :data:`STRATEGIES`)."""
    if name not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {tuple(STRATEGIES)}, got {name!r}.")
    return STRATEGIES[name](**kwargs)


def total_parameters(profile: SharpnessProfile) -> int:
    return int(sum(math.prod(d.shape) for d in profile.diagonals.values()))
