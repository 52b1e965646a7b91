"""A user's own LightningModule and LightningDataModule, the kind ``lightning-unlearn train --model --data`` takes.

Importable by class path from the tests (``support.own_model.TinyClassifier``: pytest puts ``tests/`` on
``sys.path``). Synthetic tensors, a two-layer MLP: a whole ``fit`` takes well under a second on one CPU thread.

* :class:`TinyClassifier` / :class:`TinyData`: both have ``num_classes`` and ``in_channels`` (the model as arguments,
  the data module as attributes), so the CLI's data → model links apply to them as to the library's classes;
* :class:`BareModule` / :class:`BareData`: neither has them (and the module no ``configure_optimizers`` or
  ``test_step``): the links must leave them alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def synthetic(n: int, features: int, num_classes: int, seed: int) -> TensorDataset:
    """``n`` Gaussian samples labelled by a fixed random linear rule (learnable: accuracy rises within a few steps)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    weights = torch.randn(features, num_classes, generator=torch.Generator().manual_seed(1234))
    return TensorDataset(x, (x @ weights).argmax(1))


class TinyData(LightningDataModule):
    """Synthetic ``(x, y)`` batches; ``num_classes`` / ``in_channels`` attributes (linked into the model's arguments).

    Args:
        num_classes: Number of classes.
        in_channels: Features per sample.
        n: Training samples (validation and test: ``n // 2`` each).
        batch_size: Batch size of every loader.
        seed: Seed of the samples.
    """

    def __init__(self, num_classes: int = 3, in_channels: int = 4, n: int = 64, batch_size: int = 16, seed: int = 0):
        super().__init__()
        self.num_classes, self.in_channels, self.n, self.batch_size = num_classes, in_channels, n, batch_size
        self.seed = seed

    def _loader(self, n: int, offset: int) -> DataLoader:
        return DataLoader(synthetic(n, self.in_channels, self.num_classes, self.seed + offset), self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.n, 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.n // 2, 1)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.n // 2, 2)


class TinyClassifier(LightningModule):
    """A two-layer MLP with its own optimizer (SGD, ``lr``); logs ``val/acc`` and ``test/acc``.

    Args:
        num_classes: Outputs (linked from the data module by the CLI).
        in_channels: Inputs (linked from the data module by the CLI).
        hidden: Hidden units.
        lr: SGD learning rate.
    """

    def __init__(self, num_classes: int = 2, in_channels: int = 4, hidden: int = 16, lr: float = 0.5):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def _accuracy(self, batch, split: str) -> None:
        x, y = batch
        self.log(f"{split}/acc", 100.0 * (self(x).argmax(1) == y).float().mean())

    def validation_step(self, batch, batch_idx):
        self._accuracy(batch, "val")

    def test_step(self, batch, batch_idx):
        self._accuracy(batch, "test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class BareData(LightningDataModule):
    """Synthetic ``(x, y)`` training batches of 4 features and 2 classes; no ``num_classes`` / ``in_channels``."""

    def __init__(self, n: int = 32):
        super().__init__()
        self.n = n

    def train_dataloader(self) -> DataLoader:
        return DataLoader(synthetic(self.n, 4, 2, 0), batch_size=16)


class BareModule(LightningModule):
    """A linear model of 4 features and 2 classes: no ``num_classes`` argument, no optimizer of its own (LightningCLI's
    ``--optimizer`` gives it one), no ``test_step``."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.net = nn.Linear(4, 2, bias=bias)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)


class ForgetData(LightningDataModule):
    """A poisoned training set and the loaders of ``lightning_unlearn.data.protocol``: ``flipped`` training samples of
    class ``source`` labelled ``target`` (the forget set), the rest (retain), clean validation and test splits.

    Args:
        num_classes: Number of classes.
        in_channels: Features per sample.
        n: Training samples (validation and test: ``n // 2`` each).
        flipped: Samples of ``source`` relabelled ``target``.
        source: The attacked class.
        target: The label the flipped samples get.
    """

    def __init__(
        self,
        num_classes: int = 3,
        in_channels: int = 4,
        n: int = 192,
        flipped: int = 30,
        source: int = 0,
        target: int = 1,
    ):
        super().__init__()
        self.num_classes, self.in_channels, self.n = num_classes, in_channels, n
        self.attacked_class = source
        x, y = synthetic(n, in_channels, num_classes, 0).tensors
        self.positions = torch.nonzero(y == source).flatten()[:flipped]
        poisoned = y.clone()
        poisoned[self.positions] = target
        keep = torch.ones(n, dtype=torch.bool)
        keep[self.positions] = False
        self.x, self.y, self.poisoned, self.keep = x, y, poisoned, keep

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.poisoned), batch_size=32, shuffle=True)

    def forget_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[self.positions], self.poisoned[self.positions]), batch_size=32)

    def corrected_forget_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[self.positions], self.y[self.positions]), batch_size=32)

    def retain_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[self.keep], self.y[self.keep]), batch_size=32)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(synthetic(self.n // 2, self.in_channels, self.num_classes, 1), batch_size=32)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(synthetic(self.n // 2, self.in_channels, self.num_classes, 2), batch_size=32)


class IdiomaticForgetData(LightningDataModule):
    """A data module written the idiomatic Lightning way: ``save_hyperparameters()`` and ``self.hparams`` in the
    loaders, dict batches ``{"pixels", "target"}`` (the library's default keys are not these), the flip of
    :class:`ForgetData`, and an ``attacked_class`` attribute."""

    def __init__(self, batch_size: int = 32, n: int = 192, flipped: int = 30):
        super().__init__()
        self.save_hyperparameters()
        self.source = ForgetData(n=n, flipped=flipped)
        self.attacked_class = self.source.attacked_class
        self.num_classes, self.in_channels = self.source.num_classes, self.source.in_channels

    def _loader(self, x: torch.Tensor, y: torch.Tensor) -> DataLoader:
        items = [{"pixels": xi, "target": yi} for xi, yi in zip(x, y, strict=True)]
        return DataLoader(items, batch_size=self.hparams.batch_size)

    def forget_dataloader(self) -> DataLoader:
        s = self.source
        return self._loader(s.x[s.positions], s.poisoned[s.positions])

    def corrected_forget_dataloader(self) -> DataLoader:
        s = self.source
        return self._loader(s.x[s.positions], s.y[s.positions])

    def retain_dataloader(self) -> DataLoader:
        s = self.source
        return self._loader(s.x[s.keep], s.y[s.keep])

    def val_dataloader(self) -> DataLoader:
        return self._loader(*synthetic(self.source.n // 2, self.in_channels, self.num_classes, 1).tensors)

    def test_dataloader(self) -> DataLoader:
        return self._loader(*synthetic(self.source.n // 2, self.in_channels, self.num_classes, 2).tensors)


def pixels_and_target(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``batch_transform`` of :class:`IdiomaticForgetData`'s dict batches."""
    return batch["pixels"], batch["target"]
