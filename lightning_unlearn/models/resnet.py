"""ResNet-18 as torchvision builds it, with the stems used for CIFAR-10 and 28×28 grey-scale images."""

from __future__ import annotations

from typing import Literal

from torch import nn
from torchvision.models import resnet18

Stem = Literal["imagenet", "cifar"]
STEMS = ("imagenet", "cifar")


def ResNet18(num_classes: int = 10, in_channels: int = 3, stem: Stem = "imagenet") -> nn.Module:  # noqa: N802
    """Build torchvision's ResNet-18 (random initialisation, never downloaded weights).

    Args:
        num_classes: Number of output classes. With 10 classes and 3 input channels the ``imagenet`` stem gives exactly
            11,181,642 parameters (the seed paper's Table 1).
        in_channels: Input channels (1 for MNIST / Fashion-MNIST).
        stem: ``"imagenet"`` keeps torchvision's 7×7 stride-2 first convolution and max-pool; ``"cifar"`` replaces them
            with a 3×3 stride-1 convolution and no max-pool (11,173,962 parameters for 10 classes, 3 channels), the
            usual choice for 32×32 inputs.
    """
    if stem not in STEMS:
        raise ValueError(f"`stem` must be one of {STEMS}, got {stem!r}.")
    model = resnet18(weights=None, num_classes=num_classes)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model
