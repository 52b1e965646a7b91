"""How a batch is split into inputs and targets: the one helper the training, profiling and evaluation loops share."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader

__all__ = ["unpack_batch", "flatten_loaders"]

#: Dict keys of (inputs, targets), tried in this order.
BATCH_KEYS = (("x", "y"), ("image", "label"), ("input", "target"))


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` of a batch given as ``(x, y)``, ``(x, y, index, ...)`` or a dict with ``x``/``y``,
    ``image``/``label`` or ``input``/``target`` keys.

    Raises:
        ValueError: For a dict without such keys, or anything else than a dict or a list/tuple of at least two items.
    """
    if isinstance(batch, dict):
        for x_key, y_key in BATCH_KEYS:
            if x_key in batch and y_key in batch:
                return batch[x_key], batch[y_key]
        raise ValueError(
            f"cannot find inputs and targets in a batch with keys {sorted(batch)} (expected one of the key pairs "
            f"{', '.join('/'.join(pair) for pair in BATCH_KEYS)})"
        )
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"cannot unpack a batch of type {type(batch).__name__} into inputs and targets")


def flatten_loaders(loaders: Any) -> list[Any]:
    """The ``DataLoader`` objects inside ``loaders`` (one, a dict/list of them, or Lightning's ``CombinedLoader``)."""
    if loaders is None:
        return []
    if isinstance(loaders, DataLoader):
        return [loaders]
    if isinstance(loaders, dict):
        return [l for v in loaders.values() for l in flatten_loaders(v)]  # noqa: E741
    if isinstance(loaders, (list, tuple)):
        return [l for v in loaders for l in flatten_loaders(v)]  # noqa: E741
    flattened = getattr(loaders, "flattened", None)
    return list(flattened) if flattened is not None else []
