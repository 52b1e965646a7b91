"""The interface every unlearning method implements, and the sampler that shards data exactly across ranks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Sampler

if TYPE_CHECKING:
    from lightning_unlearn.unlearn.module import UnlearnModule


class ShardSampler(Sampler[int]):
    """Samples ``rank, rank + world, …`` of a dataset (optionally shuffled per epoch with a shared seed).

    Unlike ``DistributedSampler`` it never pads, so a sum over all ranks counts every sample exactly once (what a
    one-step update over the whole forget set needs). With one process it is a plain (shuffled) sampler.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0) -> None:
        self.length, self.rank, self.world_size, self.shuffle, self.seed = length, rank, world_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.length)
        return iter(order[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


class UnlearnMethod:
    """One unlearning method: which data it iterates, what one step does, what it reports.

    The :class:`~lightning_unlearn.unlearn.module.UnlearnModule` runs under manual optimization and delegates to
    these hooks; the method reaches the network (``module.net``), the hard freeze (``module.guard``), the data
    (``module.datamodule``, ``module.loader``) and the profile (``module.profile``) through the module.
    """

    name = "base"
    #: Methods that finish in one update after one pass over their data (the Trainer runs a single epoch).
    one_step = False
    #: Whether parameters outside the selection are frozen (Sharp MinMax trains them with another objective).
    freezes_unselected = True

    def train_dataloader(self, module: UnlearnModule) -> Any:
        raise NotImplementedError

    def configure_optimizers(self, module: UnlearnModule) -> Any:
        """The optimizer over ``module.guard.parameters()``; None for methods that write parameters directly."""
        return module.build_optimizer(module.guard.parameters())

    def training_step(self, module: UnlearnModule, batch: Any, batch_idx: int) -> torch.Tensor | None:
        raise NotImplementedError

    def on_train_epoch_end(self, module: UnlearnModule) -> None:
        """Called after each pass over the data (one-step methods apply their update here)."""

    def report(self) -> dict[str, Any]:
        """Chosen hyper-parameters and method-specific measurements, for ``report.json``."""
        return {"method": self.name}
