"""Command line, built on ``LightningCLI``.

* ``lightning-unlearn train …`` (= ``python train.py …``): ``fit -c configs/mnist_cnn_targeted.yaml`` trains a
  classifier on poisoned data, then (unless ``--test_after_fit false``) tests it, prints a results table and writes
  ``results.json`` into the run directory, which also holds the checkpoint, ``poison.json``, the resolved
  ``config.yaml``, the TensorBoard events and (with the profiler attached) ``sharpness_profile.pt``.
* ``lightning-unlearn unlearn …`` (= ``python unlearn.py …``): ``-c configs/unlearn/sa_first_order.yaml --model.run
  RUN_DIR [--reference RETRAIN_RUN_DIR]`` unlearns the run's poisoned samples and writes ``report.json``, the unlearned
  checkpoint and TensorBoard events into ``RUN_DIR/unlearn/<name>/version_<n>/``.
* ``lightning-unlearn profile …``: the Hessian-diagonal profile of an existing checkpoint.
* ``lightning-unlearn sweep RUN_DIR``: every weight layer alone, improvement vs sharpness (the paper's Fig. 1).
* ``lightning-unlearn demo``: the whole pipeline on real MNIST (what ``make demo`` runs).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import ActionYesNo
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from lightning_unlearn.data.datamodule import PoisonedDataModule
from lightning_unlearn.models.classifier import ClassifierModule
from lightning_unlearn.utils import atomic_write_text

# Our commands hand LightningCLI their arguments explicitly (`sys.argv` also holds the command word, and must stay as
# it was: DDP's script launcher starts the other ranks with `sys.argv`), which LightningCLI would warn about.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")

RESULTS_FILENAME = "results.json"


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None, floatfmt: str = ".2f") -> str:
    """A plain-text (GitHub markdown) table of ``rows``; missing cells are blank."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return format(value, floatfmt)
        return "" if value is None else str(value)

    grid = [[cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in grid)) if grid else len(col) for i, col in enumerate(columns)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, grid)])


def accuracy_rows(metrics: dict[str, float], splits: list[str]) -> list[dict[str, Any]]:
    """Rows ``split | overall | attacked class | other classes`` from the logged ``<split>/acc*`` metrics."""
    rows = []
    for split in splits:
        if split == "triggered":  # the backdoor's triggered test images: their accuracy is the attack success rate
            rows.append({"split": "triggered test (ASR)", "acc %": metrics.get("test/asr")})
            continue
        row = {"split": split, "acc %": metrics.get(f"{split}/acc")}
        if f"{split}/acc_attacked" in metrics:
            row["attacked class %"] = metrics[f"{split}/acc_attacked"]
            row["other classes %"] = metrics.get(f"{split}/acc_other")
        rows.append(row)
    return rows


class TrainCLI(LightningCLI):
    """``LightningCLI`` for :class:`ClassifierModule` on :class:`PoisonedDataModule`, with dataset → model links."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        # checkpoints written atomically beside their final path (a run killed mid-save keeps its last checkpoint)
        atomic = {"class_path": "lightning_unlearn.run.AtomicCheckpointIO"}
        kwargs["trainer_defaults"] = {"plugins": [atomic], **kwargs.get("trainer_defaults", {})}
        super().__init__(ClassifierModule, PoisonedDataModule, args=args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for attr in ("num_classes", "in_channels", "image_size"):
            parser.link_arguments(f"data.{attr}", f"model.{attr}", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="After `fit`, test the final model and print a table."
        )

    def before_fit(self) -> None:
        # Fix the run directory (the logger's version) now: ranks spawned by `ddp_spawn` get this process's logger,
        # so the parent, the ranks and the test that follows all use one directory instead of one each.
        _ = self.trainer.log_dir

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit", True) or self.trainer.fast_dev_run:
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        metrics = {key: float(value) for result in results for key, value in result.items()}
        self.report(metrics, self.trainer.log_dir)  # `log_dir` on every rank: under DDP it is a collective

    @rank_zero_only
    def report(self, metrics: dict[str, float], log_dir: str | None) -> None:
        splits = list(getattr(self.datamodule, "test_split_names", ["test"]))
        print(
            "\nPoisoned model (" + f"{self.datamodule.poison.kind} poisoning, "
            f"{len(self.datamodule.record or [])} samples):"
        )
        print(format_table(accuracy_rows(metrics, splits)))
        if log_dir is not None:
            payload = {"metrics": metrics, "checkpoint": self._best_checkpoint()}
            path = atomic_write_text(Path(log_dir) / RESULTS_FILENAME, json.dumps(payload, indent=1))
            print(f"Run directory: {log_dir}  (results: {path.name}, TensorBoard: tensorboard --logdir {log_dir})")

    def _best_checkpoint(self) -> str | None:
        callback = self.trainer.checkpoint_callback
        return getattr(callback, "best_model_path", None) or getattr(callback, "last_model_path", None) or None


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


class UnlearnArgumentParser(LightningArgumentParser):
    """The unlearning parser: an unknown method or selection class gets the list of known ones in its error."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        hint = _choices_hint(message)
        super().error(f"{message}\n{hint}" if hint else message, ex)


class UnlearnCLI(LightningCLI):
    """``LightningCLI`` for :class:`~lightning_unlearn.unlearn.UnlearnModule` (no subcommands: one request per call).

    Outputs go to ``<run>/unlearn/<name>/version_<n>/`` unless the config sets a logger ``save_dir``.
    """

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        from lightning_unlearn.unlearn import UnlearnModule

        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
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

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--reference",
            type=str | None,
            default=None,
            help="Run directory of a model retrained without the poisoned samples (`train.py fit ... "
            "--data.drop_poisoned true`): adds its accuracies and % restored to the report.",
        )
        parser.add_argument(
            "--name", type=str | None, default=None, help="Name of this request (default: <method>_<selection>)."
        )
        parser.add_argument(
            "--overwrite",
            action=ActionYesNo,
            default=False,
            help="Replace the results of an earlier request in the output folder (refused by default when it "
            "already holds report.json).",
        )
        from lightning_unlearn.evaluation.suite import EvaluationOptions

        parser.add_class_arguments(EvaluationOptions, "evaluation", sub_configs=True)

    def before_instantiate_classes(self) -> None:
        from lightning_unlearn.curvature import ESTIMATORS
        from lightning_unlearn.run import TrainingRun

        config = self.config
        if config.model.estimator not in ESTIMATORS:
            self.parser.error(
                f"`--model.estimator` must be one of {sorted(ESTIMATORS)}, got {config.model.estimator!r}."
            )
        logger = config.trainer.logger
        init = getattr(logger, "init_args", None)
        if init is not None and getattr(logger, "class_path", "").endswith("TensorBoardLogger"):
            if not init.save_dir:
                init.save_dir = str(TrainingRun.from_path(config.model.run).directory / "unlearn")
            if not init.name:
                init.name = config.name or _default_name(config.model)


def _default_name(model_config: Any) -> str:
    def short(spec: Any, fallback: str) -> str:
        path = getattr(spec, "class_path", None) if spec is not None else None
        return path.rsplit(".", 1)[-1].lower() if path else fallback

    return f"{short(model_config.method, 'firstorder')}_{short(model_config.selection, 'smallestlayer')}"


def unlearn_main(args: list[str] | None = None) -> dict[str, Any]:
    """Run one unlearning request from the command line (``args``, default ``sys.argv[1:]``) and print its table."""
    from lightning_unlearn.pipeline import evaluate_reference, run_unlearning

    cli = UnlearnCLI(args=args)
    options = cli.config_init.get("evaluation")
    reference_dir = cli.config.get("reference")
    reference = calibration = None
    if reference_dir:
        options, reference, calibration = evaluate_reference(reference_dir, cli.model.datamodule, options)
    overwrite = bool(cli.config.get("overwrite", False))
    report = run_unlearning(
        cli.trainer, cli.model, reference, evaluation=options, overwrite=overwrite, calibration=calibration
    )
    if cli.trainer.is_global_zero:
        print_report(report)
    return report


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``metric | before | after | retrained | % restored`` of an unlearning report (accuracies and attack
    scores in %, AUCs in [0, 1])."""
    rows = []
    for key, before in report["before"].items():
        if "@" in key:  # a point of the relearning attack's recovery curve (summarised by relearn/auc)
            continue
        row = {"metric": key, "before": before, "after": report["after"].get(key)}
        if "reference" in report:
            row["retrained"] = report["reference"].get(key)
            row["% restored"] = report.get("restored", {}).get(key.replace("/", "_restored/", 1))
        rows.append(row)
    return rows


def print_report(report: dict[str, Any]) -> None:
    method, selection = report["method"], report["selection"]
    effect = report.get("poison_effect")
    if effect is not None:
        print(f"\nWhat there is to unlearn: {effect['statement']}")
    print(
        f"\nUnlearning with {method['method']} on {selection['strategy']} "
        f"({selection['num_selected']:,} parameters: {', '.join(selection['layers']) or 'element-wise'}):"
    )
    print(format_table(report_rows(report)))
    comparison = {k: v for k, v in report.get("comparison", {}).items() if "_restored/" not in k and v is not None}
    if comparison:
        print("vs retrained: " + ", ".join(f"{k}={v:.4f}" for k, v in comparison.items()))
    chosen = {k: v for k, v in method.items() if k in ("step", "damping_relative", "epochs", "solver", "evaluations")}
    timings = {k: v for k, v in method.items() if k.startswith("seconds")}
    print(f"chosen: {chosen}  timings (s): " + ", ".join(f"{k}={v:.3f}" for k, v in timings.items()))
    print(f"report: {report.get('output_dir')}/report.json")


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
) -> str:
    """Profile the Hessian diagonal of a trained checkpoint's training loss (``lightning-unlearn profile``).

    Args:
        run: Training run directory, or a checkpoint file inside one.
        estimator: ``exact``, ``mc``, ``hutchinson`` or ``fisher``.
        split: ``train`` (the training set exactly as trained on) or ``val``.
        max_samples: Profile only the first ``max_samples`` samples.
        batch_size: Batch size of the profiling loader.
        num_draws: Sampled labels (``mc``) or probes (``hutchinson``) per sample / batch.
        seed: Seed of the random draws.
        strict: Refuse ``exact`` where it would not equal the Hessian diagonal.
        device: Where to compute (``cpu``, ``cuda``, ``cuda:1``, ...).
        output: Where to write the profile; default ``<run>/sharpness_profile.pt``.

    Returns:
        The path of the written profile.
    """
    from torch.utils.data import DataLoader

    from lightning_unlearn.curvature import ESTIMATORS, profile_model
    from lightning_unlearn.run import TrainingRun

    if estimator not in ESTIMATORS:  # checked before the (slow) loading of the run
        raise ValueError(f"`estimator` must be one of {sorted(ESTIMATORS)}, got {estimator!r}.")
    if split not in ("train", "val"):
        raise ValueError(f"`split` must be one of ('train', 'val'), got {split!r}.")
    training_run = TrainingRun.from_path(run)
    classifier = training_run.load_classifier(map_location=device)
    datamodule = training_run.datamodule()
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
    path = profile.save(output or training_run.profile_path)
    print(profile.to_table())
    print(f"Profile ({estimator}, {profile.num_samples} samples) written to {path}")
    return str(path)


def profile_main(args: list[str]) -> None:
    from jsonargparse import auto_cli

    auto_cli(profile_checkpoint, args=args)


def _train_main(args: list[str]) -> None:
    TrainCLI(args=args)


def _unlearn_main(args: list[str]) -> None:
    unlearn_main(args)


def _sweep_main(args: list[str]) -> None:
    from lightning_unlearn.sweep import main as sweep

    sweep(args)


def _demo_main(args: list[str]) -> None:
    from lightning_unlearn.demo import main as demo

    demo(args)


COMMANDS = {
    "train": _train_main,
    "unlearn": _unlearn_main,
    "profile": profile_main,
    "sweep": _sweep_main,
    "demo": _demo_main,
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lightning-unlearn`` console script and ``python -m lightning_unlearn``."""
    argv = sys.argv[1:] if argv is None else argv
    names = ", ".join(COMMANDS)
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: lightning-unlearn {{{names}}} ...\n\nRun `lightning-unlearn <command> --help` for details.")
        return
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"lightning-unlearn: the first argument must be one of {{{names}}}, got {argv[:1]}")
    # `sys.argv` is left as it is: under `strategy="ddp"` Lightning starts the other ranks by running it again
    COMMANDS[argv[0]](argv[1:])
