"""``UnlearnModule``: unlearn the poisoned samples of a training run with a selection and a method."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_unlearn.batches import flatten_loaders
from lightning_unlearn.curvature import SharpnessProfile
from lightning_unlearn.data.protocol import UnlearnData, require_corrected_labels
from lightning_unlearn.distributed import all_reduce_flat, all_reduce_tensor
from lightning_unlearn.evaluation.cost import FitMeter, main_process_device
from lightning_unlearn.selection import AllLayers, ParameterMask, SelectionStrategy, Validated
from lightning_unlearn.unlearn.adapters.source import check_own_request, resolve_source
from lightning_unlearn.unlearn.base import ShardSampler, UnlearnMethod, Weighted, check_trainer
from lightning_unlearn.unlearn.methods.auto import Auto
from lightning_unlearn.unlearn.methods.inverse_hvp import dataset_hvp
from lightning_unlearn.unlearn.request.criterion import CRITERIA
from lightning_unlearn.unlearn.request.freeze import FreezeGuard
from lightning_unlearn.unlearn.request.lr_search import LearningRateSearch
from lightning_unlearn.unlearn.request.profiles import RequestProfile
from lightning_unlearn.unlearn.request.results import RequestEvaluation
from lightning_unlearn.unlearn.request.splits import SplitStatistics
from lightning_unlearn.unlearn.request.target import TARGETS, ForgettingTarget
from lightning_unlearn.unlearn.request.validation import ValidationSplits

#: Trainer settings every unlearning run needs: ``UnlearnModule`` shards its data exactly itself (no distributed
#: sampler), the unlearned checkpoint is written atomically by the pipeline (no checkpointing), no sanity validation;
#: deterministic algorithms (on a GPU cuDNN and cuBLAS would otherwise pick kernels whose sums vary from run to run,
#: and the same request would not give the same weights twice).
TRAINER_DEFAULTS: dict[str, Any] = {
    "deterministic": True,
    "use_distributed_sampler": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,  # a request has few batches; its step losses are logged, not averaged away
}


class SplitOverlapWarning(UserWarning):
    """The forget set shares samples with the validation or retain split (own data)."""


def unlearn_trainer(**kwargs: Any) -> Trainer:
    """A quiet single-device ``Trainer`` for programmatic requests: :data:`TRAINER_DEFAULTS`, no logger, no progress
    bar, one device; ``kwargs`` override any of them."""
    settings = {**TRAINER_DEFAULTS, "devices": 1, "logger": False, "enable_progress_bar": False, **kwargs}
    settings.setdefault("max_epochs", 1)  # the module sets its own schedule in `setup`; this only avoids a warning
    return Trainer(**settings)


class UnlearnModule(RequestProfile, SplitStatistics, ValidationSplits, LightningModule):
    """Unlearn a forget set from a trained classifier, changing only the selected parameters.

    What to unlearn, either (exactly one of ``run`` and ``model``):

    * ``run``: a training run of this library (its directory or a checkpoint inside it): the ``ClassifierModule``,
      its data and poison record; its profile is loaded from the run directory, or computed and saved there;
    * ``model`` and ``data``: **your own** ``nn.Module`` or ``LightningModule`` (or the path of a ``LightningModule``
      checkpoint, with ``model_class``) and its data through the protocol of
      :mod:`lightning_unlearn.data.protocol` (:class:`~lightning_unlearn.data.UnlearnData` over your datasets or
      loaders, or a ``LightningDataModule`` with ``forget_dataloader``, ``retain_dataloader``, ``val_dataloader``).
      Parameter names are the model's own (profiles from ``SharpnessProfiler`` on it fit as they are).

    Then it selects parameters with ``selection``, hard-freezes every other parameter and unlearns with ``method``;
    every choice the request makes (steps, damping, learning rates and epochs, validated candidates, ``Auto``'s method
    and selection) is scored by one criterion, the forgetting target's (:mod:`~lightning_unlearn.unlearn.request.
    target`): validation loss on the retained classes plus the distance of the forget set to what a model that never
    saw it would do, known without a retrained model. With ``evaluate`` it logs before / after (/ reference) metrics
    and the target's readings (:attr:`report`).

    Distributed: a single device or any ``DDPStrategy`` flavour (``ddp``, ``ddp_spawn``, ``ddp_fork``); FSDP and
    DeepSpeed are refused in ``setup``. A missing profile is computed once (by the parent of spawned ranks, or
    sharded across script-launched ranks and all-reduced). One-step methods sum the forget gradient over all ranks,
    SAM-style methods all-reduce the gradient that defines the perturbation, iterative updates use DDP's averaged
    gradients. Batch sizes are per rank.

    Args:
        run: Training run directory (or a checkpoint inside one) holding the checkpoint and ``poison.json``.
        method: The unlearning method; default :class:`~lightning_unlearn.unlearn.methods.auto.Auto` (method,
            selection and step chosen by the criterion within 0.5 training epochs). Explicit: ``FirstOrder``,
            ``SecondOrder``, ``Finetune``, ``NegGradPlus``, ``SamForget``, ``SharpMinMax``, ``SSD``; without
            corrected labels also ``FirstOrderRemoval``, ``RandomLabel``, ``L1Sparse``, ``SCRUB``.
        selection: Which parameters may change (``SmallestLayer``, ``LargestLayer``, ``TopKParameters``,
            ``LastLayer``, ``AllLayers``, ``NamedLayers``, ``RandomLayer``, ``RandomEntries``, ``Validated``,
            ``AutoCandidates``; from the model and the data: ``Saliency``, ``FisherRatio``); default: the method's
            own (``Auto``: its candidates, the last then the flattest layer; every other method: the paper's
            ``SmallestLayer``). ``prepare`` calls its ``select_for(self)``;
            statistics of any split (``split_profile("forget")``, ``split_gradient``, ``batch_importance``, see
            :mod:`~lightning_unlearn.unlearn.request.splits`) are computed once and kept in :attr:`split_cache`.
        profile: A :class:`SharpnessProfile` or the path of a saved one; default: a run's own (computed and saved if
            missing), or for ``model`` computed on the data's training set (``profile_dataloader()``, default retain
            then forget set) and kept in memory (:attr:`profile`). A request whose selection and method read no
            curvature (``Auto``'s default, the last layer, all layers, …) computes none: it uses a saved one if there
            is one, else the model's layout (:mod:`~lightning_unlearn.unlearn.request.profiles`).
        estimator: Estimator for a profile computed here (``exact``, ``mc``, ``hutchinson``, ``fisher``).
        profile_max_samples: Training samples for a profile computed here (None: all).
        allow_stale_profile: Accept a profile whose weights fingerprint differs from the model's.
        optimizer: Optimizer factory for iterative methods; default ``SGD(lr=0.01, momentum=0.9)``.
        eval_batch_size: Batch size of evaluation and validation passes (of a run's data).
        num_workers: DataLoader workers (of a run's data).
        seed: Seed of shuffling (iterative methods).
        validation_cache_mb: Memory for the activations a step-size search caches (the part of the network before
            the selected parameters is evaluated once on the validation split, see
            :class:`~lightning_unlearn.unlearn.request.validation.FrozenActivationCache`); 0 disables the cache.
            Results are identical either way.
        lr_grid: Iterative methods only: learning rates searched by the request's criterion. The method runs its whole
            budget (``epochs``) once per rate, each time from the original weights with a fresh optimizer state; the
            weights with the lowest validation loss are kept, "no change" (the original weights) included, so the
            model is never left worse on validation than before. Every rate's validation loss and accuracy go to
            :attr:`lr_search` (and the report). None: one run with the optimizer's own rate.
        lr_criterion: What scores the ``lr_grid`` search's rates and epochs (after every epoch: early stopping):
            ``"target"`` (the forgetting target's criterion, default) or ``"loss"`` (validation loss alone, the
            paper's recipe), see :mod:`~lightning_unlearn.unlearn.request.lr_search`.
        model: Your own model (``nn.Module``, ``LightningModule``, or a ``LightningModule`` checkpoint path).
        data: With ``model``: the forget / retain / validation data (see above).
        model_class: With a checkpoint path as ``model``: its ``LightningModule`` class (or ``"pkg.module.Class"``).
            The checkpoint is read as data only (weights-only: nothing in it runs) and rebuilt in this class; without
            it, only a checkpoint recording the library's own class (or one in ``trusted_classes``) loads, since
            nothing a file names is imported (:mod:`lightning_unlearn.checkpoints`).
        output_transform: With ``model``: maps its forward output to logits, for models that return more (e.g.
            ``lambda out: out[0]`` for ``(logits, features)``).
        reference: A model retrained without the forget set (``nn.Module``) or its metrics: the report then compares
            with it (ToW, % restored, the poison's harm and fit).
        evaluate: Evaluate before and after the update (accuracies; global rank zero) and log ``before/``,
            ``after/``, ``reference/``, ``comparison/`` and ``poison/`` scalars to the Trainer's loggers.
        trusted_classes: With a checkpoint path as ``model``: import paths of the classes its hyper-parameters may
            name as ``LightningCLI`` writes nested objects (``{"class_path": …, "init_args": …}``, e.g. an encoder
            or ``torch.optim.Adam`` for an optimizer argument); any other class path in the file is refused.
        batch_transform: With ``model``: maps an item of your datasets (a dict, an object) to ``(inputs, label)``,
            e.g. ``lambda item: (item["pixels"], item["target"])`` (``--model.batch_transform pkg.function`` on the
            command line); see :class:`~lightning_unlearn.data.UnlearnData`.
        forgetting_target: What "forgotten" means for this request (:data:`~lightning_unlearn.unlearn.request.
            target.TARGETS`): ``"corrected"`` (the corrected labels are known), ``"unseen"`` (a deletion: the forget
            set should look like held-out data), ``"class_removed"``, ``"trigger_removed"`` (a backdoor without its
            true labels). None: the data's own (``forgetting_target``), else from the poison record's kind, else
            ``"corrected"`` with corrected labels and ``"unseen"`` without. A target other than ``"corrected"`` does
            not use corrected labels even where the data has them.
    """

    def __init__(
        self,
        run: str | None = None,
        method: UnlearnMethod | None = None,
        selection: SelectionStrategy | None = None,
        profile: str | SharpnessProfile | None = None,
        estimator: str = "exact",
        profile_max_samples: int | None = None,
        allow_stale_profile: bool = False,
        optimizer: OptimizerCallable | None = None,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        validation_cache_mb: float = 1024.0,
        lr_grid: list[float] | None = None,
        lr_criterion: str = "target",
        model: nn.Module | str | None = None,
        data: LightningDataModule | UnlearnData | None = None,
        model_class: Any = None,
        output_transform: Callable[[Any], torch.Tensor] | None = None,
        reference: nn.Module | dict[str, float] | None = None,
        evaluate: bool = True,
        trusted_classes: list[str] | None = None,
        forgetting_target: str | None = None,
        batch_transform: Callable[[Any], tuple[Any, Any]] | None = None,
    ) -> None:
        super().__init__()
        objects = [
            "method", "selection", "optimizer", "model", "data", "model_class", "output_transform", "reference",
            "trusted_classes", "batch_transform",
        ]  # fmt: skip
        self.save_hyperparameters(ignore=objects + ([] if isinstance(profile, (str, type(None))) else ["profile"]))
        self.automatic_optimization = False
        self.method = method if method is not None else Auto()
        if not isinstance(self.method, UnlearnMethod):
            raise TypeError(f"`method` must be an UnlearnMethod, got {type(self.method).__name__}.")
        self.selection = selection if selection is not None else self.method.default_selection()
        if forgetting_target is not None and forgetting_target not in TARGETS:
            raise ValueError(
                f"`forgetting_target` must be one of {TARGETS} or None (inferred), got {forgetting_target!r}."
            )
        self._requested_target = forgetting_target
        self._target: ForgettingTarget | None = None
        #: The forgetting target's reading before and after the update (:meth:`target_reading`; set by the request).
        self.target_record: dict[str, Any] = {}
        if not isinstance(self.selection, SelectionStrategy):
            raise TypeError(f"`selection` must be a SelectionStrategy, got {type(self.selection).__name__}.")
        source = resolve_source(
            run, model, data, model_class, output_transform, eval_batch_size, num_workers, trusted_classes,
            batch_transform,
        )  # fmt: skip
        self.source = source
        self.training_run = source.training_run
        self.net: nn.Module = source.net
        # not a registered submodule: the same parameters as `net`'s, named as the user's model names them
        self.__dict__["_names_root"] = source.names_root
        self.classifier_hparams = source.classifier_hparams
        self.datamodule = source.datamodule
        self.profile_path = str(profile) if isinstance(profile, (str, os.PathLike)) else None
        self.estimator = estimator
        self.profile_max_samples = profile_max_samples
        self.allow_stale_profile = allow_stale_profile
        self.optimizer_factory = optimizer
        self.profile: SharpnessProfile | None = None
        self._given_profile = profile if isinstance(profile, SharpnessProfile) else None
        if not (profile is None or isinstance(profile, (str, os.PathLike, SharpnessProfile))):
            raise TypeError(f"`profile` must be a path, a SharpnessProfile or None, got {type(profile).__name__}.")
        self.mask: ParameterMask | None = None
        self.guard: FreezeGuard | None = None
        self.selected_names: set[str] = set()
        self.timings: dict[str, Any] = {}
        #: Before / after / reference metrics, the comparison and the method's choices (``evaluate=True``).
        self.evaluation = RequestEvaluation(reference) if evaluate else None
        if validation_cache_mb < 0:
            raise ValueError(f"`validation_cache_mb` must be >= 0 (0 disables the cache), got {validation_cache_mb}.")
        self.validation_cache_mb = validation_cache_mb
        self.lr_grid = LearningRateSearch.check_grid(lr_grid, self.method)
        if lr_criterion not in CRITERIA:
            raise ValueError(f"`lr_criterion` must be one of {CRITERIA}, got {lr_criterion!r}.")
        #: The learning-rate search's record (``lr_grid``): candidates with their validation scores, the chosen rate.
        self.lr_search: dict[str, Any] = {}
        self._lr_searcher: LearningRateSearch | None = None
        self._fit_meter = FitMeter()
        #: The request's place in its checkpoint's unlearning chain (the pipeline sets it; see ledger.py).
        self.ledger: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------------------- preparation
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def names_root(self) -> nn.Module:
        """The module whose parameter names profiles, masks and reports use: the model handed over as ``model``, or
        for a ``run`` this module (``net.<layer>``, the names of the trained ``ClassifierModule``)."""
        return self.__dict__["_names_root"] or self

    def net_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters by the names profiles use (see :attr:`names_root`)."""
        return list(self.names_root.named_parameters())

    @property
    def attacked_class(self) -> int | None:
        return self.datamodule.attacked_class

    @property
    def num_train_samples(self) -> int:
        return len(self.datamodule.train_dataset())

    def prepare(self, device: torch.device | str | None = None) -> None:
        """Load data, the profile and the selection, and apply the hard freeze (idempotent; called by ``setup``).

        Args:
            device: Where a profile computed here is computed (default: where the module is).
        """
        if self.guard is not None:
            return
        self.datamodule.setup("fit")
        if self.training_run is None:  # a user's model: logits out (or an output_transform to them)? trained on them?
            check_own_request(self)
        if self.method.needs_corrected_labels:
            require_corrected_labels(self.datamodule, f"The method {self.method.name!r}")
            if self.forgetting_target.target != "corrected":
                raise ValueError(
                    f"The method {self.method.name!r} replaces the forget set's labels with corrected ones, which a "
                    f"request with the forgetting target {self.forgetting_target.target!r} does not use: choose a "
                    "method that needs none (Auto, FirstOrderRemoval, NegGradPlus, SharpMinMax, Finetune, RandomLabel, "
                    "L1Sparse, SCRUB, SSD), or the target 'corrected'."
                )
        for note in getattr(self.datamodule, "overlap_notes", lambda: [])():  # own data: the library's are disjoint
            rank_zero_warn(
                f"{note} Every choice scored on validation then sees what is being removed, and a retain set that "
                "holds forget samples trains them back in: check the splits.",
                category=SplitOverlapWarning,
            )
        self.require_profile(device)
        start = time.perf_counter()
        if isinstance(self.selection, Validated) and not self.method.one_step:
            raise ValueError(
                f"The `Validated` selection compares one-step updates on validation; {self.method.name!r} is "
                "iterative. Use it with FirstOrder or SecondOrder."
            )
        with self.computing_on(device):  # data-aware selections compute gradients or importances
            self.mask = self.selection.select_for(self)
        self.timings["selection_seconds"] = time.perf_counter() - start
        self.selected_names = set(self.mask.trainable)
        freeze_mask = self.mask if self.method.freezes_unselected else AllLayers()(self.profile)
        self.guard = FreezeGuard(self.names_root, freeze_mask)
        total = sum(p.numel() for p in self.names_root.parameters())
        rank_zero_info(
            f"Selection {self.mask.strategy!r}: {self.mask.num_selected:,} of {total:,} parameters "
            f"({', '.join(self.mask.layers) or 'element-wise'}); method {self.method.name!r}."
        )

    def prepare_before_fit(self, trainer: Trainer) -> None:
        """Prepare now when this process alone has to: one process, or the parent of spawned ranks (``ddp_spawn``,
        ``ddp_fork``: they inherit the prepared module, so a missing profile is computed once). Ranks that run as
        separate processes from the start (``strategy="ddp"``, torchrun, SLURM) prepare in ``setup``, together.

        A parent that will *fork* CUDA ranks (``ddp_fork``) must not initialise CUDA, so it prepares on the CPU
        (:func:`~lightning_unlearn.evaluation.cost.main_process_device`): loading a profile costs nothing there, but
        a missing profile is then computed on the CPU (a warning says so).
        """
        if trainer.world_size == 1 or isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            device = main_process_device(trainer)
            if device != trainer.strategy.root_device and self.profile is None and not self._profile_exists:
                rank_zero_warn(
                    f"The ranks will be forked onto {trainer.strategy.root_device.type} devices, so the main process "
                    "stays on the CPU (a process that has initialised CUDA cannot fork CUDA ranks) and the missing "
                    "profile is computed there, on the CPU. Compute it first (`lightning-unlearn profile RUN_DIR`) "
                    "or use strategy='ddp' or 'ddp_spawn' to profile on the GPUs."
                )
            self.prepare(device)

    @property
    def _distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    @property
    def attached_trainer(self) -> Trainer | None:
        """The Trainer running this module, or None outside a fit (``LightningModule.trainer`` raises there)."""
        return self._trainer

    @property
    def world_size(self) -> int:
        """Processes taking part (1 without a Trainer)."""
        return self.trainer.world_size if self._distributed else 1

    # ------------------------------------------------------------------------------------------------- utilities
    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer_factory is None:
            return torch.optim.SGD(params, lr=0.01, momentum=0.9)
        return self.optimizer_factory(params)

    def loader(self, dataset: Dataset, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        """A loader over this rank's shard of ``dataset``, items with a weight appended (0 for the padding that gives
        every rank the same number of batches, see :class:`ShardSampler`)."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        sampler = ShardSampler(len(dataset), rank, world, shuffle=shuffle, seed=self.hparams.seed)
        return DataLoader(
            Weighted(dataset),
            batch_size=batch_size or self.hparams.eval_batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            # pinned host memory: Lightning's non-blocking copies to a CUDA device are then really asynchronous
            pin_memory=self._target_device.type == "cuda",
        )

    @property
    def _target_device(self) -> torch.device:
        """The device the Trainer runs this module on (where it is now without a Trainer)."""
        if self._trainer is not None:
            return self.trainer.strategy.root_device
        return self.device

    def all_reduce_sum(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum each tensor over all ranks with one all-reduce (identity with one process)."""
        if not self._distributed:
            return tensors
        return all_reduce_flat(tensors, lambda flat: all_reduce_tensor(self.trainer.strategy, flat, "sum"))

    def training_hvp(self, names: list[str], num_samples: int, scale: float = 1.0) -> Any:
        """``v ↦ scale · H v`` for the mean training loss restricted to parameters ``names`` (flat vectors), on the
        first ``num_samples`` training samples (fixed, so the operator is deterministic)."""
        params = dict(self.names_root.named_parameters())
        dataset = self.datamodule.train_dataset()
        return dataset_hvp(self.net, [params[n] for n in names], dataset, num_samples, self.device, scale)

    # ------------------------------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        check_trainer(self.trainer)
        strategy = self.trainer.strategy
        self.trainer.fit_loop.max_epochs = self.max_epochs  # not Lightning's default 1000: one step is one epoch
        self._fit_meter.start(strategy.root_device)  # this rank's fit, from here to `on_train_end`
        self.prepare(strategy.root_device)

    def _stop_fit_meter(self) -> None:
        """Stop the measurement and record it in :attr:`timings` (which travel back from spawned ranks):
        ``fit_peak_bytes`` (the largest peak of all ranks), ``fit_memory_method`` and ``fit_memory_device`` (rank
        zero's)."""
        cost = self._fit_meter.stop()
        if cost is None:
            return
        peak = cost.peak_bytes
        if self._distributed:
            peaks = torch.tensor([float(peak)], dtype=torch.float64, device=self.device)
            peak = int(all_reduce_tensor(self.trainer.strategy, peaks, "max"))
        self.timings.update(fit_peak_bytes=peak, fit_memory_method=cost.method, fit_memory_device=cost.device)

    def teardown(self, stage: str) -> None:
        self._fit_meter.stop()  # a fit that failed before `on_train_end`: stop the sampler thread

    def get_extra_state(self) -> dict[str, Any]:
        """What a run measured and chose besides weights (timings, the method's results, the learning-rate search),
        so that it survives the trip from the spawned rank zero back to the main process under ``ddp_spawn``."""
        report = self.evaluation.report if self.evaluation is not None else {}
        return {
            "timings": dict(self.timings),
            "method": self.method.state_dict(),
            "lr_search": dict(self.lr_search),
            "report": report,
            "target": dict(self.target_record),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.timings.update(state.get("timings", {}))
        self.method.load_state_dict(state.get("method", {}))
        self.lr_search = dict(state.get("lr_search", {}))
        self.target_record.update(state.get("target", {}))
        if self.evaluation is not None and state.get("report"):
            self.evaluation.report = state["report"]

    def on_fit_start(self) -> None:
        # Lightning warns about modules in eval mode at the start of a fit; every method puts the network in eval
        # mode itself at each step (BatchNorm statistics and dropout frozen), so the modes before it do not matter
        self.train()

    def train_dataloader(self) -> Any:
        self.prepare()
        return self.method.train_dataloader(self)

    def configure_optimizers(self) -> Any:
        self.prepare()
        optimizers = self.method.configure_optimizers(self)
        return [] if optimizers is None else optimizers  # a one-step method writes its update: no optimizer, no warning

    def on_train_start(self) -> None:
        if self.evaluation is not None and self.trainer.is_global_zero:
            self.evaluation.start(self)

    @property
    def report(self) -> dict[str, Any]:
        """The request's report after the fit (``evaluate=True``): ``before``, ``after`` and with a ``reference`` its
        metrics, ``poison_effect``, ``comparison`` and ``restored``; the ``selection``, the ``method``'s choices
        (chosen step and every candidate's validation score, or the learning-rate search), ``profile``, ``timings``.
        Empty before the fit, with ``evaluate=False`` and on ranks other than zero."""
        return self.evaluation.report if self.evaluation is not None else {}

    def on_train_epoch_start(self) -> None:
        self._fit_start = getattr(self, "_fit_start", time.perf_counter())
        loaders = self.trainer.train_dataloader
        # with `lr_grid` every rate sees the data in the same order (epoch k of its block shuffles like epoch k)
        search = self._lr_searcher
        if self.lr_grid is not None and (search is None or self.current_epoch == 0):
            epochs = int(getattr(self.method, "epochs", 1))
            search = self._lr_searcher = LearningRateSearch(self.lr_grid, epochs, self.hparams.lr_criterion)
        epoch = search.block_epoch(self.current_epoch) if search is not None else self.current_epoch
        for loader in flatten_loaders(loaders):
            if isinstance(getattr(loader, "sampler", None), ShardSampler):
                loader.sampler.set_epoch(epoch)
        if search is not None:
            search.start_epoch(self, self.current_epoch)
            self.lr_search = search.record

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return self.method.training_step(self, batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        self.method.on_train_epoch_end(self)
        if self._lr_searcher is not None:
            self._lr_searcher.end_epoch(self, self.current_epoch)

    def on_train_end(self) -> None:
        self.timings["unlearn_seconds"] = time.perf_counter() - getattr(self, "_fit_start", time.perf_counter())
        self._stop_fit_meter()
        if self.evaluation is not None and self.trainer.is_global_zero:
            self.evaluation.finish(self)

    @property
    def max_epochs(self) -> int:
        """Epochs of the fit, which ``setup`` sets as the Trainer's ``max_epochs`` whatever it was given (1 for one-step
        methods; the method's epochs once per rate of ``lr_grid``)."""
        if self.method.one_step:
            return 1
        return int(getattr(self.method, "epochs", 1)) * (len(self.lr_grid) if self.lr_grid is not None else 1)
