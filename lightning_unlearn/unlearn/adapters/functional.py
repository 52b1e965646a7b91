"""``unlearn_model``: one call for a plain ``nn.Module`` and plain loaders, no Trainer code of the user's."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_unlearn.console import quiet
from lightning_unlearn.selection import SelectionStrategy
from lightning_unlearn.unlearn.base import UnlearnMethod
from lightning_unlearn.unlearn.module import UnlearnModule, unlearn_trainer

__all__ = ["unlearn_model"]


def unlearn_model(
    model: nn.Module,
    data: Any,
    method: UnlearnMethod | None = None,
    selection: SelectionStrategy | None = None,
    *,
    reference: nn.Module | dict[str, float] | None = None,
    accelerator: str = "auto",
    logger: Any = False,
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Unlearn ``data``'s forget set from ``model`` **in place** and return the request's report.

    Builds an :class:`~lightning_unlearn.unlearn.UnlearnModule` (``model=model, data=data``, ``method``,
    ``selection``, ``reference`` and any of its other ``options``, e.g. ``profile``, ``estimator``, ``lr_grid``) and
    runs it on a one-device Trainer, quietly (``accelerator``: ``"auto"``, ``"cpu"``, ``"gpu"``, ...; ``logger``: a
    Lightning logger such as ``TensorBoardLogger``, or False; ``progress``: a progress bar). The model's parameters
    are updated where they are (the same tensors), and it is handed back on its original device.

    Args:
        model: The trained network (logits out, or pass ``output_transform``).
        data: An :class:`~lightning_unlearn.data.UnlearnData`, or a data module with the loaders of
            :mod:`lightning_unlearn.data.protocol`.

    Returns:
        :attr:`UnlearnModule.report`: before / after metrics, with a ``reference`` the comparison (ToW, % restored)
        and the poison's harm and fit, the selection and the method's choices.
    """
    device = next(model.parameters()).device
    module = UnlearnModule(model=model, data=data, method=method, selection=selection, reference=reference, **options)
    trainer = unlearn_trainer(accelerator=accelerator, logger=logger, enable_progress_bar=progress)
    with quiet():  # Lightning's notes on a one-step fit (no optimizer, eval mode, few batches) are noise here
        trainer.fit(module)
    model.to(device)
    return module.report
