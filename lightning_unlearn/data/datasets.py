"""The datasets the data module hands out: normalised image tensors served by index, and the forget pairs."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from lightning_unlearn.data.sources import Split


def normalize(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], pad_to: int | None = None
) -> torch.Tensor:
    """``uint8`` images as float32, scaled to [0, 1] and standardised per channel; with ``pad_to``, zero-padded
    (black) around the centre to ``pad_to`` × ``pad_to`` first (28×28 MNIST → 32×32, as for LeNet)."""
    if isinstance(images, Split):
        images = images.images
    if pad_to is not None:
        height, width = images.shape[-2:]
        if pad_to < max(height, width):
            raise ValueError(f"`pad_to`={pad_to} is smaller than the {height}×{width} images.")
        top, left = (pad_to - height) // 2, (pad_to - width) // 2
        padding = (left, pad_to - width - left, top, pad_to - height - top)
        images = torch.nn.functional.pad(images, padding)
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float().div_(255) - mean_t) / std_t


class ImageDataset(Dataset):
    """Samples of one split; items are ``(image, label, index)``.

    ``index`` is the sample's position in its split, so forget and retain subsets stay exact however they are batched.

    Args:
        images: Normalised float images of the whole split (N×C×H×W), shared, never copied.
        labels: Labels of the whole split (clean or poisoned), indexed like ``images``.
        positions: Which samples of the split this dataset serves (default: all), in this order.
        augment: Random crop (padding 4) and horizontal flip, for CIFAR-style training.
        channels: Repeat single-channel images to this many channels on the fly (a view: no copy is stored).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        positions: torch.Tensor | None = None,
        augment: bool = False,
        channels: int | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.positions = torch.arange(len(labels)) if positions is None else torch.as_tensor(positions).long()
        self.augment = augment
        self.channels = channels

    def __len__(self) -> int:
        return len(self.positions)

    def image(self, index: torch.Tensor) -> torch.Tensor:
        image = self.images[index]
        if self.augment:
            image = _random_crop_flip(image)
        if self.channels is not None and image.shape[0] != self.channels:
            image = image.expand(self.channels, *image.shape[1:])
        return image

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = self.positions[item]
        return self.image(index), self.labels[index], index


class ForgetPairDataset(ImageDataset):
    """The forget set with both labels: items are ``(image, poisoned_label, true_label, index)``."""

    def __init__(
        self,
        images: torch.Tensor,
        poisoned: torch.Tensor,
        true: torch.Tensor,
        positions: torch.Tensor,
        channels: int | None = None,
    ) -> None:
        super().__init__(images, poisoned, positions, channels=channels)
        self.true = true

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        index = self.positions[item]
        return self.image(index), self.labels[index], self.true[index], index


def _random_crop_flip(image: torch.Tensor, padding: int = 4) -> torch.Tensor:
    h, w = image.shape[-2:]
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
    image = padded[:, top : top + h, left : left + w]
    return image.flip(-1) if torch.rand(()) < 0.5 else image
