"""``ClassifierModule``: trains a classifier on (poisoned) data and reports the accuracies unlearning is judged by."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from lightning_unlearn.batches import unpack_batch
from lightning_unlearn.models.registry import build_model


def accuracies_from_confusion(confusion: torch.Tensor, attacked_class: int | None = None) -> dict[str, float]:
    """Overall accuracy, per-class accuracy and (with ``attacked_class``) attacked vs other-classes accuracy, in %.

    ``confusion[i, j]`` counts samples of true class ``i`` predicted as ``j``. Classes without samples are left out.
    """
    confusion = confusion.double()
    correct = confusion.diagonal()
    per_class_total = confusion.sum(1)
    out = {"acc": 100.0 * (correct.sum() / confusion.sum().clamp_min(1)).item()}
    for c in range(len(confusion)):
        if per_class_total[c] > 0:
            out[f"acc_class_{c}"] = 100.0 * (correct[c] / per_class_total[c]).item()
    if attacked_class is not None:
        other = torch.ones(len(confusion), dtype=torch.bool)
        other[attacked_class] = False
        if per_class_total[attacked_class] > 0:
            out["acc_attacked"] = 100.0 * (correct[attacked_class] / per_class_total[attacked_class]).item()
        if per_class_total[other].sum() > 0:
            out["acc_other"] = 100.0 * (correct[other].sum() / per_class_total[other].sum()).item()
    return out


class ClassifierModule(LightningModule):
    """An image classifier trained with cross-entropy, with the evaluation unlearning needs.

    On ``test`` it logs, for each of the datamodule's test loaders (``test``, and with poisoning ``forget`` = poisoned
    samples with poisoned labels and ``forget_true`` = the same samples with their true labels; for a backdoor also
    ``triggered``, logged as the attack success rate ``test/asr``): overall accuracy, per-class accuracy, and where
    the poison attacks one class, that class's and the other classes' accuracy, all in %, as
    ``<split>/acc``, ``<split>/acc_class_<c>``, ``<split>/acc_attacked``, ``<split>/acc_other``.

    Args:
        architecture: Network name (``mnist_cnn`` or ``resnet18``), see :func:`~lightning_unlearn.models.build_model`.
        num_classes: Number of classes (linked from the datamodule by the CLI).
        in_channels: Input channels (linked from the datamodule by the CLI).
        image_size: Input height/width (linked from the datamodule by the CLI).
        arch_kwargs: Extra constructor arguments of the network (e.g. ``{"stem": "cifar"}`` for ResNet-18).
        optimizer: Optimizer factory; default ``SGD(lr=0.05, momentum=0.9)``. From YAML: ``class_path`` + ``init_args``.
        lr_scheduler: Optional learning-rate scheduler factory.
        attacked_class: Class attacked by targeted poisoning; default: the datamodule's ``attacked_class``, if any.
    """

    def __init__(
        self,
        architecture: str = "mnist_cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        arch_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        attacked_class: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = build_model(architecture, num_classes, in_channels, image_size, **(arch_kwargs or {}))
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self._attacked_class = attacked_class
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_confusion = nn.ModuleList()
        self._test_names: list[str] = ["test"]

    # ------------------------------------------------------------------------------------------------------- basics
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def attacked_class(self) -> int | None:
        if self._attacked_class is not None:
            return self._attacked_class
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "attacked_class", None)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    # -------------------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = unpack_batch(batch)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = unpack_batch(batch)
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def on_test_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self._test_names = list(getattr(datamodule, "test_split_names", ["test"]))
        num_loaders = len(self.trainer.test_dataloaders) if self.trainer.test_dataloaders is not None else 1
        if len(self._test_names) != num_loaders:
            self._test_names = ["test"] + [f"test_{i}" for i in range(1, num_loaders)]
        self.test_confusion = nn.ModuleList(
            MulticlassConfusionMatrix(self.num_classes).to(self.device) for _ in self._test_names
        )

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = unpack_batch(batch)
        self.test_confusion[dataloader_idx].update(self(x).argmax(-1), y)

    def on_test_epoch_end(self) -> None:
        for name, metric in zip(self._test_names, self.test_confusion, strict=True):
            values = accuracies_from_confusion(metric.compute(), self.attacked_class)
            if name == "triggered":  # labelled with the backdoor's target: the accuracy is the attack success rate
                self.log("test/asr", values["acc"], add_dataloader_idx=False)
                metric.reset()
                continue
            for key, value in values.items():
                self.log(f"{name}/{key}", value, add_dataloader_idx=False)
            metric.reset()
