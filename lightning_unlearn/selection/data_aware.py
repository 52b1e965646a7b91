"""Selections from the model and its data, not the profile alone: SalUn's weight saliency and SSD's Fisher ratio."""

from __future__ import annotations

from typing import Any

import torch

from lightning_unlearn.curvature import SharpnessProfile
from lightning_unlearn.importance import check_importance, importance_of
from lightning_unlearn.selection.base import ParameterMask, SelectionStrategy, top_entries


class _DataAware(SelectionStrategy):
    needs_curvature = False  # gradients and importances of the data, not the profile's values

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
