"""The small MNIST CNN of the seed paper (28,938 parameters, 4 weight layers)."""

from __future__ import annotations

import torch
from torch import nn


class MnistCNN(nn.Module):
    """Two convolutions and two linear layers, ReLU and max-pooling only.

    For 1×28×28 inputs and 10 classes this has exactly 28,938 parameters, the size the seed paper reports. Every
    operation is piecewise linear, so the Hessian diagonal of the cross-entropy loss equals the GGN diagonal (see
    ``lightning_unlearn.curvature``).

    Args:
        num_classes: Number of output classes.
        in_channels: Channels of the input images.
        image_size: Height (= width) of the square input images.
        hidden: Width of the hidden linear layer.
        batch_norm: Add BatchNorm after each convolution (+48 parameters); in eval mode the Hessian diagonal still
            equals the GGN's.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: int = 96,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2, got {num_classes}.")
        self.conv1 = nn.Conv2d(in_channels, 8, kernel_size=3)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=5)
        self.bn1 = nn.BatchNorm2d(8) if batch_norm else nn.Identity()
        self.bn2 = nn.BatchNorm2d(16) if batch_norm else nn.Identity()
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        side = ((image_size - 2) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"`image_size` must be at least 14 for this CNN, got {image_size}.")
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.relu(self.fc1(self.flatten(x)))
        return self.fc2(x)
