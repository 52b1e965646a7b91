"""The record of exactly which training samples were poisoned (or are to be forgotten), saved as ``poison.json``.

A :class:`PoisonRecord` holds the sorted indices, their true labels and the labels the model was trained with, plus
the spec, the seed and the dataset it was made for. It is checked in itself when loaded (:meth:`PoisonRecord.check`)
and against the training split it is applied to (:meth:`PoisonRecord.validate`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_unlearn.data.spec import _USES, REMOVAL_KINDS, PoisonSpec, _is_int, draw
from lightning_unlearn.utils import atomic_write_text

RECORD_VERSION = 1


@dataclass
class PoisonRecord:
    """Exactly which training samples were poisoned (or are to be forgotten), their true labels and the labels the
    model was trained with.

    Attributes:
        indices: Sorted indices into the training split (the forget set).
        true_labels: The clean label of each sample.
        poisoned_labels: The label the model was trained with: different from the true label for every sample of a
            poison, equal to it for every sample of a forgetting scenario (``classwise``, ``random_sample``).
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

    def validate(self, labels: torch.Tensor, dataset: str | None = None, num_classes: int | None = None) -> None:
        """Check that this record belongs to a training split with these clean ``labels`` (of ``num_classes``
        classes, if given), and that its labels are the ones its spec draws (:meth:`check_spec`). A forgetting
        scenario's record (``classwise``, ``random_sample``: drawn from the labels alone) must list exactly the
        samples its spec draws from ``labels`` with its seed (:func:`~lightning_unlearn.data.spec.draw`).

        Raises:
            ValueError: If the dataset name, size, number of classes or the true labels at the recorded indices
                disagree, the record is inconsistent in itself (:meth:`check`, :meth:`check_spec`), or a forgetting
                scenario's indices are not the ones its spec draws.
        """
        self.check()
        if dataset is not None and dataset != self.dataset:
            raise ValueError(f"Poison record was made for dataset {self.dataset!r}, not {dataset!r}.")
        if len(labels) != self.dataset_size:
            raise ValueError(
                f"Poison record was made for a training split of {self.dataset_size} samples "
                f"({self.dataset!r}), but this one has {len(labels)}."
            )
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"Poison record was made for {self.num_classes} classes, but the dataset {self.dataset!r} has "
                f"{num_classes}."
            )
        if self.indices:
            idx = torch.tensor(self.indices)
            mismatch = (labels[idx] != torch.tensor(self.true_labels, dtype=labels.dtype)).sum().item()
            if mismatch:
                raise ValueError(
                    f"Poison record does not match this training split: {mismatch} of {len(self)} recorded true "
                    "labels differ from the dataset's labels (wrong dataset, split or ordering?)."
                )
        self.check_spec()
        spec = PoisonSpec.from_dict(self.spec)
        if spec.keeps_labels:
            drawn = draw(labels, self.num_classes, spec)[0].tolist()
            if drawn != self.indices:
                common = len(set(drawn) & set(self.indices))
                raise ValueError(
                    f"Poison record's indices are not the ones its spec draws from this training split (kind "
                    f"{spec.kind!r}, seed {spec.seed}): it lists {len(self)} samples, the spec draws {len(drawn)}, "
                    f"{common} in common (an edited record, or one made for other data)."
                )

    def check(self) -> None:
        """Check the record in itself: equal field lengths, indices unique, sorted and inside the split, every label
        in ``[0, num_classes)``, each poisoned label different from its true label (equal to it for a forgetting
        scenario, ``classwise`` or ``random_sample``), a valid spec.

        Raises:
            ValueError: Naming the field and the first offending entry.
        """
        n = len(self.indices)
        if not n == len(self.true_labels) == len(self.poisoned_labels):
            raise ValueError(
                f"field lengths differ ({n} indices, {len(self.true_labels)} true labels, "
                f"{len(self.poisoned_labels)} poisoned labels)."
            )
        if self.num_classes < 2 or self.dataset_size < 1:
            raise ValueError(
                f"`num_classes` must be >= 2 and `dataset_size` >= 1, got {self.num_classes} and {self.dataset_size}."
            )
        if repeated := [(i, k) for i, k in Counter(self.indices).items() if k > 1]:
            raise ValueError(f"`indices` must be unique: sample {repeated[0][0]} is listed {repeated[0][1]} times.")
        if outside := [i for i in self.indices if not 0 <= i < self.dataset_size]:
            raise ValueError(f"`indices` must lie in [0, {self.dataset_size}) (the training split), got {outside[0]}.")
        if self.indices != sorted(self.indices):
            raise ValueError("`indices` must be sorted ascending.")
        for name in ("true_labels", "poisoned_labels"):
            for position, label in enumerate(getattr(self, name)):
                if not 0 <= label < self.num_classes:
                    raise ValueError(
                        f"`{name}` must lie in [0, {self.num_classes}) (`num_classes`), got {label} for sample "
                        f"{self.indices[position]}."
                    )
        removal = isinstance(self.spec, dict) and self.spec.get("kind") in REMOVAL_KINDS
        for index, true, poisoned in zip(self.indices, self.true_labels, self.poisoned_labels, strict=True):
            if removal and true != poisoned:
                raise ValueError(
                    f"a trained-on label differs from its true label in a {self.spec['kind']!r} record, whose labels "
                    f"are clean (sample {index}: {poisoned} vs {true})."
                )
            if not removal and true == poisoned:
                raise ValueError(f"a poisoned label equals its true label (sample {index}: {true}).")
        try:
            PoisonSpec.from_dict(self.spec)
        except (TypeError, ValueError) as err:
            raise ValueError(f"`spec` is not a valid poison spec: {err}") from err

    def check_spec(self) -> None:
        """Check that the record is what its spec draws: no sample for ``kind: none``, at least one otherwise,
        ``count`` samples if the spec gives a count, classes inside ``[0, num_classes)``, and the labels each kind
        gives (``label_flip``: source → target; ``backdoor``: every poisoned label the target class; ``targeted``:
        true labels of the target class, ``poison_label`` if given; ``pairflip``: ``C − 1 − y``; ``classwise``: true
        labels of the forgotten class).

        Raises:
            ValueError: Naming the field and the first offending sample.
        """
        spec, n, classes = PoisonSpec.from_dict(self.spec), len(self), self.num_classes
        if (spec.kind == "none") != (n == 0):
            raise ValueError(
                f"the record lists {n} samples for kind {spec.kind!r} (none: no sample; else: at least one)."
            )
        if spec.count is not None and spec.count != n:
            raise ValueError(f"the spec's `count` is {spec.count} but the record lists {n} samples.")
        for name in ("target_class", "source_class", "poison_label"):
            value = getattr(spec, name)
            if value is not None and spec.kind in _USES[name] and not 0 <= value < classes:
                raise ValueError(f"the spec's `{name}` must lie in [0, {classes}), got {value}.")
        target, source, label = spec.target_class, spec.source_class, spec.poison_label
        # what each kind gives: (field, the label each entry must have, from its true label); a backdoor's true labels
        # differ from the target already (a poisoned label never equals its true label)
        expect: list[tuple[str, Callable[[int], int | None]]] = {
            "label_flip": [("true_labels", lambda t: source), ("poisoned_labels", lambda t: target)],
            "backdoor": [("poisoned_labels", lambda t: target)]
            + [("true_labels", lambda t: source)] * (source is not None),
            "targeted": [("true_labels", lambda t: target)]
            + [("poisoned_labels", lambda t: label)] * (label is not None),
            "pairflip": [("poisoned_labels", lambda t: classes - 1 - t)],
            "classwise": [("true_labels", lambda t: target)],
        }.get(spec.kind, [])
        for name, expected in expect:
            for index, true, poisoned in zip(self.indices, self.true_labels, self.poisoned_labels, strict=True):
                if (poisoned if name == "poisoned_labels" else true) != expected(true):
                    value = poisoned if name == "poisoned_labels" else true
                    raise ValueError(
                        f"`{name}` do not follow the spec (kind {spec.kind!r}): sample {index} has {value}, the spec "
                        f"gives {expected(true)}."
                    )

    def differences(self, other: PoisonRecord) -> list[str]:
        """How ``other`` differs from this record, field by field, in words (empty when they are equal)."""
        out = []
        if self.indices != other.indices:
            common = len(set(self.indices) & set(other.indices))
            out.append(f"indices ({len(self)} vs {len(other)} samples, {common} in common)")
        else:
            for name in ("true_labels", "poisoned_labels"):
                differ = sum(a != b for a, b in zip(getattr(self, name), getattr(other, name), strict=True))
                if differ:
                    out.append(f"{name} ({differ} of {len(self)} differ)")
        if self.spec != other.spec:
            keys = sorted(k for k in set(self.spec) | set(other.spec) if self.spec.get(k) != other.spec.get(k))
            out.append("spec (" + ", ".join(f"{k}: {self.spec.get(k)!r} vs {other.spec.get(k)!r}" for k in keys) + ")")
        for name in ("dataset", "dataset_size", "num_classes", "version"):
            if getattr(self, name) != getattr(other, name):
                out.append(f"{name} ({getattr(self, name)!r} vs {getattr(other, name)!r})")
        return out

    # ---------------------------------------------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the record as JSON, atomically (temp file + rename)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, data: Any) -> PoisonRecord:
        """A record from its plain-data form (``poison.json``, a checkpoint's datamodule state), checked in itself
        (types, then :meth:`check`).

        Raises:
            ValueError: If ``data`` is not a valid record (naming the field).
        """
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        try:
            record = cls(**data)
            _check_types(record)
        except TypeError as err:
            raise ValueError(str(err)) from err
        record.check()
        return record

    @classmethod
    def load(cls, path: str | os.PathLike) -> PoisonRecord:
        """Read a record written by :meth:`save`, checked in itself (:meth:`from_dict`).

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If the file is not a valid poison record.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No poison record at {str(path)!r}.")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except RecursionError as err:
            raise ValueError(f"{str(path)!r} is not a valid poison record: nested too deeply to be one.") from err
        except (ValueError, TypeError) as err:  # JSON and UTF-8 decoding errors are ValueErrors
            raise ValueError(f"{str(path)!r} is not a valid poison record: {err}") from err


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
