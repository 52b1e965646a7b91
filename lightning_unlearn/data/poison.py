"""Label poisoning: specifications, and the record of exactly which samples were poisoned.

A :class:`PoisonSpec` says *how* to poison (targeted, untargeted, pair-flip; by count or fraction; seeded). Applying it
to a label vector gives a :class:`PoisonRecord`: the sorted indices, their true labels and their poisoned labels, plus
the spec, the seed and the dataset it was made for. The record is what unlearning needs (forget set = poisoned samples
with poisoned labels, corrected forget set = the same samples with true labels, retain set = everything else), so it is
saved as ``poison.json`` next to the checkpoint and validated against the dataset it is applied to.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_unlearn.utils import atomic_write_text

POISON_KINDS = ("none", "targeted", "untargeted", "pairflip")
RECORD_VERSION = 1


@dataclass(frozen=True)
class PoisonSpec:
    """How to poison the training labels.

    Args:
        kind: ``"targeted"``: samples of ``target_class`` get a wrong label (``poison_label`` if given, else a random
            other class per sample). ``"untargeted"``: random samples of any class get a random different label.
            ``"pairflip"``: random samples get the label ``C - 1 - y`` (0↔9, 1↔8, … for 10 classes; samples whose class
            is its own partner, the middle class of an odd ``C``, are never chosen). ``"none"``: no poisoning.
        count: Exact number of samples to poison. Give ``count`` or ``fraction``, not both.
        fraction: Fraction in (0, 1] of the candidate samples (the target class for ``targeted``, all samples
            otherwise); the count is ``round(fraction * candidates)``.
        target_class: The class whose samples are poisoned (``targeted`` only).
        poison_label: The wrong label given to all poisoned samples (``targeted`` only; default: random other class).
        seed: Seed of the random choice of samples and labels; the same seed gives the same record.
    """

    kind: str = "targeted"
    count: int | None = None
    fraction: float | None = None
    target_class: int | None = 9
    poison_label: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in POISON_KINDS:
            raise ValueError(f"`kind` must be one of {POISON_KINDS}, got {self.kind!r}.")
        if self.kind == "none":
            return
        if (self.count is None) == (self.fraction is None):
            raise ValueError(
                f"Give exactly one of `count` and `fraction` for {self.kind!r} poisoning "
                f"(got count={self.count!r}, fraction={self.fraction!r})."
            )
        if self.count is not None and (not isinstance(self.count, int) or self.count < 1):
            raise ValueError(f"`count` must be a positive integer, got {self.count!r}.")
        if self.fraction is not None and not (0.0 < float(self.fraction) <= 1.0):
            raise ValueError(f"`fraction` must lie in (0, 1], got {self.fraction!r}.")
        if self.kind == "targeted":
            if self.target_class is None:
                raise ValueError("`target_class` is required for targeted poisoning.")
        elif self.poison_label is not None:
            raise ValueError(f"`poison_label` only applies to targeted poisoning, not {self.kind!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PoisonRecord:
    """Exactly which training samples were poisoned, their true labels and their poisoned labels.

    Attributes:
        indices: Sorted indices into the training split.
        true_labels: The clean label of each poisoned sample.
        poisoned_labels: The label the model was trained with; differs from the true label for every sample.
        spec: The :class:`PoisonSpec` (as a dict) that made the record.
        dataset: Name of the dataset (e.g. ``"mnist"``).
        dataset_size: Number of samples of the training split the indices refer to.
        num_classes: Number of classes of the dataset.
    """

    indices: list[int]
    true_labels: list[int]
    poisoned_labels: list[int]
    spec: dict[str, Any]
    dataset: str
    dataset_size: int
    num_classes: int
    version: int = field(default=RECORD_VERSION)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def seed(self) -> int:
        return int(self.spec.get("seed", 0))

    def apply(self, labels: torch.Tensor) -> torch.Tensor:
        """Return a copy of ``labels`` with the poisoned labels written in (``labels`` is validated first)."""
        self.validate(labels)
        poisoned = labels.clone()
        if self.indices:
            poisoned[torch.tensor(self.indices)] = torch.tensor(self.poisoned_labels, dtype=labels.dtype)
        return poisoned

    def validate(self, labels: torch.Tensor, dataset: str | None = None) -> None:
        """Check that this record belongs to a training split with these clean ``labels``.

        Raises:
            ValueError: If the dataset name, size or the true labels at the recorded indices disagree.
        """
        if dataset is not None and dataset != self.dataset:
            raise ValueError(f"Poison record was made for dataset {self.dataset!r}, not {dataset!r}.")
        if len(labels) != self.dataset_size:
            raise ValueError(
                f"Poison record was made for a training split of {self.dataset_size} samples "
                f"({self.dataset!r}), but this one has {len(labels)}."
            )
        if not self.indices:
            return
        idx = torch.tensor(self.indices)
        if int(idx.max()) >= len(labels) or int(idx.min()) < 0:
            raise ValueError("Poison record has indices outside the training split.")
        mismatch = (labels[idx] != torch.tensor(self.true_labels, dtype=labels.dtype)).sum().item()
        if mismatch:
            raise ValueError(
                f"Poison record does not match this training split: {mismatch} of {len(self)} recorded true labels "
                f"differ from the dataset's labels (wrong dataset, split or ordering?)."
            )

    # ---------------------------------------------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the record as JSON, atomically (temp file + rename)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PoisonRecord:
        """Read a record written by :meth:`save`.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If the file is not a valid poison record.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No poison record at {str(path)!r}.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, got {type(data).__name__}")
            record = cls(**data)
            _check_types(record)
        except (ValueError, TypeError) as err:  # JSON and UTF-8 decoding errors are ValueErrors
            raise ValueError(f"{str(path)!r} is not a valid poison record: {err}") from err
        if not (len(record.indices) == len(record.true_labels) == len(record.poisoned_labels)):
            raise ValueError(f"{str(path)!r} is not a valid poison record: field lengths differ.")
        if any(t == p for t, p in zip(record.true_labels, record.poisoned_labels, strict=True)):
            raise ValueError(f"{str(path)!r} is not a valid poison record: a poisoned label equals its true label.")
        return record


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_types(record: PoisonRecord) -> None:
    """Raise ``TypeError`` naming the first field of a loaded record whose JSON type is wrong."""
    for name in ("indices", "true_labels", "poisoned_labels"):
        values = getattr(record, name)
        if not isinstance(values, list) or not all(_is_int(v) for v in values):
            raise TypeError(f"`{name}` must be a list of integers")
    for name in ("dataset_size", "num_classes", "version"):
        if not _is_int(getattr(record, name)):
            raise TypeError(f"`{name}` must be an integer, got {getattr(record, name)!r}")
    if not isinstance(record.spec, dict) or not isinstance(record.dataset, str):
        raise TypeError("`spec` must be an object and `dataset` a string")
    if record.version != RECORD_VERSION:
        raise TypeError(f"record version {record.version}, expected {RECORD_VERSION}")


def make_poison(labels: torch.Tensor, num_classes: int, spec: PoisonSpec, dataset: str) -> PoisonRecord:
    """Choose the samples to poison and their wrong labels, reproducibly from ``spec.seed``.

    Args:
        labels: Clean labels of the training split (1-D integer tensor).
        num_classes: Number of classes; labels must lie in ``[0, num_classes)``.
        spec: What to do.
        dataset: Dataset name stored in the record.

    Raises:
        ValueError: If the spec is impossible for these labels (naming the offending argument).
    """
    labels = torch.as_tensor(labels).long().cpu()
    n = len(labels)
    if spec.kind == "none":
        return PoisonRecord([], [], [], spec.to_dict(), dataset, n, num_classes)
    gen = torch.Generator().manual_seed(spec.seed)

    if spec.kind == "targeted":
        if not 0 <= spec.target_class < num_classes:
            raise ValueError(f"`target_class` must lie in [0, {num_classes}), got {spec.target_class}.")
        if spec.poison_label is not None:
            if not 0 <= spec.poison_label < num_classes:
                raise ValueError(f"`poison_label` must lie in [0, {num_classes}), got {spec.poison_label}.")
            if spec.poison_label == spec.target_class:
                raise ValueError("`poison_label` must differ from `target_class`.")
        candidates = torch.nonzero(labels == spec.target_class).flatten()
        what = f"samples of class {spec.target_class}"
    elif spec.kind == "untargeted":
        candidates = torch.arange(n)
        what = "samples"
    else:  # pairflip
        candidates = torch.nonzero(labels != num_classes - 1 - labels).flatten()
        what = "samples with a distinct pair-flip partner"

    count = spec.count if spec.count is not None else round(float(spec.fraction) * len(candidates))
    if count > len(candidates):
        arg = "count" if spec.count is not None else "fraction"
        raise ValueError(
            f"`{arg}` asks for {count} poisoned samples but the dataset has only {len(candidates)} {what}."
        )
    if count < 1:
        raise ValueError(f"`fraction`={spec.fraction} poisons no sample of {len(candidates)} {what}.")
    chosen = candidates[torch.randperm(len(candidates), generator=gen)[:count]].sort().values
    true = labels[chosen]

    if spec.kind == "targeted" and spec.poison_label is not None:
        poisoned = torch.full_like(true, spec.poison_label)
    elif spec.kind == "pairflip":
        poisoned = num_classes - 1 - true
    else:  # a uniformly random *different* class: shift by 1..C-1
        shift = torch.randint(1, num_classes, (count,), generator=gen)
        poisoned = (true + shift) % num_classes
    return PoisonRecord(chosen.tolist(), true.tolist(), poisoned.tolist(), spec.to_dict(), dataset, n, num_classes)
