"""``SharpnessProfiler``: the per-parameter Hessian diagonal of the training loss, computed right after ``fit``."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.nn.parameter import is_lazy
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_unlearn.curvature import ESTIMATORS, SharpnessProfile, profile_model
from lightning_unlearn.curvature.compute import BatchTransform, OutputTransform, check_batch, check_model
from lightning_unlearn.run import PROFILE_FILENAME

SPLITS = ("train", "val", "forget")


class SharpnessProfiler(Callback):
    r"""Profile the diagonal of the training-loss Hessian at the learned parameters, after training.

    Runs in ``on_train_end`` (the strategy is still set up: model on the Trainer's device), on the unwrapped
    LightningModule in ``eval()`` mode with gradients enabled and inference mode off. Under DDP each rank profiles a
    disjoint shard of the data (no padding) and one all-reduce of the per-parameter sums and the sample count gives
    exactly the single-process result. Global rank zero writes ``sharpness_profile.pt`` into the run directory and logs
    to every logger: a scalar per layer (``sharpness/<layer>``) and, for TensorBoard, a histogram of each layer's
    diagonal and a bar chart of the mean diagonal per layer.

    The profiled function is the LightningModule's ``forward``, passed through ``output_transform`` (default: its
    output is the logits), under the mean cross-entropy loss (``hutchinson``: ``loss_fn``), so it works with any
    classifier module: ``Trainer(callbacks=[SharpnessProfiler()])``.

    Mistakes fail **before training**, not after it: ``setup`` checks the profiling data's source (``split="val"``
    needs a datamodule with a ``val_dataloader``; ``dataloader=`` cannot be sharded under DDP) and decides where the
    profile will be written; ``on_fit_start`` checks that the estimator can profile the architecture (``exact``: the
    modules of :func:`~lightning_unlearn.curvature.check_exact`, in eval mode) and runs the model on one profiling
    batch (``on_train_start`` instead when that batch comes from the Trainer's training loader, which Lightning loads
    only then) to check inputs, logits, targets and loss. That forward pass runs in ``eval()`` mode (modes restored)
    without gradients, and the random number generators (Python, NumPy, torch CPU and CUDA, the loader's own) are
    restored afterwards, so the training run is the same with or without the callback.

    Args:
        estimator: ``"exact"`` (diag of the GGN, equal to the Hessian's for ReLU/pooling/eval-BN/residual networks under
            cross-entropy; refused for other architectures unless ``strict=False``), ``"mc"`` (Monte-Carlo GGN,
            ``num_draws`` sampled labels), ``"hutchinson"`` (any network, ``num_draws`` Rademacher probes per batch) or
            ``"fisher"`` (empirical Fisher at the true labels).
        split: ``"train"`` (default: the training set exactly as trained on, unshuffled and unaugmented), ``"val"``
            or ``"forget"`` (the datamodule's ``forget_dataloader()``: the samples to forget with the labels the model
            was trained on, e.g. a ``PoisonedDataModule``'s poisoned samples). Recorded in ``metadata["split"]``.
        dataloader: Profile this loader instead of a split of the Trainer's datamodule.
        max_samples: Profile only the first ``max_samples`` samples (None: all).
        batch_size: Batch size of the profiling loader (not used when ``dataloader`` is given).
        num_draws: Labels (``mc``) or probes (``hutchinson``) per sample / batch.
        seed: Seed of the random draws (each rank derives its own stream).
        strict: ``exact`` only. ``True``: refuse architectures where the GGN diagonal it computes is not the Hessian
            diagonal (any module other than Linear/Conv, eval-mode BatchNorm and piecewise-linear ones). ``False``:
            warn and compute the GGN diagonal anyway, e.g. for GELU or tanh networks. Parameter-holding layers other
            than Linear/Conv/BatchNorm (LayerNorm, Embedding, ...) are refused whatever ``strict``: use
            ``estimator="hutchinson"`` for them.
        loss_fn: ``hutchinson`` only: ``loss_fn(logits, targets)``, a scalar (mean reduction); default cross-entropy.
            The other estimators compute the curvature of the cross-entropy and refuse a ``loss_fn``.
        batch_transform: Maps a batch of the profiling data to ``(inputs, targets)``; default
            :func:`~lightning_unlearn.curvature.default_batch_transform` (``(x, y, ...)`` or a dict with ``x``/``y``,
            ``image``/``label`` or ``input``/``target`` keys).
        output_transform: Maps the module's ``forward`` output to its logits, a floating tensor of shape ``(batch,
            classes)``, for modules that return more (``lambda out: out[0]`` for ``(logits, features)``); default:
            the output as is.
        dirpath: Folder for the profile file; default: the Trainer's ``log_dir`` (the run directory).
        filename: Name of the profile file.
        log_histograms: Log a TensorBoard histogram of each layer's diagonal.
        log_figure: Log a TensorBoard bar chart of the mean diagonal per layer.
        progress: Show a progress bar (rank zero only, and never when the Trainer has ``enable_progress_bar=False``).

    Attributes:
        profile: The :class:`~lightning_unlearn.curvature.SharpnessProfile` of the last fit (``None`` before).
        path: Where the profile is written: decided in ``setup`` (so that every checkpoint of the run carries it, see
            :meth:`state_dict`), the file exists once ``profile`` is set; ``None`` when nothing is written
            (``fast_dev_run``).
        seconds: Wall-clock seconds the profiling took (``None`` before).

    Raises:
        MisconfigurationException: For invalid arguments (at construction) and for a data source, architecture,
            model output, targets or loss that the profiling would fail on (in ``setup``, ``on_fit_start`` or
            ``on_train_start``, before the first training step), naming the option that fixes it.
    """

    def __init__(
        self,
        estimator: str = "exact",
        split: str = "train",
        dataloader: DataLoader | None = None,
        max_samples: int | None = None,
        batch_size: int = 256,
        num_draws: int = 1,
        seed: int = 0,
        strict: bool = True,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        batch_transform: BatchTransform | None = None,
        output_transform: OutputTransform | None = None,
        dirpath: str | None = None,
        filename: str = PROFILE_FILENAME,
        log_histograms: bool = True,
        log_figure: bool = True,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise MisconfigurationException(f"`estimator` must be one of {tuple(ESTIMATORS)}, got {estimator!r}.")
        if split not in SPLITS:
            raise MisconfigurationException(f"`split` must be one of {SPLITS}, got {split!r}.")
        if max_samples is not None and max_samples < 1:
            raise MisconfigurationException(f"`max_samples` must be >= 1 or None, got {max_samples}.")
        if batch_size < 1 or num_draws < 1:
            raise MisconfigurationException(
                f"`batch_size` and `num_draws` must be >= 1, got {batch_size} and {num_draws}."
            )
        for name, fn in (
            ("loss_fn", loss_fn),
            ("batch_transform", batch_transform),
            ("output_transform", output_transform),
        ):
            if fn is not None and not callable(fn):
                raise MisconfigurationException(f"`{name}` must be callable or None, got {type(fn).__name__}.")
        if loss_fn is not None and estimator != "hutchinson":
            raise MisconfigurationException(
                f"`loss_fn` is used by estimator='hutchinson' only; {estimator!r} computes the curvature of the "
                "cross-entropy of the logits (select them with `output_transform=`). Pass estimator='hutchinson' "
                "with your `loss_fn`, or no `loss_fn`."
            )
        self.estimator = estimator
        self.split = split
        self.dataloader = dataloader
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.num_draws = num_draws
        self.seed = seed
        self.strict = strict
        self.loss_fn = loss_fn
        self.batch_transform = batch_transform
        self.output_transform = output_transform
        self.dirpath = dirpath
        self.filename = filename
        self.log_histograms = log_histograms
        self.log_figure = log_figure
        self.progress = progress
        self.profile: SharpnessProfile | None = None
        self.path: Path | None = None
        self.seconds: float | None = None
        self._batch_checked = False

    # ------------------------------------------------------------------------------------------------------ checks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_data_source(trainer)
        self._batch_checked = False
        folder = self.dirpath or trainer.log_dir  # on every rank: under DDP `log_dir` is a broadcast
        self.path = None if folder is None or trainer.fast_dev_run else Path(folder) / self.filename

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        try:
            check_model(pl_module, self.estimator, strict=self.strict)
        except ValueError as err:
            raise MisconfigurationException(f"SharpnessProfiler(estimator={self.estimator!r}): {err}") from err
        if self.dataloader is not None or self.split != "train" or self._datamodule_train_dataset(trainer):
            self._check_batch(trainer, pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._batch_checked:  # the batch comes from the training loader, which Lightning has just loaded
            self._check_batch(trainer, pl_module)

    def _check_data_source(self, trainer: Trainer) -> None:
        if self.dataloader is not None:
            if trainer.world_size > 1:
                raise MisconfigurationException(
                    "SharpnessProfiler(dataloader=...) cannot be sharded across ranks; use `split=` under DDP."
                )
            return
        datamodule = trainer.datamodule
        if self.split == "forget" and not callable(getattr(datamodule, "forget_dataloader", None)):
            raise MisconfigurationException(
                "SharpnessProfiler(split='forget') profiles the datamodule's `forget_dataloader`, but the Trainer's "
                "datamodule has none; pass `dataloader=` (your forget set with its trained-on labels)."
            )
        if self.split == "val" and (datamodule is None or not is_overridden("val_dataloader", datamodule)):
            where = "no datamodule" if datamodule is None else f"the datamodule {type(datamodule).__name__}"
            raise MisconfigurationException(
                f"SharpnessProfiler(split='val') profiles the datamodule's `val_dataloader`, but the Trainer has "
                f"{where}{'' if datamodule is None else ' without one'}; pass `dataloader=` (your validation loader) "
                "or `split='train'`."
            )

    @staticmethod
    def _datamodule_train_dataset(trainer: Trainer) -> bool:
        return trainer.datamodule is not None and hasattr(trainer.datamodule, "train_dataset")

    def _check_batch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """One forward pass on this rank's first profiling batch (see the class docstring); training is unaffected."""
        self._batch_checked = True
        if any(is_lazy(p) for p in pl_module.parameters()):  # a forward pass would initialise them, out of turn
            return
        with _preserved_rng():
            loader = self._loader(trainer)
            with _preserved_generators(loader):
                batches = iter(loader)  # a DataLoader draws a seed here, even unshuffled
                one_shot = batches is loader  # an iterator, not an iterable: checking would consume a batch
                batch = None if one_shot else next(batches, None)
                del batches  # no worker processes kept alive
            if batch is None:
                if trainer.world_size == 1 and not one_shot:
                    raise MisconfigurationException("SharpnessProfiler: the profiling data is empty.")
                return
            try:
                check_batch(
                    pl_module,
                    batch,
                    self.estimator,
                    batch_transform=self.batch_transform,
                    output_transform=self.output_transform,
                    loss_fn=self.loss_fn,
                    device=pl_module.device,
                )
            except ValueError as err:
                raise MisconfigurationException(f"SharpnessProfiler(estimator={self.estimator!r}): {err}") from err

    # ------------------------------------------------------------------------------------------------------- data
    def _dataset(self, trainer: Trainer) -> Dataset:
        datamodule = trainer.datamodule
        if self.split == "train":
            if datamodule is not None and hasattr(datamodule, "train_dataset"):
                return datamodule.train_dataset()
            loader = trainer.train_dataloader
            if loader is None:
                raise MisconfigurationException("SharpnessProfiler found no training data: pass `dataloader=`.")
            if _may_augment(loader.dataset):
                rank_zero_warn(
                    "SharpnessProfiler profiles the dataset of the training loader in order; the random augmentation "
                    "inside that dataset (its `transform`) still applies. Pass `dataloader=` for full control."
                )
            return loader.dataset
        return getattr(datamodule, f"{self.split}_dataloader")().dataset

    def _loader(self, trainer: Trainer) -> DataLoader:
        """This rank's share of the profiling data: samples ``rank, rank + world, ...`` of the first ``max_samples``."""
        if self.dataloader is not None:
            return self.dataloader
        dataset = self._dataset(trainer)
        total = len(dataset) if self.max_samples is None else min(self.max_samples, len(dataset))
        indices = list(range(trainer.global_rank, total, trainer.world_size))
        return DataLoader(Subset(dataset, indices), batch_size=self.batch_size, shuffle=False)

    # ---------------------------------------------------------------------------------------------------- compute
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        start = time.perf_counter()
        loader = self._loader(trainer)
        max_samples = self.max_samples if self.dataloader is not None else None
        self.profile = profile_model(
            pl_module,
            loader,
            self.estimator,
            dataset=getattr(trainer.datamodule, "dataset", None),
            reduce=lambda t: trainer.strategy.reduce(t, reduce_op="sum"),
            world_size=trainer.world_size,
            max_samples=max_samples,
            device=pl_module.device,
            progress=self.progress and trainer.is_global_zero and trainer.progress_bar_callback is not None,
            seed=self.seed,
            rank=trainer.global_rank,
            num_draws=self.num_draws,
            strict=self.strict,
            loss_fn=self.loss_fn,
            batch_transform=self.batch_transform,
            output_transform=self.output_transform,
        )
        self.profile.metadata.update(split=self.split, num_draws=self.num_draws, module=type(pl_module).__name__)
        total = self.profile.num_samples
        self.seconds = time.perf_counter() - start
        self.profile.metadata["seconds"] = self.seconds
        if trainer.is_global_zero:
            self._save()
            self._log(trainer)
            rank_zero_info(
                f"SharpnessProfiler: {self.estimator} diagonal of {total} samples in {self.seconds:.1f}s"
                + (f", saved to {self.path}" if self.path else "")
            )
        trainer.strategy.barrier("sharpness_profiler")

    # ------------------------------------------------------------------------------------------------ reporting
    def _save(self) -> None:
        if self.path is not None:
            self.path = self.profile.save(self.path)

    def _log(self, trainer: Trainer) -> None:
        stats = self.profile.layer_stats()
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics({f"sharpness/{s.name}": s.mean for s in stats}, step=step)
            experiment = getattr(logger, "experiment", None)
            if experiment is None or not hasattr(experiment, "add_histogram"):
                continue
            if self.log_histograms:
                for s in stats:
                    values = torch.cat([self.profile.diagonals[p].flatten() for p in self.profile.layers[s.name]])
                    experiment.add_histogram(f"sharpness_hist/{s.name}", values, step)
            if self.log_figure:
                experiment.add_figure("sharpness/mean_diagonal_per_layer", layer_figure(self.profile), step)
            experiment.flush()

    # ----------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """What checkpoints keep of the callback: ``estimator``, ``num_samples`` (``None`` until profiled) and ``path``,
        where this run's profile is (or, in checkpoints saved during training, will be) written (``None``: nowhere)."""
        return {
            "estimator": self.estimator,
            "num_samples": None if self.profile is None else self.profile.num_samples,
            "path": None if self.path is None else str(self.path),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``path`` unless ``setup`` already decided this run's (a resumed fit writes its own profile)."""
        path = state_dict.get("path")
        if self.path is None and path:
            self.path = Path(path)


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Run the block, then put back the global random states it may draw from: Python's, NumPy's, torch's CPU and
    CUDA generators (iterating a ``DataLoader`` draws a seed even unshuffled; a ``forward`` may draw too)."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _preserved_generators(loader: Any) -> Iterator[None]:
    """Run the block, then put back the states of the loader's own generator and its sampler's (if any)."""
    owners = (loader, getattr(loader, "sampler", None))
    generators = [g for g in (getattr(o, "generator", None) for o in owners) if isinstance(g, torch.Generator)]
    states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)


def layer_figure(profile: SharpnessProfile) -> Any:
    """A bar chart (matplotlib figure) of the mean Hessian diagonal per layer, log scale."""
    from lightning_unlearn.evaluation.figures import pyplot

    plt = pyplot()

    stats = profile.layer_stats()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(stats) + 2), 3.5))
    means = [max(s.mean, 1e-30) for s in stats]
    ax.bar(range(len(stats)), means, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xticks(range(len(stats)), [s.name for s in stats], rotation=90, fontsize=7)
    ax.set_ylabel("mean diag(H)")
    ax.set_title(f"{profile.estimator} Hessian diagonal, {profile.num_samples} samples")
    fig.tight_layout()
    return fig


def _may_augment(dataset: Any) -> bool:
    """Whether a dataset (or one it wraps: ``Subset``, ``ConcatDataset``) carries a transform that may be random
    (torchvision's ``transform`` / ``transforms``, an ``augment`` flag); a plain ``TensorDataset`` or list does not."""
    if any(getattr(dataset, name, None) for name in ("transform", "transforms", "augment")):
        return True
    inner = getattr(dataset, "dataset", None)
    parts = getattr(dataset, "datasets", None) or ([inner] if inner is not None else [])
    return any(_may_augment(part) for part in parts)
