"""Poisoning: specifications, and the record of exactly which samples were poisoned.

A :class:`PoisonSpec` says *how* to poison (by count or fraction; seeded). Applying it to a label vector gives a
:class:`PoisonRecord`: the sorted indices, their true labels and their poisoned labels, plus the spec, the seed and
the dataset it was made for. The record is what unlearning needs (forget set = poisoned samples with poisoned labels,
and for backdoors their triggered inputs; corrected forget set = the same inputs with true labels; retain set =
everything else), so it is saved as ``poison.json`` next to the checkpoint and validated against the dataset it is
applied to.

=============== =================================================================== ===================================
kind            what is poisoned                                                    attacked metric (the *harm*)
=============== =================================================================== ===================================
``label_flip``  samples of ``source_class`` all get the label ``target_class``      accuracy on ``source_class``
                (the standard targeted label-flipping attack, source → target)
``backdoor``    samples of the other classes (or of ``source_class``) get a         attack success rate: triggered
                trigger patch stamped on the image and the label ``target_class``   test images of the other classes
                (BadNets)                                                           classified as ``target_class``
``targeted``    samples of ``target_class`` get a random other label (or            accuracy on ``target_class``
                ``poison_label``): Warnecke et al.'s setting
``untargeted``  random samples get a random other label (with a recipe that fits    test accuracy; forget-set fit
                them: memorised noise)
``pairflip``    random samples get the label ``C − 1 − y``                          test accuracy
=============== =================================================================== ===================================

Naming: in ``label_flip`` and ``backdoor`` ``target_class`` is the label the attack makes the model output (the usual
naming of these attacks); in ``targeted`` it is, as in Warnecke et al., the class whose samples are relabelled. The
class whose test accuracy an attack lowers is :meth:`PoisonSpec.attacked_class` either way.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from lightning_unlearn.utils import atomic_write_text

POISON_KINDS = ("none", "label_flip", "backdoor", "targeted", "untargeted", "pairflip")
TRIGGER_POSITIONS = ("bottom_right", "bottom_left", "top_right", "top_left")


@dataclass(frozen=True)
class Trigger:
    """A BadNets trigger: a solid square patch of ``size`` × ``size`` pixels with value ``value`` (0–255, every
    channel), ``margin`` pixels from the corner named by ``position``, stamped on ``uint8`` images before they are
    normalised.

    The default, a white 3×3 square one pixel from the bottom-right corner, sits on the black background of MNIST and
    Fashion-MNIST digits and garments (their corner pixels are black in almost every image).
    """

    size: int = 3
    position: str = "bottom_right"
    margin: int = 1
    value: int = 255

    def __post_init__(self) -> None:
        if not _is_int(self.size) or self.size < 1:
            raise ValueError(f"`trigger_size` must be a positive integer, got {self.size!r}.")
        if self.position not in TRIGGER_POSITIONS:
            raise ValueError(f"`trigger_position` must be one of {TRIGGER_POSITIONS}, got {self.position!r}.")
        if not _is_int(self.margin) or self.margin < 0:
            raise ValueError(f"`trigger_margin` must be an integer >= 0, got {self.margin!r}.")
        if not _is_int(self.value) or not 0 <= self.value <= 255:
            raise ValueError(f"`trigger_value` must be an integer in [0, 255], got {self.value!r}.")

    def window(self, height: int, width: int) -> tuple[slice, slice]:
        """The rows and columns of the patch on an image of ``height`` × ``width`` pixels."""
        if self.size + self.margin > min(height, width):
            raise ValueError(
                f"A trigger of `trigger_size`={self.size} with `trigger_margin`={self.margin} does not fit on "
                f"{height}×{width} images."
            )
        top = self.margin if self.position.startswith("top") else height - self.margin - self.size
        left = self.margin if self.position.endswith("left") else width - self.margin - self.size
        return slice(top, top + self.size), slice(left, left + self.size)

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """A copy of ``uint8`` images (N×C×H×W) with the patch stamped on every one."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"Trigger.stamp expects uint8 N×C×H×W images, got {images.dtype} {tuple(images.shape)}.")
        rows, cols = self.window(*images.shape[-2:])
        out = images.clone()
        out[:, :, rows, cols] = self.value
        return out


RECORD_VERSION = 1


@dataclass(frozen=True)
class PoisonSpec:
    """How to poison the training set (see the module docstring for the kinds and their attacked metrics).

    Args:
        kind: ``"label_flip"``: samples of ``source_class`` all get the label ``target_class``. ``"backdoor"``:
            samples of every class but ``target_class`` (or of ``source_class`` only, if given) get the trigger
            stamped on their image and the label ``target_class``. ``"targeted"``: samples of ``target_class`` get a
            wrong label (``poison_label`` if given, else a random other class per sample). ``"untargeted"``: random
            samples of any class get a random different label. ``"pairflip"``: random samples get the label
            ``C - 1 - y`` (0↔9, 1↔8, … for 10 classes; samples whose class is its own partner, the middle class of an
            odd ``C``, are never chosen). ``"none"``: no poisoning.
        count: Exact number of samples to poison. Give ``count`` or ``fraction``, not both.
        fraction: Fraction in (0, 1] of the candidate samples (``source_class`` for ``label_flip``, the other
            classes for ``backdoor``, ``target_class`` for ``targeted``, all samples otherwise); the count is
            ``round(fraction * candidates)``.
        target_class: ``label_flip`` / ``backdoor``: the label the poisoned samples get. ``targeted``: the class whose
            samples are poisoned (Warnecke et al.'s naming).
        source_class: ``label_flip``: the class whose samples are flipped (required). ``backdoor``: restrict the
            poisoned samples to this class (default: every class but ``target_class``).
        poison_label: The wrong label given to all poisoned samples (``targeted`` only; default: random other class).
        trigger_size: ``backdoor``: side of the square trigger patch, pixels.
        trigger_position: ``backdoor``: the corner of the patch, one of ``bottom_right``, ``bottom_left``,
            ``top_right``, ``top_left``.
        trigger_margin: ``backdoor``: pixels between the patch and the image border.
        trigger_value: ``backdoor``: pixel value of the patch, 0–255 on every channel (255 = white).
        seed: Seed of the random choice of samples and labels; the same seed gives the same record.
    """

    kind: str = "targeted"
    count: int | None = None
    fraction: float | None = None
    target_class: int | None = 9
    source_class: int | None = None
    poison_label: int | None = None
    trigger_size: int = 3
    trigger_position: str = "bottom_right"
    trigger_margin: int = 1
    trigger_value: int = 255
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
        if self.kind in ("targeted", "label_flip", "backdoor") and self.target_class is None:
            raise ValueError(f"`target_class` is required for {self.kind!r} poisoning.")
        if self.kind == "label_flip":
            if self.source_class is None:
                raise ValueError("`source_class` is required for label_flip poisoning (the class that is flipped).")
            if self.source_class == self.target_class:
                raise ValueError(f"`source_class` and `target_class` must differ, both are {self.source_class}.")
        if self.kind == "backdoor":
            self.trigger  # noqa: B018 - validates the trigger fields
            if self.source_class is not None and self.source_class == self.target_class:
                raise ValueError(f"`source_class` and `target_class` must differ, both are {self.source_class}.")
        elif self.kind != "label_flip" and self.source_class is not None:
            raise ValueError(f"`source_class` only applies to label_flip and backdoor poisoning, not {self.kind!r}.")
        if self.kind != "targeted" and self.poison_label is not None:
            raise ValueError(f"`poison_label` only applies to targeted poisoning, not {self.kind!r}.")

    @property
    def trigger(self) -> Trigger:
        """The backdoor trigger these fields describe."""
        return Trigger(self.trigger_size, self.trigger_position, self.trigger_margin, self.trigger_value)

    @property
    def attacked_class(self) -> int | None:
        """The class whose test accuracy the attack lowers (``label_flip``: the source class; ``targeted``: the
        relabelled class), else None."""
        if self.kind == "label_flip":
            return self.source_class
        return self.target_class if self.kind == "targeted" else None

    @property
    def stamps_inputs(self) -> bool:
        """Whether the poison changes the inputs too (a backdoor), not only the labels."""
        return self.kind == "backdoor"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoisonSpec:
        """The spec of a record (records written before a field existed get its default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown poison spec fields {unknown}; known: {sorted(known)}.")
        return cls(**data)


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

    def validate(self, labels: torch.Tensor, dataset: str | None = None, num_classes: int | None = None) -> None:
        """Check that this record belongs to a training split with these clean ``labels`` (of ``num_classes``
        classes, if given), and that its labels are the ones its spec draws (:meth:`check_spec`).

        Raises:
            ValueError: If the dataset name, size, number of classes or the true labels at the recorded indices
                disagree, or the record is inconsistent in itself (:meth:`check`, :meth:`check_spec`).
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

    def check(self) -> None:
        """Check the record in itself: equal field lengths, indices unique, sorted and inside the split, every label
        in ``[0, num_classes)``, each poisoned label different from its true label, a valid spec.

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
        for index, true, poisoned in zip(self.indices, self.true_labels, self.poisoned_labels, strict=True):
            if true == poisoned:
                raise ValueError(f"a poisoned label equals its true label (sample {index}: {true}).")
        try:
            PoisonSpec.from_dict(self.spec)
        except (TypeError, ValueError) as err:
            raise ValueError(f"`spec` is not a valid poison spec: {err}") from err

    def check_spec(self) -> None:
        """Check that the record is what its spec draws: no sample for ``kind: none``, at least one otherwise,
        ``count`` samples if the spec gives a count, classes inside ``[0, num_classes)``, and the labels each kind
        gives (``label_flip``: source → target; ``backdoor``: every poisoned label the target class; ``targeted``:
        true labels of the target class, ``poison_label`` if given; ``pairflip``: ``C − 1 − y``).

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


#: Which kinds use each class field (a field another kind ignores is not range-checked for it).
_USES = {
    "target_class": ("targeted", "label_flip", "backdoor"),
    "source_class": ("label_flip", "backdoor"),
    "poison_label": ("targeted",),
}


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

    for name in ("target_class", "source_class", "poison_label"):
        value = getattr(spec, name)
        if value is not None and spec.kind in _USES[name] and not 0 <= value < num_classes:
            raise ValueError(f"`{name}` must lie in [0, {num_classes}), got {value}.")
    if spec.kind == "targeted":
        if spec.poison_label is not None and spec.poison_label == spec.target_class:
            raise ValueError("`poison_label` must differ from `target_class`.")
        candidates = torch.nonzero(labels == spec.target_class).flatten()
        what = f"samples of class {spec.target_class}"
    elif spec.kind == "label_flip":
        candidates = torch.nonzero(labels == spec.source_class).flatten()
        what = f"samples of class {spec.source_class}"
    elif spec.kind == "backdoor":
        source = labels != spec.target_class if spec.source_class is None else labels == spec.source_class
        candidates = torch.nonzero(source).flatten()
        what = f"samples of class {spec.source_class}" if spec.source_class is not None else "samples of other classes"
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
    elif spec.kind in ("label_flip", "backdoor"):
        poisoned = torch.full_like(true, spec.target_class)
    elif spec.kind == "pairflip":
        poisoned = num_classes - 1 - true
    else:  # a uniformly random *different* class: shift by 1..C-1
        shift = torch.randint(1, num_classes, (count,), generator=gen)
        poisoned = (true + shift) % num_classes
    return PoisonRecord(chosen.tolist(), true.tolist(), poisoned.tolist(), spec.to_dict(), dataset, n, num_classes)
