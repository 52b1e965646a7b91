"""Real datasets (offline), label poisoning and the poisoned-data module."""

from lightning_unlearn.data.datamodule import ImageDataset, PoisonedDataModule
from lightning_unlearn.data.poison import POISON_KINDS, PoisonRecord, PoisonSpec, make_poison
from lightning_unlearn.data.protocol import UnlearnData
from lightning_unlearn.data.sources import DATASETS, DatasetError, DatasetSplits, Split, load_dataset

__all__ = [
    "DATASETS",
    "POISON_KINDS",
    "DatasetError",
    "DatasetSplits",
    "ImageDataset",
    "PoisonRecord",
    "PoisonSpec",
    "PoisonedDataModule",
    "Split",
    "UnlearnData",
    "load_dataset",
    "make_poison",
]
