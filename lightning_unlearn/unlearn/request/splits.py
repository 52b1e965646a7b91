"""What an unlearning request can measure on any split of its data: gradients, curvature profiles, importances.

:class:`SplitStatistics` is mixed into :class:`~lightning_unlearn.unlearn.UnlearnModule`. Data-aware selections
(:class:`~lightning_unlearn.selection.Saliency`, :class:`~lightning_unlearn.selection.FisherRatio`) and the
:class:`~lightning_unlearn.unlearn.methods.ssd.SSD` method read what they need through it. The splits are

* ``"forget"``: the samples to forget with the labels the model was trained on (``forget_dataloader()``'s dataset);
* ``"retain"``: the training samples to keep;
* ``"train"``: the training set as trained on (``train_dataset()``: D_r followed by D_f unless the data says otherwise).

Every statistic is computed at the model's current weights (before the update, when a selection asks), kept in memory
keyed by what defines it (:attr:`SplitStatistics.split_cache`), and served from there when asked again, so a selection
and a method that need the same importances compute them once. Under DDP each rank computes on its shard and one
all-reduce of sums (and counts) gives exactly the single-process result; every rank then holds the same values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_unlearn.curvature import SharpnessProfile
from lightning_unlearn.curvature.compute import eval_mode
from lightning_unlearn.curvature.precision import no_autocast
from lightning_unlearn.unlearn.adapters.source import profile_split

__all__ = ["SPLITS", "SplitStatistics", "requiring_grad"]

#: The splits a request can measure statistics on.
SPLITS = ("forget", "retain", "train")


@contextlib.contextmanager
def requiring_grad(params: list[nn.Parameter]) -> Iterator[None]:
    """Every parameter requires gradients within the block (a hard freeze or the user's own frozen parameters would
    otherwise leave them out); the flags are restored afterwards."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


class SplitStatistics:
    """Statistics of the model on a split of its data (a mixin of ``UnlearnModule``; see the module docstring)."""

    # provided by UnlearnModule
    net: nn.Module
    datamodule: Any
    estimator: str

    @property
    def split_cache(self) -> dict[tuple, Any]:
        """The statistics computed so far, keyed by ``(kind, split, setting)``."""
        return self.__dict__.setdefault("_split_cache", {})

    @property
    def split_computations(self) -> dict[tuple, int]:
        """How many times each statistic of :attr:`split_cache` was computed (1 each: never twice)."""
        return self.__dict__.setdefault("_split_computations", {})

    def _cached(self, key: tuple, compute: Any) -> Any:
        if key not in self.split_cache:
            self.split_cache[key] = compute()
            self.split_computations[key] = self.split_computations.get(key, 0) + 1
        return self.split_cache[key]

    def split_dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` (one of :data:`SPLITS`), items ``(inputs, label, ...)``; labels as trained on."""
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
        self.datamodule.setup("fit")
        if split == "train":
            return self.datamodule.train_dataset()
        return getattr(self.datamodule, f"{split}_dataloader")().dataset

    @contextlib.contextmanager
    def computing_on(self, device: torch.device | str | None) -> Iterator[None]:
        """Within the block the module is on ``device`` (None: where it is), then back where it was."""
        home = self.device  # type: ignore[attr-defined]
        self.to(device or home)  # type: ignore[attr-defined]
        try:
            yield
        finally:
            self.to(home)  # type: ignore[attr-defined]

    def _rank_world(self) -> tuple[int, int]:
        distributed = self._distributed  # type: ignore[attr-defined]
        return (self.trainer.global_rank, self.trainer.world_size) if distributed else (0, 1)  # type: ignore[attr-defined]

    def _profile_of(self, dataset: Dataset, estimator: str, max_samples: int | None, split: str) -> SharpnessProfile:
        """The profile of ``dataset`` (this rank's shard, all-reduced under DDP), computed where the module is."""
        rank, world = self._rank_world()
        strategy = self.trainer.strategy if world > 1 else None  # type: ignore[attr-defined]
        reduce = (lambda t: strategy.reduce(t, reduce_op="sum")) if strategy is not None else None
        name = getattr(self.datamodule, "dataset", None)
        return profile_split(
            self.names_root, self.source.output_transform, dataset, estimator, max_samples,  # type: ignore[attr-defined]
            split=split, dataset_name=name, rank=rank, world_size=world, reduce=reduce, device=self.device,  # type: ignore[attr-defined]
        )  # fmt: skip

    def split_profile(self, split: str, estimator: str | None = None) -> SharpnessProfile:
        """The curvature profile (mean-loss Hessian-diagonal estimate, ``estimator``; default the module's) of every
        sample of ``split``, its split in ``metadata["split"]``. ``"train"`` with the module's own estimator is the
        module's profile when that covers the whole training set."""
        estimator = estimator or self.estimator
        if split == "train":
            profile = getattr(self, "profile", None)
            if profile is not None and profile.estimator == estimator:
                if profile.num_samples == len(self.split_dataset("train")):
                    return profile
        dataset = self.split_dataset(split)
        return self._cached(("profile", split, estimator), lambda: self._profile_of(dataset, estimator, None, split))

    def split_gradient(self, split: str) -> dict[str, torch.Tensor]:
        """``∇_θ (1/n) Σ_{i∈split} ℓ(x_i, y_i)``: the gradient of the mean cross-entropy over ``split`` at the labels
        the model was trained on, for every parameter (by the profile's names; zero for parameters the loss does not
        reach), in at least float32, the model in ``eval()`` mode without autocast."""
        return self._cached(("gradient", split), lambda: self._split_gradient(split))

    def _split_gradient(self, split: str) -> dict[str, torch.Tensor]:
        named = self.net_named_parameters()  # type: ignore[attr-defined]
        params = [p for _, p in named]
        sums = {n: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for n, p in named}
        count = torch.zeros((), dtype=torch.float64, device=self.device)  # type: ignore[attr-defined]
        for batch in self.loader(self.split_dataset(split)):  # type: ignore[attr-defined]
            x, y, weight = (t.to(self.device) for t in (batch[0], batch[1], batch[-1]))  # type: ignore[attr-defined]
            with self._grad_block(params):
                losses = F.cross_entropy(self.net(x), y, reduction="none")
                grads = torch.autograd.grad((weight.to(losses.dtype) * losses).sum(), params, allow_unused=True)
            for (name, _), grad in zip(named, grads, strict=True):
                if grad is not None:
                    sums[name] += grad.detach().to(sums[name].dtype)
            count += weight.sum()
        sums = self.all_reduce_sum(sums)  # type: ignore[attr-defined]
        total = float(self.all_reduce_sum({"n": count})["n"])  # type: ignore[attr-defined]
        return {name: s / total for name, s in sums.items()}

    def split_class_counts(self, split: str, num_classes: int) -> torch.Tensor:
        """How many samples of ``split`` carry each label ``0 … num_classes − 1`` (the labels the model was trained
        on; larger labels are not counted): float64 on the CPU, summed over the ranks' shards under DDP."""
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"`num_classes` must be an integer >= 1, got {num_classes!r}.")
        return self._cached(("class_counts", split, int(num_classes)), lambda: self._class_counts(split, num_classes))

    def _class_counts(self, split: str, num_classes: int) -> torch.Tensor:
        # counted on the CPU, where the loader's labels are (a weighted bincount on CUDA has no deterministic
        # kernel: it raises under `deterministic: true`); only the all-reduce sees the device (NCCL needs it there)
        counts = torch.zeros(int(num_classes), dtype=torch.float64)
        for batch in self.loader(self.split_dataset(split)):  # type: ignore[attr-defined]
            y, weight = batch[1].cpu().long(), batch[-1].cpu().double()
            keep = y < num_classes
            counts += torch.bincount(y[keep], weights=weight[keep], minlength=int(num_classes))
        reduced = self.all_reduce_sum({"counts": counts.to(self.device)})  # type: ignore[attr-defined]
        return reduced["counts"].cpu()

    @contextlib.contextmanager
    def _grad_block(self, params: list[nn.Parameter]) -> Iterator[None]:
        """Gradients on, inference mode and autocast off, the network in ``eval()``, every parameter requiring grad."""
        device_type = self.device.type  # type: ignore[attr-defined]
        with torch.inference_mode(False), torch.enable_grad(), no_autocast(device_type), eval_mode(self.net):
            with requiring_grad(params):
                yield

    def batch_importance(self, split: str, batch_size: int = 128) -> dict[str, torch.Tensor]:
        """SSD's importance (if-loops/selective-synaptic-dampening, ``src/ssd.py``, ``calc_importance``): the squared
        gradient of each batch's mean cross-entropy, averaged over the batches of ``split`` in order (consecutive
        samples, ``batch_size`` each, the last one possibly smaller), at the labels the model was trained on.

        Under DDP rank ``r`` takes batches ``r, r + world, …`` of the same batches as one process; the sums of squares
        are all-reduced, so the result is the single-process one.
        """
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
        return self._cached(
            ("batch_importance", split, int(batch_size)), lambda: self._batch_importance(split, batch_size)
        )

    def _batch_importance(self, split: str, batch_size: int) -> dict[str, torch.Tensor]:
        dataset = self.split_dataset(split)
        rank, world = self._rank_world()
        n = len(dataset)  # type: ignore[arg-type]
        batches = [list(range(b * batch_size, min(n, (b + 1) * batch_size))) for b in range(-(-n // batch_size))]
        named = self.net_named_parameters()  # type: ignore[attr-defined]
        params = [p for _, p in named]
        sums = {n: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for n, p in named}
        mine = batches[rank::world]
        loader = DataLoader(dataset, batch_sampler=mine, num_workers=self.hparams.num_workers) if mine else []  # type: ignore[attr-defined]
        for batch in loader:
            x, y = batch[0].to(self.device), batch[1].to(self.device)  # type: ignore[attr-defined]
            with self._grad_block(params):
                grads = torch.autograd.grad(F.cross_entropy(self.net(x), y), params, allow_unused=True)
            for (name, _), grad in zip(named, grads, strict=True):
                if grad is not None:
                    sums[name] += grad.detach().to(sums[name].dtype) ** 2
        sums = self.all_reduce_sum(sums)  # type: ignore[attr-defined]
        return {name: s / len(batches) for name, s in sums.items()}
