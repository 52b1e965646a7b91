"""Command line: ``lightning-unlearn train …`` (= ``python train.py …``), built on ``LightningCLI``.

``python train.py fit -c configs/mnist_cnn_targeted.yaml`` trains a classifier on poisoned data, then (unless
``--test_after_fit false``) tests it, prints a results table and writes ``results.json`` into the run directory, which
also holds the checkpoint, ``poison.json``, the resolved ``config.yaml`` and the TensorBoard events.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from lightning_unlearn.data.datamodule import PoisonedDataModule
from lightning_unlearn.models.classifier import ClassifierModule
from lightning_unlearn.utils import atomic_write_text

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
    """Rows ``split | overall | target class | other classes`` from the logged ``<split>/acc*`` metrics."""
    rows = []
    for split in splits:
        row = {"split": split, "acc %": metrics.get(f"{split}/acc")}
        if f"{split}/acc_target" in metrics:
            row["target class %"] = metrics[f"{split}/acc_target"]
            row["other classes %"] = metrics.get(f"{split}/acc_other")
        rows.append(row)
    return rows


class TrainCLI(LightningCLI):
    """``LightningCLI`` for :class:`ClassifierModule` on :class:`PoisonedDataModule`, with dataset → model links."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        super().__init__(ClassifierModule, PoisonedDataModule, args=args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for attr in ("num_classes", "in_channels", "image_size"):
            parser.link_arguments(f"data.{attr}", f"model.{attr}", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="After `fit`, test the final model and print a table."
        )

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit", True) or self.trainer.fast_dev_run:
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        metrics = {key: float(value) for result in results for key, value in result.items()}
        self.report(metrics)

    @rank_zero_only
    def report(self, metrics: dict[str, float]) -> None:
        splits = list(getattr(self.datamodule, "test_split_names", ["test"]))
        print(
            "\nPoisoned model (" + f"{self.datamodule.poison.kind} poisoning, "
            f"{len(self.datamodule.record or [])} samples):"
        )
        print(format_table(accuracy_rows(metrics, splits)))
        log_dir = self.trainer.log_dir
        if log_dir is not None:
            payload = {"metrics": metrics, "checkpoint": self._best_checkpoint()}
            path = atomic_write_text(Path(log_dir) / RESULTS_FILENAME, json.dumps(payload, indent=1))
            print(f"Run directory: {log_dir}  (results: {path.name}, TensorBoard: tensorboard --logdir {log_dir})")

    def _best_checkpoint(self) -> str | None:
        callback = self.trainer.checkpoint_callback
        return getattr(callback, "best_model_path", None) or getattr(callback, "last_model_path", None) or None


COMMANDS = {"train": TrainCLI}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lightning-unlearn`` console script and ``python -m lightning_unlearn``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: lightning-unlearn {{{names}}} ...\n\nRun `lightning-unlearn <command> --help` for details.")
            return
        raise SystemExit(f"lightning-unlearn: the first argument must be one of {{{names}}}, got {argv[:1]}")
    command, rest = argv[0], argv[1:]
    saved = sys.argv
    sys.argv = [f"lightning-unlearn {command}", *rest]  # LightningCLI parses sys.argv; this also names the program
    try:
        COMMANDS[command]()
    finally:
        sys.argv = saved
