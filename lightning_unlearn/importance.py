"""Diagonal importances of a split of an unlearning request's data, by SSD's definition or a per-sample estimator.

Read by the :class:`~lightning_unlearn.selection.FisherRatio` selection and the
:class:`~lightning_unlearn.unlearn.methods.ssd.SSD` method from the request's context (the
:class:`~lightning_unlearn.unlearn.UnlearnModule`, see :mod:`~lightning_unlearn.unlearn.request.splits`), which
computes each at the trained weights (sharded and all-reduced under DDP) and keeps it, so the method reuses the
selection's importances instead of computing them again.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["IMPORTANCES", "check_importance", "importance_of"]

#: Importances of :class:`FisherRatio` and ``SSD``: SSD's own (``"batch"``) or a per-sample diagonal estimator.
IMPORTANCES = ("batch", "fisher", "exact", "mc")


def check_importance(importance: str, batch_size: int) -> None:
    """Refuse an unknown importance or a bad batch size (``ValueError`` naming the argument)."""
    if importance not in IMPORTANCES:
        raise ValueError(f"`importance` must be one of {IMPORTANCES}, got {importance!r}.")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")


def importance_of(
    context: Any, split: str, importance: str = "batch", batch_size: int = 128
) -> dict[str, torch.Tensor]:
    """The diagonal importance of every parameter on ``split`` (``"forget"`` or ``"train"``), served from the
    context's cache when it was computed before.

    * ``"batch"``: SSD's own definition (``src/ssd.py``, ``calc_importance``): the squared gradient of each batch's mean
      cross-entropy (``batch_size`` consecutive samples), averaged over the batches
      (:meth:`~lightning_unlearn.unlearn.request.splits.SplitStatistics.batch_importance`);
    * ``"fisher"``, ``"exact"``, ``"mc"``: the mean over the split's samples of the per-sample diagonal of the
      project's estimator (:meth:`~lightning_unlearn.unlearn.request.splits.SplitStatistics.split_profile`):
      ``fisher`` the empirical Fisher (squared per-sample gradients at the trained-on labels), ``exact`` the GGN
      diagonal, ``mc`` its Monte-Carlo estimate. Per-sample squares do not depend on a batch size, and they are not
      SSD's numbers: a batch gradient's square also holds the cross terms between the batch's samples.
    """
    if importance == "batch":
        return context.batch_importance(split, batch_size)
    return dict(context.split_profile(split, importance).diagonals)
