"""The poisoned-data ``LightningDataModule``: train (poisoned), clean validation and test, forget and retain sets; also
the forgetting scenarios (class-wise, random-sample) on clean data."""

from __future__ import annotations

import inspect
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from lightning_unlearn.data.datasets import ForgetPairDataset, ImageDataset, normalize
from lightning_unlearn.data.poison import POISON_KINDS, PoisonRecord, PoisonSpec, make_poison
from lightning_unlearn.data.sources import DATASETS, DatasetSplits, Split, load_dataset

POISON_FILENAME = "poison.json"
SPLITS = ("train", "val", "test")
_CACHE: dict[tuple, DatasetSplits] = {}


class PoisonedDataModule(LightningDataModule):
    """A real image dataset whose training set is poisoned, with the record of exactly what was poisoned.

    Loaders: ``train_dataloader`` (poisoned labels, and for a backdoor triggered inputs, shuffled), ``val_dataloader``
    (clean validation split, never poisoned; used to choose unlearning step sizes), ``test_dataloader`` (test split,
    then the forget set with poisoned and with true labels when there is poisoning, then for a backdoor the triggered
    test images of the other classes labelled with the target class, whose accuracy is the attack success rate).
    For unlearning: :meth:`forget_dataloader` (poisoned samples with poisoned labels),
    :meth:`corrected_forget_dataloader` (same inputs, true labels), :meth:`retain_dataloader` (all other training
    samples), :meth:`profile_dataloader` (the training set as trained on, unshuffled, unaugmented). For evaluation:
    :meth:`triggered_test_dataloader` and :meth:`poisoned_validation_dataloader` (the same poison applied to the
    validation split, for calibrating attacks without touching the test set). With a forgetting scenario
    (``poison.kind`` ``classwise`` or ``random_sample``) the training set is clean, the forget set keeps its clean
    labels and there are no corrected labels: :attr:`has_corrected_labels` is false, methods that need them are
    refused, and the test loaders are the test split and the forget set. The poison record is written to
    ``<trainer.log_dir>/poison.json`` when training starts and kept in checkpoints; resuming a checkpoint trained on
    another poison is refused.

    Args:
        dataset: One of ``mnist``, ``fashion_mnist``, ``cifar10``.
        root: Dataset root (see :mod:`lightning_unlearn.data.sources`); None uses the offline copies.
        download: Allow torchvision to download into ``root`` (needs internet).
        poison: What to poison, or which clean samples to forget (:class:`PoisonSpec`); ``kind: none`` trains on
            clean labels with nothing to forget.
        poison_record: Path of an existing ``poison.json`` to reuse instead of drawing one from ``poison``
            (e.g. to unlearn or retrain on exactly the same split).
        drop_poisoned: Leave the poisoned samples (the forget set) out of the training set (retraining from scratch,
            the reference).
        train_subset: Use only the first ``train_subset`` training samples (fast debugging); poisoning applies after.
        val_size: Size of the validation split carved from the end of the original training set (default per dataset).
        batch_size: Training batch size.
        eval_batch_size: Batch size of evaluation loaders.
        num_workers: DataLoader workers.
        augment: Random crop + flip on training batches (CIFAR-10 style); never used by profiling or unlearning loaders.
        pad_to: Zero-pad every image around its centre to ``pad_to`` × ``pad_to`` pixels (e.g. 32 for Fashion-MNIST
            on ResNet-18 as CIFAR-10 stand-in); None keeps the dataset's size.
        repeat_channels: Repeat single-channel images to this many channels (3: gray images for a network with an RGB
            stem, e.g. torchvision's ResNet-18 as the paper counts it); None keeps the dataset's channels.
    """

    def __init__(
        self,
        dataset: str = "mnist",
        root: str | None = None,
        download: bool = False,
        poison: PoisonSpec | None = None,
        poison_record: str | None = None,
        drop_poisoned: bool = False,
        train_subset: int | None = None,
        val_size: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        augment: bool = False,
        pad_to: int | None = None,
        repeat_channels: int | None = None,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"`dataset` must be one of {DATASETS}, got {dataset!r}.")
        if poison is not None and not isinstance(poison, PoisonSpec):
            poison = PoisonSpec(**poison)
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        if train_subset is not None and train_subset < 1:
            raise ValueError(f"`train_subset` must be >= 1 or None, got {train_subset}.")
        if pad_to is not None and pad_to < 1:
            raise ValueError(f"`pad_to` must be >= 1 or None, got {pad_to}.")
        if repeat_channels is not None and repeat_channels < 1:
            raise ValueError(f"`repeat_channels` must be >= 1 or None, got {repeat_channels}.")
        self.poison = poison or PoisonSpec(kind="none")
        # exactly these arguments, plain data: inside a module LightningCLI instantiates, Lightning would store that's
        arguments = {name: value for name, value in locals().items() if name in _ARGUMENTS}
        self.save_hyperparameters(arguments | {"poison": self.poison.to_dict()})
        self.dataset = dataset
        self.root = root
        self.download = download
        self.poison_record_path = poison_record
        self.drop_poisoned = drop_poisoned
        self.train_subset = train_subset
        self.val_size = val_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.pad_to = pad_to
        self.repeat_channels = repeat_channels
        self.splits: DatasetSplits | None = None
        self._images: dict[str, torch.Tensor] = {}
        self.record: PoisonRecord | None = None
        self._train_labels: torch.Tensor | None = None
        self._record_written = False

    # --------------------------------------------------------------------------------------------- dataset properties
    @property
    def num_classes(self) -> int:
        return 10 if self.splits is None else self.splits.num_classes

    @property
    def in_channels(self) -> int:
        return self.repeat_channels or (3 if self.dataset == "cifar10" else 1)

    @property
    def image_size(self) -> int:
        return self.pad_to or (32 if self.dataset == "cifar10" else 28)

    @property
    def attacked_class(self) -> int | None:
        """The class whose test accuracy the poison lowers (``label_flip``: the source class; ``targeted``: the
        relabelled class), else None; its test accuracy is reported as ``test/acc_attacked``."""
        return self.spec.attacked_class

    @property
    def has_corrected_labels(self) -> bool:
        """Whether the forget set has corrected labels: yes for a poison, no for a forgetting scenario (``classwise``,
        ``random_sample``: its labels are clean, the request is to remove it; see
        :func:`~lightning_unlearn.data.protocol.require_corrected_labels`)."""
        return not self.spec.keeps_labels

    @property
    def test_split_names(self) -> list[str]:
        """Names of the loaders returned by :meth:`test_dataloader`, in order."""
        if self.record is None or not len(self.record):
            return ["test"]
        corrected = ["forget_true"] if self.has_corrected_labels else []
        return ["test", "forget", *corrected] + (["triggered"] if self.spec.stamps_inputs else [])

    # ------------------------------------------------------------------------------------------------------ lifecycle
    def prepare_data(self) -> None:
        if self.download:
            load_dataset(self.dataset, self.root, download=True, val_size=self.val_size)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None):
            self._record_written = False  # each fit writes the record into its own run directory
        if self.splits is None:
            key = (self.dataset, self.root, self.val_size)
            if key not in _CACHE:
                _CACHE.clear()
                _CACHE[key] = load_dataset(self.dataset, self.root, download=False, val_size=self.val_size)
            splits = _CACHE[key]
            if self.train_subset is not None:
                n = min(self.train_subset, len(splits.train))
                splits = DatasetSplits(
                    splits.name,
                    Split(splits.train.images[:n], splits.train.labels[:n]),
                    splits.val,
                    splits.test,
                    splits.num_classes,
                    splits.mean,
                    splits.std,
                    splits.source,
                )
            self.splits = splits
        if self._train_labels is None:
            if self.record is None:
                self.record = self._make_record()
            else:  # restored from a checkpoint's state, or set by `TrainingRun`: check it belongs to this data
                self.record.validate(self.splits.train.labels, dataset=self.splits.name, num_classes=self.num_classes)
            self._train_labels = self.record.apply(self.splits.train.labels)
            self._images = {name: self._normalize(getattr(self.splits, name).images) for name in SPLITS}
            if self.spec.stamps_inputs and len(self.record):
                self._stamp_training_images()
            rank_zero_info(
                f"{self.splits.name}: {len(self.splits.train)} train / {len(self.splits.val)} val / "
                f"{len(self.splits.test)} test ({self.splits.source}); {len(self.record)} "
                f"{'to forget' if self.spec.keeps_labels else 'poisoned'} ({self.spec.kind})"
                f"{', dropped' if self.drop_poisoned else ''}."
            )

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.splits.mean, self.splits.std, self.pad_to)

    @property
    def spec(self) -> PoisonSpec:
        """The poison actually applied: the record's own spec once there is a record (a reused ``poison.json`` or a
        checkpoint's record carries it), else the ``poison`` argument."""
        if self.record is not None and self.record.spec:
            return PoisonSpec.from_dict(self.record.spec)
        return self.poison

    def _stamp_training_images(self) -> None:
        """Stamp the trigger on the poisoned training images (a backdoor poisons inputs as well as labels)."""
        idx = torch.tensor(self.record.indices, dtype=torch.long)
        stamped = self.spec.trigger.stamp(self.splits.train.images[idx])
        images = self._images["train"].clone()
        images[idx] = self._normalize(stamped)
        self._images["train"] = images

    def _make_record(self) -> PoisonRecord:
        train = self.splits.train
        if self.poison_record_path is not None:
            record = PoisonRecord.load(self.poison_record_path)
            try:
                record.validate(train.labels, dataset=self.splits.name, num_classes=self.splits.num_classes)
            except ValueError as err:
                raise ValueError(
                    f"`poison_record` {str(self.poison_record_path)!r} does not belong to this data: {err}"
                ) from err
            return record
        return make_poison(train.labels, self.splits.num_classes, self.poison, self.splits.name)

    def _write_record(self) -> None:
        """Write ``poison.json`` into the run directory (global rank zero) when training starts, i.e. after a resumed
        checkpoint's record has been compared with this one (:meth:`load_state_dict`). A trainer without a logger
        has no run directory (its ``log_dir`` falls back to the working directory): nothing is written then."""
        trainer = self.trainer
        if trainer is None or self._record_written or not trainer.loggers:
            return
        log_dir = trainer.log_dir  # on every rank: under DDP it is a collective
        self._record_written = True
        if log_dir is not None and trainer.is_global_zero:
            self.record.save(Path(log_dir) / POISON_FILENAME)

    def state_dict(self) -> dict[str, Any]:
        return {"poison_record": None if self.record is None else self.record.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the poison record of a checkpoint; when this module already drew or loaded one (``fit(...,
        ckpt_path=...)`` sets up the data before restoring), the two must be equal.

        Raises:
            ValueError: If the checkpoint was trained on another poison than this module's (a resume that would
                change the poison), or its record is invalid.
        """
        if state_dict.get("poison_record") is None:
            return
        stored = PoisonRecord.from_dict(state_dict["poison_record"])
        if self.record is None:  # (not `or`: an empty record is falsy)
            self.record = stored
        differences = stored.differences(self.record)
        if differences:
            raise ValueError(
                "Refusing to resume: the checkpoint was trained on another poison than this data module's (they "
                f"differ in {'; '.join(differences)}); the run would continue on a different forget set. Resume with "
                "the checkpoint run's poison: `--data.poison_record <that run>/poison.json` (or the same "
                "`--data.poison.*` options)."
            )

    # -------------------------------------------------------------------------------------------------------- subsets
    def _require_setup(self) -> DatasetSplits:
        if self.splits is None:
            self.setup()
        return self.splits

    @property
    def poisoned_positions(self) -> torch.Tensor:
        self._require_setup()
        return torch.tensor(self.record.indices, dtype=torch.long)

    @property
    def retain_positions(self) -> torch.Tensor:
        splits = self._require_setup()
        keep = torch.ones(len(splits.train), dtype=torch.bool)
        keep[self.poisoned_positions] = False
        return torch.nonzero(keep).flatten()

    def _train_dataset(self, positions: torch.Tensor | None, clean: bool, augment: bool = False) -> ImageDataset:
        splits = self._require_setup()
        labels = splits.train.labels if clean else self._train_labels
        return ImageDataset(self._images["train"], labels, positions, augment, self.repeat_channels)

    def _dataset(self, split: str) -> ImageDataset:
        splits = self._require_setup()
        return ImageDataset(self._images[split], getattr(splits, split).labels, channels=self.repeat_channels)

    def _loader(self, dataset: Dataset, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size or (self.batch_size if shuffle else self.eval_batch_size),
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataset(self) -> ImageDataset:
        """The training set as trained on: poisoned labels, or the retain set when ``drop_poisoned``."""
        return self._train_dataset(self.retain_positions if self.drop_poisoned else None, clean=False, augment=False)

    def train_dataloader(self) -> DataLoader:
        self._write_record()
        positions = self.retain_positions if self.drop_poisoned else None
        return self._loader(self._train_dataset(positions, clean=False, augment=self.augment), shuffle=True)

    def profile_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """The training set exactly as trained on, unshuffled and unaugmented (what curvature profiling needs)."""
        return self._loader(self.train_dataset(), batch_size=batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val"))

    def test_dataloader(self) -> list[DataLoader]:
        """Test set, and (for poisoned runs) the forget set with poisoned and with true labels.

        Under DDP every sample is tested exactly once: each rank gets a disjoint, unpadded shard (Lightning's default
        sampler would pad with repeats, counting some samples twice), and the synced metrics equal one process's.
        """
        loaders = [self._loader(self._dataset("test"))]
        if len(self.test_split_names) > 1:
            loaders.append(self.forget_dataloader())
        if "forget_true" in self.test_split_names:
            loaders.append(self.corrected_forget_dataloader())
        if "triggered" in self.test_split_names:
            loaders.append(self.triggered_test_dataloader())
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            loaders = [self._unrepeated(loader, trainer.global_rank, trainer.world_size) for loader in loaders]
        return loaders

    def _unrepeated(self, loader: DataLoader, rank: int, world_size: int) -> DataLoader:
        sampler = UnrepeatedDistributedSampler(loader.dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def forget_dataloader(self, batch_size: int | None = None, shuffle: bool = False) -> DataLoader:
        """D_f: the poisoned samples with their poisoned labels (a forgetting scenario's: their clean labels)."""
        return self._loader(self._train_dataset(self.poisoned_positions, clean=False), shuffle, batch_size)

    def corrected_forget_dataloader(self, batch_size: int | None = None, shuffle: bool = False) -> DataLoader:
        """D̃_f: the poisoned samples with their true labels.

        Raises:
            ValueError: For a forgetting scenario (``classwise``, ``random_sample``), which has no corrected labels.
        """
        if not self.has_corrected_labels:
            raise ValueError(
                f"The corrected forget set needs the forget samples' corrected labels, and a {self.spec.kind!r} data "
                "module has none (its forget set keeps its clean labels: a removal request). Use a method that needs "
                "none (NegGradPlus, SharpMinMax, Finetune)."
            )
        return self._loader(self._train_dataset(self.poisoned_positions, clean=True), shuffle, batch_size)

    def forget_pairs_dataloader(self, batch_size: int | None = None, shuffle: bool = False) -> DataLoader:
        """D_f with both labels: batches ``(x, poisoned_label, true_label, index)``; for a forgetting scenario the
        trained-on label is the clean label and the corrected one is -1 (there is none: an invalid class, so a loss
        that used it would fail), as :class:`~lightning_unlearn.data.protocol.UnlearnData` gives without
        ``corrected_labels``."""
        splits = self._require_setup()
        corrected = splits.train.labels if self.has_corrected_labels else torch.full_like(splits.train.labels, -1)
        dataset = ForgetPairDataset(
            self._images["train"],
            self._train_labels,
            corrected,
            self.poisoned_positions,
            self.repeat_channels,
        )
        return self._loader(dataset, shuffle, batch_size)

    def retain_dataloader(self, batch_size: int | None = None, shuffle: bool = False) -> DataLoader:
        """D_r: every training sample that was not poisoned."""
        return self._loader(self._train_dataset(self.retain_positions, clean=True), shuffle, batch_size)

    def triggered_test_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Backdoor only: the test images of the classes the backdoor applies to (every class but the target, or the
        source class) with the trigger stamped, labelled with the target class. Accuracy on it = attack success rate.

        Raises:
            ValueError: If the poison is not a backdoor.
        """
        splits = self._require_setup()
        if not self.spec.stamps_inputs:
            raise ValueError(f"The triggered test set exists only for backdoor poisoning, not {self.spec.kind!r}.")
        spec = self.spec
        labels = splits.test.labels
        keep = labels != spec.target_class if spec.source_class is None else labels == spec.source_class
        positions = torch.nonzero(keep).flatten()
        images = self._normalize(spec.trigger.stamp(splits.test.images[positions]))
        target = torch.full((len(positions),), spec.target_class, dtype=labels.dtype)
        return self._loader(ImageDataset(images, target, channels=self.repeat_channels), batch_size=batch_size)

    def poisoned_validation_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """The training poison applied afresh to the clean validation split (its own seeded draw; the same share of
        the candidate samples as in training; triggered inputs for a backdoor), with the *poisoned* labels: what a
        relearning attack is calibrated on without looking at the forget set or the test set.

        Raises:
            ValueError: Without poisoning, or when the validation split has no candidate sample.
        """
        splits = self._require_setup()
        if self.spec.kind == "none" or not len(self.record):
            raise ValueError("There is no poison to apply to the validation split (`poison.kind` is 'none').")
        spec = self.spec
        candidates = len(
            make_poison(splits.train.labels, splits.num_classes, replace(spec, count=None, fraction=1.0), splits.name)
        )
        share = min(1.0, len(self.record) / candidates)
        val_spec = replace(spec, count=None, fraction=share, seed=spec.seed + 1)
        record = make_poison(splits.val.labels, splits.num_classes, val_spec, splits.name)
        idx = torch.tensor(record.indices, dtype=torch.long)
        source = splits.val.images[idx]
        images = self._normalize(spec.trigger.stamp(source) if spec.stamps_inputs else source)
        labels = torch.tensor(record.poisoned_labels, dtype=splits.val.labels.dtype)
        return self._loader(ImageDataset(images, labels, channels=self.repeat_channels), batch_size=batch_size)


#: The arguments the data module saves as hyper-parameters besides ``poison`` (saved as plain data).
_ARGUMENTS = tuple(name for name in inspect.signature(PoisonedDataModule.__init__).parameters if name != "self")


def find_run_file(run_dir: str | os.PathLike, name: str) -> Path:
    """Path of ``name`` inside a run directory, with a clear error when it is missing."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: is {str(run_dir)!r} a lightning-unlearn run directory?")
    return path


__all__ = ["ImageDataset", "PoisonedDataModule", "POISON_FILENAME", "POISON_KINDS", "find_run_file"]
