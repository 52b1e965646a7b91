"""The training command, ``lightning-unlearn train`` (= ``python train.py``): :class:`TrainCLI`, a ``LightningCLI`` in
subclass mode for any ``LightningModule`` on any ``LightningDataModule`` (``--model my_pkg.MyModule --data
my_pkg.MyData``), by default :class:`ClassifierModule` on :class:`PoisonedDataModule`; and what every command's
parser shares (:data:`PROG`, :func:`parser_kwargs`). :mod:`lightning_unlearn.cli` holds the other commands.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import textwrap
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_unlearn.data.datamodule import PoisonedDataModule
from lightning_unlearn.models.classifier import ClassifierModule
from lightning_unlearn.reporting import accuracy_rows, format_table
from lightning_unlearn.run import RESULTS_FILENAME
from lightning_unlearn.utils import atomic_write_text

#: The command word of each command's parser (its ``prog``): ``usage: lightning-unlearn train …``.
PROG = "lightning-unlearn"
#: ``train``'s model and data module when the arguments name none (``--model`` / ``--data`` take any other).
DEFAULT_MODEL = f"{ClassifierModule.__module__}.{ClassifierModule.__qualname__}"
DEFAULT_DATA = f"{PoisonedDataModule.__module__}.{PoisonedDataModule.__qualname__}"
#: Attributes of the data module linked into the model's arguments of the same name, where both have them.
LINKED = ("num_classes", "in_channels", "image_size")


def _import(class_path: Any) -> Any:
    """The object at ``class_path`` (``package.module.Name``), or None."""
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return None


def parser_kwargs(kwargs: dict[str, Any], command: str, description: str) -> dict[str, Any]:
    """``kwargs["parser_kwargs"]`` with this project's defaults: no environment variables, ``prog`` naming the command
    (``usage: lightning-unlearn train …``), the command's description."""
    defaults = {"default_env": False, "prog": f"{PROG} {command}", "description": description}
    return {**defaults, **kwargs.get("parser_kwargs", {})}


class TrainArgumentParser(LightningArgumentParser):
    """The training parser (subclass mode): ``--help`` lists the options of the default classes
    (:class:`ClassifierModule`, :class:`PoisonedDataModule`) too, not only ``--model`` and ``--data``; a class given
    instead of a default one takes its own defaults (:meth:`get_defaults`)."""

    def get_defaults(self, skip_validation: bool = False, **kwargs: Any) -> Namespace:
        """The defaults, the default classes without their arguments' defaults (added at the end of parsing).

        jsonargparse keeps the arguments of the class in place that the class given next accepts: with the default
        classes' defaults in place, ``--data my_pkg.MyData`` would inherit PoisonedDataModule's ``batch_size`` (128)
        instead of taking MyData's own default.
        """
        defaults = super().get_defaults(skip_validation, **kwargs)
        for key, default in (("model", ClassifierModule), ("data", PoisonedDataModule)):
            spec = defaults.get(key)
            if isinstance(spec, Namespace) and "init_args" in spec and _import(spec.get("class_path")) is default:
                defaults[key] = Namespace(class_path=spec.class_path)
        return defaults

    def format_help(self) -> str:
        text = super().format_help()
        if not any(getattr(action, "dest", None) == "model" for action in self._actions):
            return text  # the parser of the subcommands, not of one of them
        side = LightningArgumentParser(
            usage=argparse.SUPPRESS, description=argparse.SUPPRESS, add_help=False, default_env=False
        )
        side.add_class_arguments(ClassifierModule, "model", skip=set(LINKED), fail_untyped=False)
        side.add_class_arguments(PoisonedDataModule, "data", fail_untyped=False)
        for group in side._action_groups:  # their `--model CONFIG` / `--data CONFIG`: `--model` means more here
            actions = group._group_actions
            group._group_actions = [a for a in actions if a.option_strings not in (["--model"], ["--data"])]
        intro = textwrap.fill(
            "Options of the default model and data module, ClassifierModule and PoisonedDataModule. Another "
            "LightningModule / LightningDataModule: `--model CLASS_PATH` / `--data CLASS_PATH`; its options: "
            "`--model.help CLASS_PATH` / `--data.help CLASS_PATH`. The data module's num_classes, in_channels and "
            "image_size are linked to the model's arguments of those names, where both have them.",
            width=79,
        )
        return f"{text}\n{intro}\n\n{side.format_help()}"


class TrainCLI(LightningCLI):
    """``LightningCLI`` for any ``LightningModule`` on any ``LightningDataModule`` (subclass mode: ``--model
    my_pkg.MyModule --data my_pkg.MyData``), by default :class:`ClassifierModule` on :class:`PoisonedDataModule`,
    with data module → model links (``num_classes``, ``in_channels``, ``image_size``: applied where the data module
    has the attribute and the model the argument, ignored otherwise)."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs["parser_kwargs"] = parser_kwargs(
            kwargs,
            "train",
            "Train a model: by default ClassifierModule on PoisonedDataModule (a classifier on poisoned data); "
            "`--model` / `--data` take any LightningModule / LightningDataModule by class path. "
            "`fit --help` lists the options.",
        )
        kwargs.setdefault("parser_class", TrainArgumentParser)
        # checkpoints written atomically beside their final path (a run killed mid-save keeps its last checkpoint)
        atomic = {"class_path": "lightning_unlearn.run.AtomicCheckpointIO"}
        kwargs["trainer_defaults"] = {"plugins": [atomic], **kwargs.get("trainer_defaults", {})}
        kwargs.update(subclass_mode_model=True, subclass_mode_data=True)
        super().__init__(None, None, args=args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}, "data": {"class_path": DEFAULT_DATA}})
        for attr in LINKED:
            parser.link_arguments(f"data.{attr}", f"model.init_args.{attr}", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="After `fit`, test the final model and print a table."
        )

    def before_instantiate_classes(self) -> None:
        """Refuse LightningCLI's ``--optimizer`` / ``--lr_scheduler`` for a model that takes its own (one way to
        set each: ``ClassifierModule``'s is ``--model.optimizer``); a model without them gets LightningCLI's."""
        config = self.config.get(str(self.subcommand), self.config)
        given = [key for key in ("optimizer", "lr_scheduler") if config.get(key) is not None]
        model = config.get("model")
        model_class = _import(getattr(model, "class_path", None)) if given and model is not None else None
        if model_class is None:
            return
        path = str(model.class_path)
        shadowed = [key for key in given if key in inspect.signature(model_class).parameters]
        if shadowed:
            given_options = " and ".join(f"`--{key}`" for key in shadowed)
            model_options = " and ".join(f"`--model.{key}`" for key in shadowed)
            self.parser.error(
                f"{given_options} would replace what {path.rsplit('.', 1)[-1]} takes as {model_options} (its "
                f"`configure_optimizers`): set {model_options} instead."
            )

    def before_fit(self) -> None:
        # Fix the run directory (the logger's version) now: ranks spawned by `ddp_spawn` get this process's logger,
        # so the parent, the ranks and the test that follows all use one directory instead of one each.
        _ = self.trainer.log_dir

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit", True) or self.trainer.fast_dev_run:
            return
        missing = _cannot_test(self.model, self.datamodule)
        if missing:
            rank_zero_only(print)(f"Not tested after fit (`--test_after_fit`): {missing}.")
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        metrics = {key: float(value) for result in results for key, value in result.items()}
        self.report(metrics, self.trainer.log_dir)  # `log_dir` on every rank: under DDP it is a collective

    @rank_zero_only
    def report(self, metrics: dict[str, float], log_dir: str | None) -> None:
        if isinstance(self.datamodule, PoisonedDataModule):
            splits = list(getattr(self.datamodule, "test_split_names", ["test"]))
            kind, count = self.datamodule.poison.kind, len(self.datamodule.record or [])
            removal = self.datamodule.spec.keeps_labels  # a forgetting scenario: clean data, nothing poisoned
            if getattr(self.datamodule, "drop_poisoned", False):
                what = "samples to forget" if removal else "poisoned samples"
                print(f"\nModel retrained without the {count} {what} ({kind}; the reference):")
            elif removal:
                print(f"\nModel trained on clean data ({kind} forgetting scenario: {count} samples to forget):")
            else:
                print(f"\nPoisoned model ({kind} poisoning, {count} samples):")
            print(format_table(accuracy_rows(metrics, splits)))
        else:
            print(f"\nTest metrics of {type(self.model).__name__}:")
            print(format_table([{"metric": key, "value": value} for key, value in sorted(metrics.items())]))
        if log_dir is not None:
            payload = {"metrics": metrics, "checkpoint": self._best_checkpoint()}
            path = atomic_write_text(Path(log_dir) / RESULTS_FILENAME, json.dumps(payload, indent=1))
            print(f"Run directory: {log_dir}  (results: {path.name}, TensorBoard: tensorboard --logdir {log_dir})")

    def _best_checkpoint(self) -> str | None:
        callback = self.trainer.checkpoint_callback
        return getattr(callback, "best_model_path", None) or getattr(callback, "last_model_path", None) or None


def _cannot_test(model: LightningModule, datamodule: LightningDataModule | None) -> str | None:
    """Why ``trainer.test`` cannot run on ``model`` and ``datamodule`` (no ``test_step``, no test loader), or None."""
    if not is_overridden("test_step", model):
        return f"{type(model).__name__} has no test_step"
    if datamodule is not None and is_overridden("test_dataloader", datamodule):
        return None
    if is_overridden("test_dataloader", model):
        return None
    owner = type(datamodule).__name__ if datamodule is not None else type(model).__name__
    return f"{owner} has no test_dataloader"
