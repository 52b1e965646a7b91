"""Which samples a split holds, by content: per-sample digests, a split's fingerprint, and overlaps between splits.

A sample's digest is the SHA-256 (16 hex digits) of its input's bytes (dtype, shape and values; a dict or list of
tensors entry by entry) and its label. Two splits share a sample when they share a digest: the same input with the
same label, whatever the dataset classes, indices or order. The audit ledger of chained requests
(:mod:`lightning_unlearn.ledger`) records a forget set by the digest of its sorted sample digests (order does not
matter), and a request warns when its forget set overlaps its validation or retain split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader

from lightning_unlearn.batches import unpack_batch

__all__ = ["sample_digests", "split_fingerprint", "overlap_count", "split_overlaps"]


def _update(digest: Any, value: Any) -> None:
    """Feed one sample's input (a tensor, number, string, or a dict/list/tuple of them) into ``digest``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _update(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"[{len(value)}]".encode())
        for item in value:
            _update(digest, item)
    else:
        digest.update(f"{type(value).__name__}:{value!r}".encode())


def _rows(value: Any, index: int) -> Any:
    """Row ``index`` of a collated batch entry."""
    if isinstance(value, torch.Tensor):
        return value[index]
    if isinstance(value, dict):
        return {k: _rows(v, index) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rows(v, index) for v in value]
    return value


def sample_digests(loader: DataLoader | Iterable[Any], limit: int | None = None) -> list[str]:
    """One digest per sample of ``loader`` (batches ``(inputs, labels, ...)`` or dicts, see
    :func:`~lightning_unlearn.batches.unpack_batch`), in the loader's order; at most ``limit`` samples."""
    digests: list[str] = []
    for batch in loader:
        x, y = unpack_batch(batch)
        labels = torch.as_tensor(y).reshape(-1)
        for i in range(len(labels)):
            digest = hashlib.sha256()
            _update(digest, _rows(x, i))
            digest.update(f"|{int(labels[i])}".encode())
            digests.append(digest.hexdigest()[:16])
            if limit is not None and len(digests) >= limit:
                return digests
    return digests


def split_fingerprint(digests: list[str]) -> str:
    """The split as a set: SHA-256 of its sorted sample digests (64 hex digits)."""
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def overlap_count(first: Iterable[str], second: Iterable[str]) -> int:
    """How many samples of ``first`` (by digest, with repeats) also occur in ``second``."""
    other = set(second)
    return sum(1 for d in first if d in other)


def _base_indices(dataset: Any) -> tuple[int, list[int]] | None:
    """``(id of the base dataset, indices into it)`` of a (nested) ``Subset``; None for anything else."""
    from torch.utils.data import Subset

    if not isinstance(dataset, Subset):
        return None
    inner = _base_indices(dataset.dataset)
    indices = [int(i) for i in dataset.indices]
    if inner is None:
        return id(dataset.dataset), indices
    base, mapping = inner
    return base, [mapping[i] for i in indices]


def split_overlaps(
    forget: Any,
    others: dict[str, Any],
    items: Callable[[Any], Any] | None = None,
    forget_digests: list[str] | None = None,
) -> list[str]:
    """Warnings for samples of the forget set that also occur in another split (``{"validation": dataset, …}``):
    by index where both are ``Subset`` views of one dataset, else by content (:func:`sample_digests`: the same input
    with the same label; ``items`` maps a dataset to one of ``(inputs, label, ...)`` items first). A validation split
    that holds forget samples scores every choice on what is being removed; a retain set that holds them trains them
    back in."""
    items = items or (lambda dataset: dataset)
    notes = []
    forget_base = _base_indices(forget)
    digests = forget_digests
    for name, dataset in others.items():
        if dataset is None:
            continue
        other_base = _base_indices(dataset)
        if forget_base is not None and other_base is not None and forget_base[0] == other_base[0]:
            shared = len(set(forget_base[1]) & set(other_base[1]))
            how = "by index into the same dataset"
        else:
            if digests is None:
                digests = sample_digests(DataLoader(items(forget), batch_size=256))
            shared = overlap_count(digests, sample_digests(DataLoader(items(dataset), batch_size=256)))
            how = "identical inputs and labels"
        if shared:
            total = len(forget)
            notes.append(
                f"{shared:,} of the {total:,} forget samples are also in the {name} split ({how})"
                + (": the forget set *is* that split" if shared == total == len(dataset) else "")
                + "."
            )
    return notes
