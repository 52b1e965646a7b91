"""Architectures by name, so a checkpoint's hyper-parameters rebuild its network without extra code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_unlearn.models.cnn import MnistCNN
from lightning_unlearn.models.resnet import ResNet18


def _mnist_cnn(num_classes: int, in_channels: int, image_size: int, **kwargs: Any) -> nn.Module:
    return MnistCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)


def _resnet18(num_classes: int, in_channels: int, image_size: int, **kwargs: Any) -> nn.Module:
    return ResNet18(num_classes=num_classes, in_channels=in_channels, **kwargs)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mnist_cnn": _mnist_cnn, "resnet18": _resnet18}


def build_model(
    architecture: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs: Any
) -> nn.Module:
    """Build a network by name (one of :data:`ARCHITECTURES`); ``kwargs`` go to its constructor.

    Raises:
        ValueError: For an unknown ``architecture``.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"`architecture` must be one of {tuple(ARCHITECTURES)}, got {architecture!r}.")
    return ARCHITECTURES[architecture](
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs
    )
