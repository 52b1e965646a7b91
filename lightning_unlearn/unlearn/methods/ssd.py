"""Selective Synaptic Dampening (Foster et al. 2024): one-shot dampening of the selected weights, no training.

Anchor: if-loops/selective-synaptic-dampening at cdfdc0e, ``src/ssd.py`` (``ParameterPerturber.calc_importance`` and
``modify_weight``) with the settings of ``src/forget_random_main.py`` / ``src/forget_full_class_main.py``
(``dampening_constant`` λ = 1, ``selection_weighting`` α = 10, ``exponent`` 1, ``lower_bound`` 1, batch size 128).
For every selected entry

    θ ← θ · min(λ · I_full / I_forget, 1)

where ``I_forget`` and ``I_full`` are the diagonal importances of the forget set and of the full training set
(:func:`~lightning_unlearn.importance.importance_of`). With the selection
:class:`~lightning_unlearn.selection.FisherRatio` (``I_forget > α · I_full``) this is SSD; with any other selection
it dampens the entries that selection chose by the same factor. An entry with ``I_forget = 0`` keeps its value (the
factor would be ``0/0`` or ``∞``; SSD never selects such an entry, as ``0 > α · I_full`` is false).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset

from lightning_unlearn.evaluation.cost import device_clock
from lightning_unlearn.importance import check_importance, importance_of
from lightning_unlearn.selection import FisherRatio, Validated
from lightning_unlearn.unlearn.base import UnlearnContext, UnlearnMethod

__all__ = ["SSD", "dampening_factor"]


def dampening_factor(forget: torch.Tensor, full: torch.Tensor, dampening: float) -> torch.Tensor:
    """``min(λ · I_full / I_forget, 1)`` entry-wise, and 1 where ``I_forget = 0`` (no importance: nothing to dampen)."""
    full = full.to(forget.device, forget.dtype)
    positive = forget > 0
    ratio = dampening * full / torch.where(positive, forget, torch.ones_like(forget))
    return torch.where(positive, ratio.clamp(max=1.0), torch.ones_like(forget))


class SSD(UnlearnMethod):
    """Selective Synaptic Dampening: scale each selected entry by ``min(λ · I_full / I_forget, 1)`` in one shot.

    Use it with ``selection=FisherRatio(alpha)`` for SSD itself; then the importances are the selection's (computed
    once, when the selection was made). With another selection the importances are computed at the trained weights
    with ``importance`` / ``batch_size``. Needs no corrected labels (the forget set carries the labels the model was
    trained on). The fit runs a single step over a one-item placeholder batch; the update is written at the epoch's
    end, directly into the selected entries (every other entry stays bit-identical). Under DDP the importances are
    all-reduced, so every rank writes the same weights.

    Args:
        dampening: SSD's ``dampening_constant`` λ (> 0); their default 1.
        importance: ``"batch"`` (SSD's squared batch gradients), ``"fisher"``, ``"exact"`` or ``"mc"`` (per-sample
            diagonals; see :func:`~lightning_unlearn.importance.importance_of`). None (default): the
            ``FisherRatio`` selection's setting, else ``"batch"``.
        batch_size: Batch size of the ``"batch"`` importance; None: the ``FisherRatio`` selection's, else 128.
    """

    name = "ssd"
    one_step = True

    def __init__(self, dampening: float = 1.0, importance: str | None = None, batch_size: int | None = None) -> None:
        if (
            isinstance(dampening, bool)
            or not float(dampening) > 0
            or not torch.isfinite(torch.tensor(float(dampening)))
        ):
            raise ValueError(f"`dampening` must be a finite number > 0, got {dampening!r}.")
        check_importance(importance or "batch", batch_size or 128)
        self.dampening = float(dampening)
        self.importance, self.batch_size = importance, batch_size
        self.result: dict[str, Any] = {}

    def settings(self, module: UnlearnContext) -> tuple[str, int]:
        """The importance and batch size in use: given ones, else the ``FisherRatio`` selection's, else SSD's."""
        selection = module.selection if isinstance(module.selection, FisherRatio) else None
        importance = self.importance or (selection.importance if selection is not None else "batch")
        batch_size = self.batch_size or (selection.batch_size if selection is not None else 128)
        return importance, batch_size

    def configure_optimizers(self, module: UnlearnContext) -> Any:
        return None  # the update is written directly into the parameters

    def train_dataloader(self, module: UnlearnContext) -> Any:
        if isinstance(module.selection, Validated):
            raise ValueError(
                "The `Validated` selection searches one-step updates' step sizes; SSD has no step. Use SSD with "
                "FisherRatio (SSD itself) or any other selection."
            )
        self.result = {}
        return module.loader(TensorDataset(torch.zeros(1)), batch_size=1)  # one step on every rank

    def training_step(self, module: UnlearnContext, batch: Any, batch_idx: int) -> None:
        return None

    @torch.no_grad()
    def on_train_epoch_end(self, module: UnlearnContext) -> None:
        start = device_clock(module.device)
        importance, batch_size = self.settings(module)
        forget = importance_of(module, "forget", importance, batch_size)
        full = importance_of(module, "train", importance, batch_size)
        dampened = 0
        for name, p in module.guard.trainable.items():
            selected = module.mask.masks[name].to(p.device)
            factor = dampening_factor(forget[name].to(p.device), full[name], self.dampening)
            p.copy_(torch.where(selected, p * factor.to(p.dtype), p))
            dampened += int((selected & (factor < 1)).sum())
        self.result = {
            "dampening": self.dampening,
            "importance": importance,
            **({"batch_size": batch_size} if importance == "batch" else {}),
            "selected": int(module.mask.num_selected),
            "dampened": dampened,
            "seconds_update": device_clock(module.device) - start,
        }

    def report(self) -> dict[str, Any]:
        return {"method": self.name, **self.result}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.result)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.result = dict(state)
