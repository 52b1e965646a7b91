"""What to poison or to forget: :class:`PoisonSpec` (the kinds are tabled in :mod:`lightning_unlearn.data.poison`),
the BadNets :class:`Trigger`, and :func:`draw`, the seeded choice of samples and labels a spec makes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

#: The forgetting scenarios: the model is trained on clean data, the request is to remove the forget set (no label is
#: wrong, so there are no corrected labels).
REMOVAL_KINDS = ("classwise", "random_sample")
POISON_KINDS = ("none", "label_flip", "backdoor", "targeted", "untargeted", "pairflip", *REMOVAL_KINDS)
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


@dataclass(frozen=True)
class PoisonSpec:
    """How to poison the training set, or which clean samples to forget (the kinds and their attacked metrics are
    tabled in :mod:`lightning_unlearn.data.poison`).

    Args:
        kind: ``"label_flip"``: samples of ``source_class`` all get the label ``target_class``. ``"backdoor"``:
            samples of every class but ``target_class`` (or of ``source_class`` only, if given) get the trigger
            stamped on their image and the label ``target_class``. ``"targeted"``: samples of ``target_class`` get a
            wrong label (``poison_label`` if given, else a random other class per sample). ``"untargeted"``: random
            samples of any class get a random different label. ``"pairflip"``: random samples get the label
            ``C - 1 - y`` (0↔9, 1↔8, … for 10 classes; samples whose class is its own partner, the middle class of an
            odd ``C``, are never chosen). ``"classwise"``: forget the training samples of ``target_class`` (all of
            them unless ``count`` or ``fraction`` is given), clean labels. ``"random_sample"``: forget random samples
            of any class, clean labels. ``"none"``: no poisoning.
        count: Exact number of samples to poison (or forget). Give ``count`` or ``fraction``, not both
            (``classwise`` takes neither to forget the whole class).
        fraction: Fraction in (0, 1] of the candidate samples (``source_class`` for ``label_flip``, the other
            classes for ``backdoor``, ``target_class`` for ``targeted`` and ``classwise``, all samples otherwise);
            the count is ``round(fraction * candidates)``.
        target_class: ``label_flip`` / ``backdoor``: the label the poisoned samples get. ``targeted``: the class whose
            samples are poisoned (Warnecke et al.'s naming). ``classwise``: the class to forget.
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
        if (self.count is None) == (self.fraction is None) and not (self.kind == "classwise" and self.count is None):
            raise ValueError(
                f"Give exactly one of `count` and `fraction` for {self.kind!r} "
                f"{'forgetting' if self.keeps_labels else 'poisoning'} (got count={self.count!r}, "
                f"fraction={self.fraction!r}){'; neither forgets the whole class' * (self.kind == 'classwise')}."
            )
        if self.count is not None and (not isinstance(self.count, int) or self.count < 1):
            raise ValueError(f"`count` must be a positive integer, got {self.count!r}.")
        if self.fraction is not None and not (0.0 < float(self.fraction) <= 1.0):
            raise ValueError(f"`fraction` must lie in (0, 1], got {self.fraction!r}.")
        if self.kind in _USES["target_class"] and self.target_class is None:
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
        relabelled class; ``classwise``: the forgotten class, whose test accuracy unlearning should lower), else
        None."""
        if self.kind == "label_flip":
            return self.source_class
        return self.target_class if self.kind in ("targeted", "classwise") else None

    @property
    def keeps_labels(self) -> bool:
        """Whether the forget set keeps its clean labels (``classwise``, ``random_sample``): a removal request, with
        no corrected labels (methods that need them are refused)."""
        return self.kind in REMOVAL_KINDS

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


#: Which kinds use each class field (a field another kind ignores is not range-checked for it).
_USES = {
    "target_class": ("targeted", "label_flip", "backdoor", "classwise"),
    "source_class": ("label_flip", "backdoor"),
    "poison_label": ("targeted",),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def draw(labels: torch.Tensor, num_classes: int, spec: PoisonSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples ``spec`` chooses among ``labels`` and the labels they get, reproducibly from ``spec.seed``.

    Args:
        labels: Clean labels of the training split (1-D integer tensor).
        num_classes: Number of classes; labels must lie in ``[0, num_classes)``.
        spec: What to do (not ``kind: none``).

    Returns:
        ``(indices, labels)``: the sorted positions chosen and the label each is trained with (a wrong one for a
        poison, its own for ``classwise`` and ``random_sample``).

    Raises:
        ValueError: If the spec is impossible for these labels (naming the offending argument).
    """
    labels = torch.as_tensor(labels).long().cpu()
    gen = torch.Generator().manual_seed(spec.seed)
    for name in ("target_class", "source_class", "poison_label"):
        value = getattr(spec, name)
        if value is not None and spec.kind in _USES[name] and not 0 <= value < num_classes:
            raise ValueError(f"`{name}` must lie in [0, {num_classes}), got {value}.")
    if spec.kind in ("targeted", "classwise"):
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
    elif spec.kind in ("untargeted", "random_sample"):
        candidates = torch.arange(len(labels))
        what = "samples"
    else:  # pairflip
        candidates = torch.nonzero(labels != num_classes - 1 - labels).flatten()
        what = "samples with a distinct pair-flip partner"

    if spec.count is not None:
        count = spec.count
    else:  # classwise without count or fraction: the whole class
        count = len(candidates) if spec.fraction is None else round(float(spec.fraction) * len(candidates))
    removal = spec.keeps_labels
    if count > len(candidates):
        arg = "count" if spec.count is not None else "fraction"
        asked = f"{count} samples to forget" if removal else f"{count} poisoned samples"
        raise ValueError(f"`{arg}` asks for {asked} but the dataset has only {len(candidates)} {what}.")
    if count < 1:
        arg = "target_class" if spec.fraction is None else "fraction"
        value = spec.target_class if spec.fraction is None else spec.fraction
        verb = "forgets" if removal else "poisons"
        raise ValueError(f"`{arg}`={value} {verb} no sample of {len(candidates)} {what}.")
    chosen = candidates[torch.randperm(len(candidates), generator=gen)[:count]].sort().values
    true = labels[chosen]

    if spec.keeps_labels:
        given = true.clone()
    elif spec.kind == "targeted" and spec.poison_label is not None:
        given = torch.full_like(true, spec.poison_label)
    elif spec.kind in ("label_flip", "backdoor"):
        given = torch.full_like(true, spec.target_class)
    elif spec.kind == "pairflip":
        given = num_classes - 1 - true
    else:  # a uniformly random *different* class: shift by 1..C-1
        shift = torch.randint(1, num_classes, (count,), generator=gen)
        given = (true + shift) % num_classes
    return chosen, given
