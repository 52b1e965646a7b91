"""``SharpnessProfiler``: the per-parameter Hessian diagonal of the training loss, computed right after ``fit``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_unlearn.curvature import ESTIMATORS, SharpnessProfile, profile_model
from lightning_unlearn.run import PROFILE_FILENAME

SPLITS = ("train", "val")


class SharpnessProfiler(Callback):
    r"""Profile the diagonal of the training-loss Hessian at the learned parameters, after training.

    Runs in ``on_train_end`` (the strategy is still set up: model on the Trainer's device), on the unwrapped
    LightningModule in ``eval()`` mode with gradients enabled and inference mode off. Under DDP each rank profiles a
    disjoint shard of the data (no padding) and one all-reduce of the per-parameter sums and the sample count gives
    exactly the single-process result. Global rank zero writes ``sharpness_profile.pt`` into the run directory and logs
    to every logger: a scalar per layer (``sharpness/<layer>``) and, for TensorBoard, a histogram of each layer's
    diagonal and a bar chart of the mean diagonal per layer.

    The profiled function is the LightningModule's ``forward`` (logits) under the mean cross-entropy loss, so it works
    with any classifier module: ``Trainer(callbacks=[SharpnessProfiler()])``.

    Args:
        estimator: ``"exact"`` (diag of the GGN, equal to the Hessian's for ReLU/pooling/eval-BN/residual networks under
            cross-entropy; refused for other architectures unless ``strict=False``), ``"mc"`` (Monte-Carlo GGN,
            ``num_draws`` sampled labels), ``"hutchinson"`` (any network, ``num_draws`` Rademacher probes per batch) or
            ``"fisher"`` (empirical Fisher at the true labels).
        split: ``"train"`` (default: the training set exactly as trained on, unshuffled and unaugmented) or ``"val"``.
        dataloader: Profile this loader instead of a split of the Trainer's datamodule.
        max_samples: Profile only the first ``max_samples`` samples (None: all).
        batch_size: Batch size of the profiling loader (not used when ``dataloader`` is given).
        num_draws: Labels (``mc``) or probes (``hutchinson``) per sample / batch.
        seed: Seed of the random draws (each rank derives its own stream).
        strict: Refuse ``exact`` where it would not equal the Hessian diagonal.
        dirpath: Folder for the profile file; default: the Trainer's ``log_dir`` (the run directory).
        filename: Name of the profile file.
        log_histograms: Log a TensorBoard histogram of each layer's diagonal.
        log_figure: Log a TensorBoard bar chart of the mean diagonal per layer.
        progress: Show a progress bar (rank zero only).
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
        self.estimator = estimator
        self.split = split
        self.dataloader = dataloader
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.num_draws = num_draws
        self.seed = seed
        self.strict = strict
        self.dirpath = dirpath
        self.filename = filename
        self.log_histograms = log_histograms
        self.log_figure = log_figure
        self.progress = progress
        self.profile: SharpnessProfile | None = None
        self.path: Path | None = None
        self.seconds: float | None = None

    # ------------------------------------------------------------------------------------------------------- data
    def _dataset(self, trainer: Trainer) -> Dataset:
        datamodule = trainer.datamodule
        if self.split == "train":
            if datamodule is not None and hasattr(datamodule, "train_dataset"):
                return datamodule.train_dataset()
            loader = trainer.train_dataloader
            if loader is None:
                raise MisconfigurationException("SharpnessProfiler found no training data: pass `dataloader=`.")
            rank_zero_warn(
                "SharpnessProfiler profiles the dataset of the training loader in order; any random augmentation "
                "inside that dataset still applies. Pass `dataloader=` for full control."
            )
            return loader.dataset
        if datamodule is None:
            raise MisconfigurationException("`split='val'` needs a datamodule; pass `dataloader=` instead.")
        return datamodule.val_dataloader().dataset

    def _loader(self, trainer: Trainer) -> DataLoader:
        """This rank's share of the profiling data: samples ``rank, rank + world, ...`` of the first ``max_samples``."""
        if self.dataloader is not None:
            if trainer.world_size > 1:
                raise MisconfigurationException(
                    "SharpnessProfiler(dataloader=...) cannot be sharded across ranks; use `split=` under DDP."
                )
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
            progress=self.progress and trainer.is_global_zero,
            seed=self.seed,
            rank=trainer.global_rank,
            num_draws=self.num_draws,
            strict=self.strict,
        )
        self.profile.metadata.update(split=self.split, num_draws=self.num_draws, module=type(pl_module).__name__)
        total = self.profile.num_samples
        self.seconds = time.perf_counter() - start
        self.profile.metadata["seconds"] = self.seconds
        folder = self.dirpath or trainer.log_dir  # on every rank: under DDP `log_dir` is a broadcast
        if trainer.is_global_zero:
            self._save(trainer, folder)
            self._log(trainer)
            rank_zero_info(
                f"SharpnessProfiler: {self.estimator} diagonal of {total} samples in {self.seconds:.1f}s"
                + (f", saved to {self.path}" if self.path else "")
            )
        trainer.strategy.barrier("sharpness_profiler")

    # ------------------------------------------------------------------------------------------------ reporting
    def _save(self, trainer: Trainer, folder: str | None) -> None:
        if folder is None or trainer.fast_dev_run:
            return
        self.path = self.profile.save(Path(folder) / self.filename)

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
        return {
            "estimator": self.estimator,
            "num_samples": None if self.profile is None else self.profile.num_samples,
            "path": None if self.path is None else str(self.path),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        path = state_dict.get("path")
        self.path = Path(path) if path else None


def layer_figure(profile: SharpnessProfile) -> Any:
    """A bar chart (matplotlib figure) of the mean Hessian diagonal per layer, log scale."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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
