"""The training, unlearning and profiling commands, built on ``LightningCLI`` (``lightning_unlearn.__main__``
dispatches the ``lightning-unlearn`` command to them, to ``sweep.py`` and to ``demo.py``).

* ``lightning-unlearn train …`` (= ``python train.py …``; :class:`~lightning_unlearn.train_cli.TrainCLI`):
  ``fit -c configs/mnist_cnn_targeted.yaml`` trains a classifier on poisoned data, then (unless ``--test_after_fit
  false``) tests it, prints a results table and writes ``results.json`` into the run directory, which also holds the
  checkpoint, ``poison.json``, the resolved ``config.yaml``, the TensorBoard events and (with the profiler attached)
  ``sharpness_profile.pt``. ``--model`` and ``--data`` take any ``LightningModule`` / ``LightningDataModule`` by class
  path (LightningCLI's subclass mode; the defaults are ``ClassifierModule`` and ``PoisonedDataModule``), and
  ``--trainer.callbacks+=SharpnessProfiler`` attaches the profiler by its short name.
* ``lightning-unlearn unlearn …`` (= ``python unlearn.py …``): ``-c configs/unlearn/sa_first_order.yaml --model.run
  RUN_DIR [--reference RETRAIN_RUN_DIR]`` unlearns the run's poisoned samples and writes ``report.json``, the unlearned
  checkpoint and TensorBoard events into ``RUN_DIR/unlearn/<name>/version_<n>/``.
* ``lightning-unlearn profile …``: the Hessian-diagonal profile of an existing checkpoint.

The parsers of these commands and of ``sweep`` are named after their command (``usage: lightning-unlearn profile
…``) and take ``-c`` as well as ``--config``.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import ActionYesNo
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_unlearn.outputs import OutputClaim, launched_as_rank_zero, safe_folder_name
from lightning_unlearn.reporting import print_report
from lightning_unlearn.run import RESULTS_FILENAME
from lightning_unlearn.train_cli import PROG, TrainCLI, parser_kwargs
from lightning_unlearn.utils import atomic_write

__all__ = [
    "RESULTS_FILENAME",
    "TrainCLI",
    "UnlearnCLI",
    "function_main",
    "profile_checkpoint",
    "profile_main",
    "train_main",
    "unlearn_main",
]


def _choices_hint(message: str) -> str:
    """The allowed classes of the unlearning request's ``method`` / ``selection`` when a parse error concerns them."""
    from lightning_unlearn.selection import STRATEGIES
    from lightning_unlearn.unlearn import METHODS

    hints = []
    for key, classes in (("model.method", METHODS), ("model.selection", STRATEGIES)):
        if f'"{key}"' in message or f"'{key}'" in message:
            names = ", ".join(cls.__name__ for cls in classes.values())
            hints.append(f"`--{key}` must be one of {names} (or the class_path of a subclass).")
    return "\n".join(hints)


def _option_hint(message: str, parser: LightningArgumentParser) -> str:
    """Where the unlearning request's optimizer and data are set, when a parse error is about LightningCLI's
    top-level ``--optimizer`` / ``--lr_scheduler`` / ``--data``, which the request has not (one way to set each)."""
    hints = []
    if "--optimizer" in message or "--lr_scheduler" in message:
        hints.append(
            "The optimizer of iterative methods is `--model.optimizer` (e.g. `--model.optimizer Adam "
            "--model.optimizer.lr 0.001`); a request has no `--optimizer` or `--lr_scheduler`."
        )
    if "--data" in message.replace("--model.data", ""):
        own = " or `--model.data`" if "--model.data" in parser._option_string_actions else ""
        hints.append(f"A request's data comes from its training run (`--model.run`){own}; it has no `--data`.")
    return "\n".join(hints)


class UnlearnArgumentParser(LightningArgumentParser):
    """The unlearning parser: an unknown method or selection class gets the list of known ones in its error, an
    unknown ``--optimizer`` / ``--data`` where to set them instead."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        hint = "\n".join(h for h in (_choices_hint(message), _option_hint(message, self)) if h)
        super().error(f"{message}\n{hint}" if hint else message, ex)


class UnlearnCLI(LightningCLI):
    """``LightningCLI`` for :class:`~lightning_unlearn.unlearn.UnlearnModule` (no subcommands: one request per call).

    What to unlearn: a training run of this library (``--model.run``), or your own LightningModule's checkpoint
    (``--model.model CKPT [--model.model_class pkg.Module] --model.data pkg.DataModule`` with the data module's
    ``--model.data.init_args.*``; the data module implements the loaders of :mod:`lightning_unlearn.data.protocol`;
    ``--reference`` is then a checkpoint of the same class retrained without the forget set).

    No option but the module's sets its data or its optimizer: the data comes from the run or ``--model.data``, the
    optimizer of iterative methods is ``--model.optimizer`` (LightningCLI's own ``--data``, ``--optimizer`` and
    ``--lr_scheduler``, which were ignored or replaced it, are not added; nor the module's Python-only ``reference``
    and ``evaluate``, which ``--reference`` and the request's own evaluation replace).

    Outputs go to ``<run>/unlearn/<name>/version_<n>/`` (own model: ``<checkpoint's folder>/unlearn/…``) unless the
    config sets a logger ``save_dir``. Before anything
    is instantiated the request is checked (the run's poison record against its checkpoint, a forget set to unlearn,
    a reference that is not the run itself, ``--name``) and its output folder claimed
    (:func:`~lightning_unlearn.pipeline.claim_request_folder`): the TensorBoard logger writes into the claim's staging
    folder, which :func:`~lightning_unlearn.pipeline.run_unlearning` puts in place whole at the end
    (:attr:`output_claim`).
    """

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        from lightning_unlearn.unlearn import UnlearnModule

        self.output_claim: OutputClaim | None = None
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs["parser_kwargs"] = parser_kwargs(
            kwargs, "unlearn", "Unlearn a training run's poisoned samples (one request); writes report.json."
        )
        kwargs.setdefault("auto_configure_optimizers", False)  # no top-level --optimizer / --lr_scheduler
        from lightning_unlearn.unlearn.module import TRAINER_DEFAULTS

        defaults = {
            **TRAINER_DEFAULTS,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "", "name": ""},
            },
        }
        kwargs["trainer_defaults"] = {**defaults, **kwargs.get("trainer_defaults", {})}
        kwargs.setdefault("parser_class", UnlearnArgumentParser)
        super().__init__(UnlearnModule, None, args=args, run=False, **kwargs)

    def _add_instantiators(self) -> None:
        """LightningCLI's instantiator for the module, and a plain one for a user's data module (``--model.data``):
        LightningCLI's own would hand the data module the top-level ``--data`` hyper-parameters, which a request has
        not, so an idiomatic ``save_hyperparameters()`` came back empty (``self.hparams.batch_size`` failed). Built
        plainly, it records its own arguments as it does in Python."""
        from lightning.pytorch import LightningDataModule

        super()._add_instantiators()
        self.parser.add_instantiator(
            lambda class_type, *args, **kwargs: class_type(*args, **kwargs),
            LightningDataModule,
            subclasses=True,
            prepend=True,
        )

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The trainer's and the module's arguments; no ``--data`` (LightningCLI adds one, which nothing would read)."""
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        # as `add_lightning_class_args` does, less the Python-only options (`--reference` is the command line's)
        parser.add_class_arguments(
            self._model_class, "model", fail_untyped=False, sub_configs=True, skip={"reference", "evaluate"}
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--reference",
            type=str | None,
            default=None,
            help="Run directory of a model retrained without the poisoned samples (`train.py fit ... "
            "--data.drop_poisoned true`), or with --model.model a checkpoint of the same class retrained without the "
            "forget set: adds its accuracies and % restored to the report.",
        )
        parser.add_argument(
            "--name",
            type=str | None,
            default=None,
            help="Name of this request, a single folder name (default: <method>_<selection>).",
        )
        parser.add_argument(
            "--overwrite",
            action=ActionYesNo,
            default=False,
            help="Replace the results of an earlier request in the output folder, whole (refused by default when "
            "it holds anything, and always when it holds files a request does not write).",
        )
        parser.add_argument(
            "--force",
            action=ActionYesNo,
            default=False,
            help="Unlearn a forget set that an earlier request of this checkpoint's chain already unlearned (refused "
            "by default; `lightning-unlearn history CKPT` prints the chain).",
        )
        from lightning_unlearn.evaluation.suite import EvaluationOptions

        parser.add_class_arguments(EvaluationOptions, "evaluation", sub_configs=True)

    def before_instantiate_classes(self) -> None:
        from lightning_unlearn.curvature import ESTIMATORS
        from lightning_unlearn.reference import check_reference
        from lightning_unlearn.run import TrainingRun

        config = self.config
        if config.model.estimator not in ESTIMATORS:
            self.parser.error(
                f"`--model.estimator` must be one of {sorted(ESTIMATORS)}, got {config.model.estimator!r}."
            )
        if config.trainer.get("max_epochs") is not None:
            self.parser.error(
                f"`--trainer.max_epochs` ({config.trainer.max_epochs}) is not used by unlearning requests: the method "
                "sets the epochs. Set `--model.method.init_args.epochs` (iterative methods) instead."
            )
        if config.get("name") is not None:
            try:
                safe_folder_name(config.name, "--name")
            except ValueError as err:
                self.parser.error(str(err))
        if config.model.get("model") is not None:
            home = self._check_own_model(config)
        else:
            if config.model.run is None:
                self.parser.error("Give `--model.run` (a training run of this library) or `--model.model` (your own).")
            training_run = TrainingRun.from_path(config.model.run)
            training_run.check_unlearnable()  # the record verified against the checkpoint, before any output or work
            if config.get("reference"):
                check_reference(TrainingRun.from_path(config.reference), training_run)
            home = training_run.home
        logger = config.trainer.logger
        init = getattr(logger, "init_args", None)
        if init is not None and getattr(logger, "class_path", "").endswith("TensorBoardLogger"):
            if not init.save_dir:
                init.save_dir = str(home / "unlearn")
            if not init.name:
                init.name = config.name or _default_name(config.model)
            self._claim_logger_folder(init, bool(config.get("overwrite", False)))

    def _check_own_model(self, config: Any) -> Path:
        """``--model.model``: a checkpoint file, with ``--model.data`` and without ``--model.run``; returns the folder
        its requests go under by default."""
        model = config.model.model
        if config.model.run is not None:
            self.parser.error("`--model.run` and `--model.model` exclude each other: give one.")
        if not isinstance(model, str) or not Path(model).is_file():
            self.parser.error(f"`--model.model` must be the path of a LightningModule checkpoint file, got {model!r}.")
        if config.model.get("data") is None:
            self.parser.error(
                "`--model.model` needs `--model.data`: a LightningDataModule class path whose module implements "
                "forget_dataloader, retain_dataloader and val_dataloader (lightning_unlearn.data.protocol)."
            )
        reference = config.get("reference")
        if reference and Path(reference).resolve() == Path(model).resolve():
            self.parser.error(f"`--reference` {reference!r} is the model to unlearn itself.")
        return Path(model).resolve().parent

    def _claim_logger_folder(self, init: Any, overwrite: bool) -> None:
        """Claim ``save_dir/name/version_<n>`` (the next free version unless ``version`` is given) and point the
        logger at the claim's staging folder; on rank zero only (other ranks write nothing)."""
        from lightning_unlearn.pipeline import claim_request_folder, request_foreign

        parts = Path(str(init.name)).parts
        if Path(str(init.name)).is_absolute() or ".." in parts:
            self.parser.error(
                f"`--trainer.logger.init_args.name` must be a relative path inside `save_dir` (no '..'), got "
                f"{init.name!r}."
            )
        version = init.get("version")
        if version is not None and not isinstance(version, int):
            try:
                safe_folder_name(str(version), "--trainer.logger.init_args.version")
            except ValueError as err:
                self.parser.error(str(err))
        if not launched_as_rank_zero():
            return
        parent = Path(init.save_dir) / str(init.name)
        if version is None:
            claim = OutputClaim.acquire_version(parent, foreign=request_foreign, what="unlearning request")
        else:
            folder = parent / (f"version_{version}" if isinstance(version, int) else str(version))
            claim = claim_request_folder(folder, overwrite)
        self.output_claim = claim
        self._given_version = (init, version)  # what config.yaml will say (see `instantiate_classes`)
        init.version = claim.staging.name  # TensorBoard events and config.yaml go into the staging folder

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except BaseException:
            if self.output_claim is not None:
                self.output_claim.abort()
            raise
        if self.output_claim is not None:  # the logger writes into the staging folder; config.yaml names the request's
            init, version = self._given_version
            init.version = version
            _show_version(self.trainer, self.output_claim.final.name)


def _show_version(trainer: Any, folder: str) -> None:
    """Progress bars show the request folder's version (``v_num=0`` for ``version_0``), not the last four letters of
    the staging folder the logger writes into until the request is put in place (``v_num=ging``)."""
    from lightning.pytorch.callbacks.progress import ProgressBar

    shown: int | str = int(folder[len("version_"):]) if re.fullmatch(r"version_\d+", folder) else folder
    for bar in (c for c in trainer.callbacks if isinstance(c, ProgressBar)):
        metrics = bar.get_metrics

        def with_version(trainer: Any, module: Any, metrics: Any = metrics) -> dict[str, Any]:
            items = metrics(trainer, module)
            return items | {"v_num": shown} if "v_num" in items else items

        bar.get_metrics = with_version


def _default_name(model_config: Any) -> str:
    def short(spec: Any, fallback: str) -> str:
        path = getattr(spec, "class_path", None) if spec is not None else None
        return path.rsplit(".", 1)[-1].lower() if path else fallback

    method = short(model_config.method, "auto")  # UnlearnModule's defaults: Auto, with its own candidates
    return f"{method}_{short(model_config.selection, 'autocandidates' if method == 'auto' else 'smallestlayer')}"


def unlearn_main(args: list[str] | None = None) -> dict[str, Any]:
    """Run one unlearning request from the command line (``args``, default ``sys.argv[1:]``) and print its table."""
    from lightning_unlearn.evaluation.cost import main_process_device
    from lightning_unlearn.pipeline import run_unlearning
    from lightning_unlearn.reference import evaluate_reference

    cli = UnlearnCLI(args=args)
    try:
        options = cli.config_init.get("evaluation")
        reference_dir = cli.config.get("reference")
        reference = calibration = None
        if reference_dir:
            options, reference, calibration = evaluate_reference(
                reference_dir,
                cli.model.datamodule,
                options,
                poisoned=cli.model.training_run or cli.model.source,
                device=main_process_device(cli.trainer),
            )
        overwrite = bool(cli.config.get("overwrite", False))
        report = run_unlearning(
            cli.trainer,
            cli.model,
            reference,
            evaluation=options,
            overwrite=overwrite,
            calibration=calibration,
            force=bool(cli.config.get("force", False)),
        )
    except BaseException:
        if cli.output_claim is not None:
            cli.output_claim.abort()  # nothing of the request is left behind
        raise
    if cli.trainer.is_global_zero:
        print_report(report)
    return report


def profile_checkpoint(
    run: str,
    estimator: str = "exact",
    split: str = "train",
    max_samples: int | None = None,
    batch_size: int = 256,
    num_draws: int = 1,
    seed: int = 0,
    strict: bool = True,
    device: str = "cpu",
    output: str | None = None,
    overwrite: bool = False,
) -> str:
    """Profile the Hessian diagonal of a trained checkpoint's training loss (``lightning-unlearn profile``).

    Args:
        run: Training run directory, or a checkpoint file inside one (an ``unlearned.ckpt`` too).
        estimator: ``exact``, ``mc``, ``hutchinson`` or ``fisher``.
        split: ``train`` (the training set exactly as trained on) or ``val``.
        max_samples: Profile only the first ``max_samples`` samples (>= 1; None: all).
        batch_size: Batch size of the profiling loader (>= 1).
        num_draws: Sampled labels (``mc``) or probes (``hutchinson``) per sample / batch (>= 1).
        seed: Seed of the random draws.
        strict: Refuse ``exact`` where it would not equal the Hessian diagonal.
        device: Where to compute (``cpu``, ``cuda``, ``cuda:1``, ...).
        output: Where to write the profile; default ``<run>/sharpness_profile.pt``.
        overwrite: Replace an existing profile at ``output`` (refused by default: later requests would use the new
            one). A file that is not a sharpness profile (a checkpoint, ...) is never replaced.

    Returns:
        The path of the written profile.

    Raises:
        ValueError: For an invalid argument, before anything is loaded.
        FileExistsError: If ``output`` exists (see ``overwrite``).
    """
    import torch
    from torch.utils.data import DataLoader

    from lightning_unlearn.curvature import ESTIMATORS, profile_model
    from lightning_unlearn.run import InterruptedTrainingWarning, TrainingRun

    if estimator not in ESTIMATORS:  # checked before the (slow) loading of the run
        raise ValueError(f"`estimator` must be one of {sorted(ESTIMATORS)}, got {estimator!r}.")
    if split not in ("train", "val"):
        raise ValueError(f"`split` must be one of ('train', 'val'), got {split!r}.")
    for name, value in (("batch_size", batch_size), ("num_draws", num_draws), ("max_samples", max_samples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            none = " or None" if name == "max_samples" else ""
            raise ValueError(f"`{name}` must be an integer >= 1{none}, got {value!r}.")
    training_run = TrainingRun.from_path(run)
    if not output and not training_run.stores_profile:
        raise ValueError(
            f"{str(training_run.checkpoint)!r} is an unlearned checkpoint: its folder belongs to the request that "
            "wrote it, so a profile is not written there. Pass `--output PATH`."
        )
    path = Path(output) if output else training_run.profile_path
    _check_profile_output(path, training_run.checkpoint, overwrite)
    classifier = training_run.load_classifier(map_location=device)
    datamodule = training_run.datamodule()
    status = training_run.training_status()
    if status["complete"] is False:
        warnings.warn(
            f"The training run {str(training_run.directory)!r} looks interrupted: its checkpoint is from epoch "
            f"{status['epoch'] + 1} of {status['max_epochs']} and it wrote no results.json.",
            InterruptedTrainingWarning,
            stacklevel=2,
        )
    datamodule.setup("fit")
    loader = (
        datamodule.profile_dataloader(batch_size=batch_size)
        if split == "train"
        else DataLoader(datamodule.val_dataloader().dataset, batch_size=batch_size)
    )
    profile = profile_model(
        classifier,
        loader,
        estimator,
        max_samples=max_samples,
        progress=True,
        seed=seed,
        num_draws=num_draws,
        strict=strict,
    )
    profile.dataset = datamodule.dataset
    profile.metadata.update(split=split, checkpoint=str(training_run.checkpoint))
    state = profile.state_dict()
    atomic_write(path, lambda handle: torch.save(state, handle), exclusive=not overwrite)
    print(profile.to_table())
    print(f"Profile ({estimator}, {profile.num_samples} samples) written to {path}")
    return str(path)


def _check_profile_output(path: Path, checkpoint: Path, overwrite: bool) -> None:
    """Refuse to replace anything at ``path`` but a sharpness profile, and a profile only with ``overwrite``."""
    from lightning_unlearn.curvature import SharpnessProfile

    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() or path.resolve() == checkpoint.resolve():
        what = "a folder" if path.is_dir() else "the run's checkpoint"
        raise FileExistsError(f"`output` {str(path)!r} is {what}: it is never replaced by a profile.")
    try:
        existing = SharpnessProfile.load(path)
    except (ValueError, OSError) as err:
        raise FileExistsError(
            f"`output` {str(path)!r} exists and is not a sharpness profile: it is not replaced, even with "
            "`--overwrite`. Choose another `--output`."
        ) from err
    if not overwrite:
        raise FileExistsError(
            f"`output` {str(path)!r} already holds a sharpness profile ({existing.estimator}, "
            f"{existing.num_samples:,} samples) that later requests use: pass `--overwrite` to replace it, or "
            "choose another `--output`."
        )


def train_main(args: list[str]) -> None:
    """``lightning-unlearn train ARGS``: :class:`TrainCLI` (LightningCLI's subcommands ``fit``, ``test``, ...)."""
    TrainCLI(args=args)


def function_main(function: Callable[..., Any], command: str, args: list[str] | None) -> Any:
    """Call ``function`` with the arguments parsed from ``args`` (``jsonargparse.auto_cli`` with the parser named
    ``lightning-unlearn <command>`` and ``-c`` as well as ``--config``, like ``train`` and ``unlearn``)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    description = (inspect.getdoc(function) or "").split("\n\n")[0]
    parser = ArgumentParser(prog=f"{PROG} {command}", description=description, default_env=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="Path to a configuration file (yaml or json).")
    parser.add_function_arguments(function, as_positional=True)
    config = parser.parse_args(args)
    config.pop("config", None)
    return function(**parser.instantiate_classes(config).as_dict())


def history_main(args: list[str]) -> list[dict[str, Any]]:
    """``lightning-unlearn history CKPT``: :func:`~lightning_unlearn.ledger.print_history` from the command line."""
    from lightning_unlearn.ledger import print_history

    return function_main(print_history, "history", args)


def profile_main(args: list[str]) -> None:
    """``lightning-unlearn profile ARGS``: :func:`profile_checkpoint` from the command line."""
    function_main(profile_checkpoint, "profile", args)
