"""The interface every unlearning method implements, and the sampler that shards data exactly across ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler


class ShardSampler(Sampler[int]):
    """Samples ``rank, rank + world, …`` of a dataset (optionally shuffled per epoch with a shared seed), padded so
    that every rank gets exactly ``ceil(length / world_size)`` indices.

    Every rank must run the same number of steps under DDP (each backward, and each forward of a model with buffers,
    is a collective), so the shards are padded like ``DistributedSampler``'s. Unlike there, a padding index is
    ``length + i`` (a repeat of sample ``i``): :class:`Weighted` turns it into sample ``i`` with weight 0, so sums
    over all ranks still count every sample exactly once (what a one-step update over the whole forget set needs).
    With one process it is a plain (shuffled) sampler over ``range(length)``.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0) -> None:
        if length < 1:
            raise ValueError(f"ShardSampler: the dataset is empty (`length` = {length}).")
        self.length, self.rank, self.world_size, self.shuffle, self.seed = length, rank, world_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.length)
        padding = len(self) * self.world_size - self.length
        repeats = order.repeat(-(-padding // self.length))[:padding]  # fewer samples than ranks: repeat them
        order = torch.cat([order, self.length + repeats])
        return iter(order[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return -(-self.length // self.world_size)


class Weighted(Dataset):
    """``dataset`` with a weight appended to each item: index ``i < len`` → ``(*dataset[i], 1.0)``; a padding index
    ``len + i`` from :class:`ShardSampler` → ``(*dataset[i], 0.0)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.length = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index % self.length]
        # a float32 tensor (a Python float would collate to float64, which some devices, e.g. MPS, do not have)
        return (*item, torch.tensor(1.0 if index < self.length else 0.0))


def weighted_mean(
    values: torch.Tensor, weight: torch.Tensor, count: torch.Tensor | float | None = None
) -> torch.Tensor:
    """``Σ w·v / count`` with ``count = Σ w`` by default (a batch of padding only gives 0)."""
    weight = weight.to(values.dtype)
    count = weight.sum() if count is None else torch.as_tensor(count, dtype=values.dtype, device=values.device)
    return (weight * values).sum() / count.clamp_min(torch.finfo(values.dtype).tiny)


def check_trainer(trainer: Any) -> None:
    """Refuse the strategies and precisions an unlearning fit cannot honour (called in ``UnlearnModule.setup``)."""
    strategy = trainer.strategy
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(strategy, DeepSpeedStrategy):
        raise MisconfigurationException(
            f"UnlearnModule does not support `strategy={type(strategy).__name__}`: use a single device or DDP "
            "(`strategy='ddp'`, 'ddp_spawn', 'ddp_fork'). Sharded strategies (FSDP, DeepSpeed) would split the "
            "parameters the hard freeze and the one-step update address."
        )
    precision = str(getattr(trainer, "precision", "32-true"))
    if precision in ("16-true", "bf16-true", "64-true"):
        raise MisconfigurationException(
            f"UnlearnModule does not support `precision={precision!r}`: it would convert the trained network's "
            "weights, so the hard freeze could not keep them bit-identical and the validation and evaluation "
            "passes would feed them inputs of another dtype. Use precision='16-mixed' or 'bf16-mixed' (autocast; "
            "one-step gradients are computed in float32 anyway) or the default '32-true'."
        )


@runtime_checkable
class UnlearnContext(Protocol):
    """What an unlearning method may use of the module that runs it (:class:`~lightning_unlearn.unlearn.UnlearnModule`
    implements it): the network and the hard freeze, the data, the profile, a few distributed helpers, validation,
    and the manual-optimization API of a ``LightningModule``. A method touches nothing else, so a method can be tested
    with any object that provides these.
    """

    #: The network being unlearned (its parameter names are those of masks, profiles and reports).
    net: nn.Module
    #: The hard freeze (:class:`~lightning_unlearn.unlearn.request.freeze.FreezeGuard`): ``trainable`` parameters by
    #: name, ``mask_update``, ``zero_frozen_grads``, ``restore``.
    guard: Any
    #: The selection's :class:`~lightning_unlearn.selection.ParameterMask` (a method may replace it with the one it
    #: chose, e.g. under a ``Validated`` selection), the names of its trainable parameters, the strategy.
    mask: Any
    selected_names: set[str]
    selection: Any
    #: The data (forget pairs, retain, validation and training loaders) and the (training-set) curvature profile.
    datamodule: Any
    profile: Any

    @property
    def device(self) -> torch.device: ...

    @property
    def world_size(self) -> int: ...

    @property
    def attached_trainer(self) -> Any:
        """The Trainer running the module, or None outside a fit."""

    @property
    def global_step(self) -> int: ...

    @property
    def num_train_samples(self) -> int: ...

    def loader(self, dataset: Dataset, shuffle: bool = False, batch_size: int | None = None) -> DataLoader: ...

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer: ...

    def all_reduce_sum(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def require_profile(self, device: torch.device | str | None = None) -> Any: ...

    # statistics of a split ("forget", "retain", "train"; see lightning_unlearn.unlearn.request.splits), computed
    # once each, sharded and all-reduced under DDP: data-aware selections (select_for) and SSD read them
    def net_named_parameters(self) -> list[tuple[str, nn.Parameter]]: ...

    def split_dataset(self, split: str) -> Dataset: ...

    def split_profile(self, split: str, estimator: str | None = None) -> Any: ...

    def split_gradient(self, split: str) -> dict[str, torch.Tensor]: ...

    def batch_importance(self, split: str, batch_size: int = 128) -> dict[str, torch.Tensor]: ...

    def split_class_counts(self, split: str, num_classes: int) -> torch.Tensor: ...

    def validate(self, class_weights: torch.Tensor | None = None, split: str = "val") -> tuple[float, float]: ...

    #: The request's forgetting target (:class:`~lightning_unlearn.unlearn.request.target.ForgettingTarget`) and the
    #: model's reading of it with its per-sample parts (what the ``"target"`` criterion scores).
    forgetting_target: Any

    def read_target(self) -> tuple[Any, dict[str, torch.Tensor]]: ...

    def validation_cache(self, trainable: list[nn.Parameter] | None = None) -> contextlib.AbstractContextManager: ...

    def training_hvp(self, names: list[str], num_samples: int, scale: float = 1.0) -> Any: ...

    def optimizers(self, use_pl_optimizer: bool = True) -> Any: ...

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None: ...

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None: ...

    def log_dict(self, dictionary: Any, *args: Any, **kwargs: Any) -> None: ...


class UnlearnMethod:
    """One unlearning method: which data it iterates, what one step does, what it reports.

    The :class:`~lightning_unlearn.unlearn.module.UnlearnModule` runs under manual optimization and delegates to
    these hooks. Batches from ``module.loader`` end with a per-sample weight (0 for padding, see
    :class:`ShardSampler`) that losses must apply. The method reaches the network (``module.net``), the hard freeze
    (``module.guard``), the data (``module.datamodule``, ``module.loader``) and the profile (``module.profile``)
    through the module.
    """

    name = "base"
    #: Methods that finish in one update after one pass over their data (the Trainer runs a single epoch).
    one_step = False
    #: Whether parameters outside the selection are frozen (Sharp MinMax trains them with another objective).
    freezes_unselected = True
    #: Whether the method needs the forget samples' corrected labels (it replaces their labels, not only ascends).
    needs_corrected_labels = False
    #: Whether the method reads the profile's curvature values (the second order's preconditioner).
    needs_curvature = False

    def default_selection(self) -> Any:
        """The selection of a request that names none: the paper's flattest layer
        (:class:`~lightning_unlearn.selection.SmallestLayer`); ``Auto`` chooses among its own candidates."""
        from lightning_unlearn.selection import SmallestLayer

        return SmallestLayer()

    def train_dataloader(self, module: UnlearnContext) -> Any:
        raise NotImplementedError

    def configure_optimizers(self, module: UnlearnContext) -> Any:
        """The optimizer over ``module.guard.parameters()``; None for methods that write parameters directly."""
        return module.build_optimizer(module.guard.parameters())

    def training_step(self, module: UnlearnContext, batch: Any, batch_idx: int) -> torch.Tensor | None:
        raise NotImplementedError

    def on_train_epoch_end(self, module: UnlearnContext) -> None:
        """Called after each pass over the data (one-step methods apply their update here)."""

    def report(self) -> dict[str, Any]:
        """Chosen hyper-parameters and method-specific measurements, for ``report.json``."""
        return {"method": self.name}

    def state_dict(self) -> dict[str, Any]:
        """What a fit measured or chose (plain Python values); travels back from spawned ranks with the weights."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
