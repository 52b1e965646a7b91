"""Programmatic runs of the command-line jobs, shared by the demo and the benchmarks.

:func:`train` runs ``lightning-unlearn train fit`` (``TrainCLI``) and :func:`unlearn` one ``lightning-unlearn unlearn``
request (``UnlearnCLI`` + :func:`~lightning_unlearn.pipeline.run_unlearning`), with the repository's config files,
so a benchmark's numbers come from exactly what a user runs.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from lightning_unlearn.cli import RESULTS_FILENAME, TrainCLI, UnlearnCLI
from lightning_unlearn.console import quiet
from lightning_unlearn.evaluation.suite import EvaluationOptions
from lightning_unlearn.pipeline import run_unlearning

#: The config folder: shipped in the package as ``lightning_unlearn/configs`` (in the repository a symlink to the
#: top-level ``configs/``), so an installed wheel finds the same files as a checkout.
CONFIGS = Path(__file__).resolve().parent / "configs"
#: Arguments that keep Lightning quiet (no progress bars or model summaries).
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def available_configs() -> list[str]:
    """Every shipped config's name, relative to :data:`CONFIGS` (``mnist_cnn_targeted.yaml``, ``unlearn/x.yaml``)."""
    return sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))


def config_path(name: str) -> Path:
    """A shipped config by file name (``mnist_cnn_targeted.yaml``, ``unlearn/x``); see :data:`CONFIGS`."""
    path = CONFIGS / name
    if not path.suffix:
        path = path.with_suffix(".yaml")
    if not path.is_file():
        raise FileNotFoundError(f"No config {name!r} in {CONFIGS}; available: {available_configs()}.")
    return path


def train(
    configs: list[str], save_dir: str | Path, *extra: str, name: str | None = None, resume: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Train with ``TrainCLI`` (``fit`` then ``test``) and return the run directory and its ``results.json``.

    Args:
        configs: Config files of ``configs/`` applied in order (e.g. ``["mnist_cnn_targeted.yaml", "retrain.yaml"]``).
        save_dir: The TensorBoard logger's ``save_dir``.
        extra: Further command-line arguments (``--seed_everything 3``, ...).
        name: The logger's ``name`` (the run directory is ``save_dir/name/version_0`` when given).
        resume: With ``name``: reuse a finished run of that name (one holding ``results.json``) instead of training;
            an unfinished one (interrupted) is deleted and trained again.

    Returns:
        ``(run_dir, results)``; ``results["seconds"]`` is the wall time of fit + test (None when reused); ``results``
        holds only ``seconds`` with ``--test_after_fit false``.
    """
    args = ["fit"]
    for config in configs:
        args += ["-c", str(config_path(config))]
    args += ["--trainer.logger.init_args.save_dir", str(save_dir), *QUIET, *extra]
    if name is not None:
        args += ["--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", "0"]
        run_dir = Path(save_dir) / name / "version_0"
        if resume and (run_dir / RESULTS_FILENAME).is_file():
            return run_dir, json.loads((run_dir / RESULTS_FILENAME).read_text()) | {"seconds": None}
        if resume and run_dir.exists():
            shutil.rmtree(run_dir)
    start = time.perf_counter()
    with quiet():
        cli = TrainCLI(args=args)
    seconds = time.perf_counter() - start
    run_dir = Path(cli.trainer.log_dir)
    results_file = run_dir / RESULTS_FILENAME  # absent with --test_after_fit false
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    return run_dir, results | {"seconds": seconds}


def unlearn(
    config: str,
    run_dir: str | Path,
    *extra: str,
    reference: dict[str, float] | None = None,
    before: dict[str, float] | None = None,
    evaluation: EvaluationOptions | None = None,
    calibration: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """One unlearning request with ``configs/unlearn/<config>.yaml`` on ``run_dir``; returns the report.

    ``reference`` / ``before``: metrics of the retrained and the poisoned model (computed once per run by the caller,
    with the same ``evaluation`` options; a :class:`~lightning_unlearn.evaluation.distance.ReferenceMetrics` adds the
    per-sample output distances); ``calibration``: the relearning attack's calibration record
    (:func:`~lightning_unlearn.reference.evaluate_reference`); ``force``: as ``--force``.
    """
    args = ["-c", str(config_path(f"unlearn/{config}")), "--model.run", str(run_dir), "--name", config, *QUIET, *extra]
    with quiet():
        cli = UnlearnCLI(args=args)
        return run_unlearning(
            cli.trainer, cli.model, reference, evaluation=evaluation, before=before, calibration=calibration,
            force=force,
        )  # fmt: skip


__all__ = ["CONFIGS", "QUIET", "available_configs", "config_path", "train", "unlearn"]
