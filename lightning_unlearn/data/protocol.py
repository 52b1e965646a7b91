"""The data an unlearning request needs, from a user's own datasets, loaders or ``LightningDataModule``.

:class:`~lightning_unlearn.unlearn.UnlearnModule` reads its data through one small protocol, the one the library's
:class:`~lightning_unlearn.data.PoisonedDataModule` implements natively:

========================================  ===================================================================
``forget_dataloader()``                   D_f: the samples to forget, with the labels the model was trained on
``corrected_forget_dataloader()``         D̃_f (optional): the same samples in the same order with their correct
                                          labels; methods that replace the forget set's labels need it
                                          (``FirstOrder``, ``SecondOrder``, ``SamForget``, ``NegGradPlus`` with
                                          ``corrected_weight > 0``); ascent-only methods (``NegGradPlus``,
                                          ``SharpMinMax``, ``FirstOrderRemoval``), ``Finetune``,
                                          ``RandomLabel``, ``L1Sparse``, ``SCRUB`` and ``SSD`` do not
``retain_dataloader()``                   D_r: the training samples to keep
``val_dataloader()``                      a clean validation split (step-size and learning-rate searches)
``test_dataloader()``                     optional: a test split (or a list of loaders, the first is the test split)
``profile_dataloader()``                  optional: the training set as trained on, for a profile computed on
                                          demand; default D_r followed by D_f
``attacked_class``, ``forgetting_target`` optional attributes: the class the poison attacks (its test accuracy
                                          states the harm), and what "forgotten" means for the forget set
                                          (:mod:`lightning_unlearn.unlearn.request.target`)
========================================  ===================================================================

Items are ``(inputs, label, ...)`` tuples (anything after the label is ignored) or dicts with ``x``/``y``,
``image``/``label`` or ``input``/``target`` keys; labels are class indices. Only the loaders' *datasets* are used:
the module batches, orders and shards them itself (exactly, across DDP ranks).

:class:`UnlearnData` turns plain datasets or loaders into that protocol; :func:`as_unlearn_data` accepts an
``UnlearnData``, a ``PoisonedDataModule`` or any object with the methods above (a ``LightningDataModule``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from lightning_unlearn.batches import unpack_batch

__all__ = ["UnlearnData", "as_unlearn_data", "require_corrected_labels", "REQUIRED_LOADERS"]

#: The loaders every data source must provide.
REQUIRED_LOADERS = ("forget_dataloader", "retain_dataloader", "val_dataloader")


def _dataset_of(value: Any, argument: str) -> Dataset:
    """The dataset behind ``value`` (a ``Dataset`` or a ``DataLoader``)."""
    if isinstance(value, DataLoader):
        value = value.dataset
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], DataLoader):
        value = value[0].dataset  # e.g. ``test_dataloader()`` returning a list: the first is the test split
    if isinstance(value, (str, bytes)) or not (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        raise TypeError(
            f"`{argument}` must be a map-style Dataset (with __len__ and __getitem__; a list of items is one) or a "
            f"DataLoader over one, got {type(value).__name__}."
        )
    if len(value) == 0:  # type: ignore[arg-type]
        raise ValueError(f"`{argument}` is empty.")
    return value


def _label(value: Any, argument: str) -> torch.Tensor:
    label = torch.as_tensor(value)
    if label.numel() != 1 or label.is_floating_point() or label.is_complex():
        raise ValueError(f"`{argument}`: labels must be class indices (integers), got {value!r}.")
    return label.reshape(()).long()


#: Maps one item of a user's dataset (or a batch of them) to ``(inputs, label)``.
BatchTransform = Callable[[Any], tuple[Any, Any]]


class Indexed(Dataset):
    """``dataset``'s items as ``(inputs, label, index)`` (the library's item layout), through ``batch_transform``
    when the items are not ``(inputs, label, ...)`` tuples or dicts with the library's keys."""

    def __init__(self, dataset: Dataset, argument: str, batch_transform: BatchTransform | None = None) -> None:
        self.dataset, self.argument, self.batch_transform = dataset, argument, batch_transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        item = self.dataset[index]
        try:
            x, y = self.batch_transform(item) if self.batch_transform is not None else unpack_batch(item)
        except ValueError as err:
            hint = "" if self.batch_transform is not None else BATCH_TRANSFORM_HINT
            raise ValueError(f"`{self.argument}`, item {index}: {err}{hint}") from None
        return x, _label(y, self.argument), torch.tensor(index)


BATCH_TRANSFORM_HINT = (
    ". Pass `batch_transform=` (to UnlearnData, UnlearnModule or unlearn_model; `--model.batch_transform` on the "
    "command line; or a `batch_transform` attribute of your data module): a callable mapping an item to "
    "`(inputs, label)`, e.g. `lambda item: (item['pixels'], item['target'])`"
)


class Relabelled(Indexed):
    """``dataset``'s inputs with other labels: items ``(inputs, labels[i], i)``."""

    def __init__(
        self, dataset: Dataset, labels: torch.Tensor, argument: str, batch_transform: BatchTransform | None = None
    ) -> None:
        super().__init__(dataset, argument, batch_transform)
        self.labels = labels

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        x, _, i = super().__getitem__(index)
        return x, self.labels[index], i


class ForgetPairs(Indexed):
    """The forget set with both labels: items ``(inputs, trained-on label, corrected label, index)``."""

    def __init__(
        self, dataset: Dataset, corrected: torch.Tensor, argument: str, batch_transform: BatchTransform | None = None
    ) -> None:
        super().__init__(dataset, argument, batch_transform)
        self.corrected = corrected

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, i = super().__getitem__(index)
        return x, y, self.corrected[index], i


class UnlearnData:
    """What to forget, what to keep and what to validate on, from plain datasets or loaders.

    Args:
        forget: The samples to forget, with the labels the model was trained on (a Dataset or DataLoader).
        retain: The training samples to keep.
        val: A clean validation split (searches choose steps and learning rates on it).
        corrected_labels: The forget samples' correct labels, in ``forget``'s order (a sequence or tensor of class
            indices, or a Dataset/DataLoader whose items carry them). Needed by methods that replace the forget set's
            labels (``FirstOrder``, ``SecondOrder``, ``SamForget``); None for removal-only use.
        test: Optional test split, evaluated before and after (``test/acc``; with ``attacked_class`` also
            ``test/acc_attacked`` and ``test/acc_other``).
        train: The training set as trained on, for a profile computed on demand; default ``retain`` then ``forget``.
        attacked_class: The class the poison attacks, if any: its test accuracy is reported apart and is the metric
            whose harm and % restored the report states.
        batch_transform: Maps one item of these datasets (a dict, an object) to ``(inputs, label)``, e.g.
            ``lambda item: (item["pixels"], item["target"])``; default: items ``(inputs, label, ...)`` or dicts
            with ``x``/``y``, ``image``/``label`` or ``input``/``target`` keys. Applied to every split.
        forgetting_target: What "forgotten" means for this forget set
            (:data:`~lightning_unlearn.unlearn.request.target.TARGETS`): ``"corrected"`` (predict the corrected
            labels as well as held-out data), ``"unseen"`` (look like held-out data: a deletion request),
            ``"class_removed"`` (the forget set is a whole class, to be treated as unseen), ``"trigger_removed"``
            (a backdoor whose true labels are unknown). None (default): ``"corrected"`` with ``corrected_labels``,
            ``"unseen"`` without. Every choice the request makes is scored by it.
        batch_size: Batch size of the loaders this object hands out (evaluation).
        num_workers: DataLoader workers.
        name: A name for the data, recorded in profiles and reports.
    """

    def __init__(
        self,
        forget: Dataset | DataLoader,
        retain: Dataset | DataLoader,
        val: Dataset | DataLoader,
        corrected_labels: Sequence[int] | torch.Tensor | Dataset | DataLoader | None = None,
        test: Dataset | DataLoader | None = None,
        train: Dataset | DataLoader | None = None,
        attacked_class: int | None = None,
        batch_size: int = 1000,
        num_workers: int = 0,
        name: str = "custom",
        forgetting_target: str | None = None,
        batch_transform: BatchTransform | None = None,
    ) -> None:
        if batch_transform is not None and not callable(batch_transform):
            raise TypeError(f"`batch_transform` must be callable (item → (inputs, label)), got {batch_transform!r}.")
        self.batch_transform = batch_transform
        self._forget = _dataset_of(forget, "forget")
        self._retain = _dataset_of(retain, "retain")
        self._val = _dataset_of(val, "val")
        self._test = None if test is None else _dataset_of(test, "test")
        self._train = None if train is None else _dataset_of(train, "train")
        self.corrected = None if corrected_labels is None else self._corrected(corrected_labels)
        if attacked_class is not None and (not isinstance(attacked_class, int) or attacked_class < 0):
            raise ValueError(f"`attacked_class` must be a class index (int >= 0) or None, got {attacked_class!r}.")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"`batch_size` must be >= 1 and `num_workers` >= 0, got {batch_size}, {num_workers}.")
        self.attacked_class = attacked_class
        from lightning_unlearn.unlearn.request.target import TARGETS

        if forgetting_target is not None and forgetting_target not in TARGETS:
            raise ValueError(
                f"`forgetting_target` must be one of {TARGETS} or None (from the labels), got {forgetting_target!r}."
            )
        self.forgetting_target = forgetting_target
        self.batch_size, self.num_workers = batch_size, num_workers
        self.dataset = name
        #: The forget set's positions (what ``len()`` of a poison record counts).
        self.record = list(range(len(self._forget)))  # type: ignore[arg-type]

    @classmethod
    def from_datamodule(cls, datamodule: Any, **kwargs: Any) -> UnlearnData:
        """The protocol's loaders of ``datamodule`` (``setup("fit")`` is called first when it has ``setup``)."""
        missing = [m for m in REQUIRED_LOADERS if not callable(getattr(datamodule, m, None))]
        if missing:
            raise TypeError(
                f"The data module {type(datamodule).__name__} lacks {', '.join(missing)}: unlearning data needs "
                f"{', '.join(REQUIRED_LOADERS)} (and optionally corrected_forget_dataloader, test_dataloader, "
                "profile_dataloader); see lightning_unlearn.data.protocol."
            )
        if callable(getattr(datamodule, "setup", None)):
            datamodule.setup("fit")

        def optional(name: str) -> Any:
            method = getattr(datamodule, name, None)
            return method() if callable(method) else None

        kwargs.setdefault("attacked_class", getattr(datamodule, "attacked_class", None))
        kwargs.setdefault("forgetting_target", getattr(datamodule, "forgetting_target", None))
        kwargs.setdefault("batch_transform", getattr(datamodule, "batch_transform", None))
        kwargs.setdefault("name", type(datamodule).__name__)
        return cls(
            forget=datamodule.forget_dataloader(),
            retain=datamodule.retain_dataloader(),
            val=datamodule.val_dataloader(),
            corrected_labels=optional("corrected_forget_dataloader"),
            test=optional("test_dataloader") or None,
            train=optional("profile_dataloader"),
            **kwargs,
        )

    def _corrected(self, value: Any) -> torch.Tensor:
        if isinstance(value, (DataLoader, Dataset)):
            dataset = _dataset_of(value, "corrected_labels")
            indexed = Indexed(dataset, "corrected_labels", self.batch_transform)
            labels = torch.stack([indexed[i][1] for i in range(len(dataset))])
        else:
            labels = torch.as_tensor(value)
            if labels.is_floating_point() or labels.dim() != 1:
                raise ValueError("`corrected_labels` must be a 1-D sequence of class indices.")
            labels = labels.long()
        if len(labels) != len(self._forget):  # type: ignore[arg-type]
            raise ValueError(
                f"`corrected_labels` has {len(labels)} labels for {len(self._forget)} forget samples: it must give "  # type: ignore[arg-type]
                "one per forget sample, in the forget set's order."
            )
        return labels

    # ------------------------------------------------------------------------- the protocol UnlearnModule reads
    @property
    def has_corrected_labels(self) -> bool:
        return self.corrected is not None

    def setup(self, stage: str | None = None) -> None:
        """Nothing to prepare (the datasets exist); for symmetry with ``LightningDataModule``."""

    def _loader(self, dataset: Dataset, batch_size: int | None = None, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle, num_workers=self.num_workers
        )

    def forget_dataloader(self, batch_size: int | None = None, shuffle: bool = False) -> DataLoader:
        """D_f with the trained-on labels: ``(x, y, index)``."""
        return self._loader(Indexed(self._forget, "forget", self.batch_transform), batch_size, shuffle)

    def corrected_forget_dataloader(self, batch_size: int | None = None, shuffle: bool = False) -> DataLoader:
        """D̃_f: the forget samples with their corrected labels (raises without ``corrected_labels``)."""
        corrected = self._require_corrected()
        return self._loader(Relabelled(self._forget, corrected, "forget", self.batch_transform), batch_size, shuffle)

    def forget_pairs_dataloader(self, batch_size: int | None = None, shuffle: bool = False) -> DataLoader:
        """D_f with both labels: ``(x, trained-on label, corrected label, index)``; without ``corrected_labels`` the
        corrected label is -1 (an invalid class: a loss that used it would fail), for methods that ascend only."""
        corrected = self.corrected if self.corrected is not None else torch.full((len(self._forget),), -1)  # type: ignore[arg-type]
        return self._loader(ForgetPairs(self._forget, corrected, "forget", self.batch_transform), batch_size, shuffle)

    def retain_dataloader(self, batch_size: int | None = None, shuffle: bool = False) -> DataLoader:
        return self._loader(Indexed(self._retain, "retain", self.batch_transform), batch_size, shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader(Indexed(self._val, "val", self.batch_transform))

    def test_dataloader(self) -> list[DataLoader]:
        """``[test loader]``, or ``[]`` without a test split."""
        return [] if self._test is None else [self._loader(Indexed(self._test, "test", self.batch_transform))]

    def train_dataset(self) -> Dataset:
        """The training set as trained on (``train``, or D_r followed by D_f with the trained-on labels)."""
        if self._train is not None:
            return Indexed(self._train, "train", self.batch_transform)
        transform = self.batch_transform
        return ConcatDataset([Indexed(self._retain, "retain", transform), Indexed(self._forget, "forget", transform)])

    def overlap_notes(self) -> list[str]:
        """Forget samples that also occur in the validation or retain split (by index or content; see
        :func:`~lightning_unlearn.data.identity.split_overlaps`), in words; ``[]`` when they are disjoint."""
        from lightning_unlearn.data.identity import split_overlaps

        def items(dataset: Dataset) -> Dataset:  # (inputs, label) as the request reads them
            return Indexed(dataset, "data", self.batch_transform)

        return split_overlaps(self._forget, {"validation": self._val, "retain": self._retain}, items)

    def _require_corrected(self) -> torch.Tensor:
        require_corrected_labels(self, "This")
        return self.corrected  # type: ignore[return-value]

    def __repr__(self) -> str:
        sizes = f"forget={len(self._forget)}, retain={len(self._retain)}, val={len(self._val)}"  # type: ignore[arg-type]
        extra = "" if self._test is None else f", test={len(self._test)}"  # type: ignore[arg-type]
        return f"UnlearnData({sizes}{extra}, corrected_labels={self.corrected is not None})"


def as_unlearn_data(data: Any, **kwargs: Any) -> Any:
    """``data`` as something :class:`~lightning_unlearn.unlearn.UnlearnModule` can read: an :class:`UnlearnData` or
    a ``PoisonedDataModule`` as they are, any other object through :meth:`UnlearnData.from_datamodule`."""
    from lightning_unlearn.data.datamodule import PoisonedDataModule

    if isinstance(data, (UnlearnData, PoisonedDataModule)):
        return data
    return UnlearnData.from_datamodule(data, **kwargs)


def require_corrected_labels(data: Any, what: str) -> None:
    """Raise a clear error, naming ``what`` needs them, if ``data`` has no corrected labels for its forget set."""
    if not getattr(data, "has_corrected_labels", True):
        raise ValueError(
            f"{what} needs the forget samples' corrected labels, and the data has none (a removal request — class-wise "
            "or random-sample forgetting — has none by nature): use a method that needs none (FirstOrderRemoval, "
            "NegGradPlus, SharpMinMax, Finetune, RandomLabel, L1Sparse, SCRUB, SSD), or, for a poison, pass "
            "`corrected_labels` to UnlearnData (or give the data module a `corrected_forget_dataloader()`)."
        )
