"""The layer sweep (the seed paper's Fig. 1): unlearn with each weight layer alone, relate the gain to its sharpness.

For every Linear/conv layer of a training run, one unlearning request that may change only that layer (same method,
same validation-based step search), then: mean Hessian diagonal of the layer vs improvement of the poison's attacked
metric (the attacked class's test accuracy for a label flip or targeted poisoning, the attack success rate for a
backdoor — improvement = its reduction —, else the overall test accuracy), Spearman's rank correlation between the
two, a scatter plot (PNG and TensorBoard) and ``sweep.json``. ``lightning-unlearn sweep RUN_DIR [--reference
RETRAIN_DIR]``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from lightning_unlearn.outputs import OutputClaim, safe_folder_name
from lightning_unlearn.utils import atomic_write, atomic_write_text

METHOD_CONFIGS = {"first_order": "FirstOrder", "second_order": "SecondOrder"}


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than 3 points or a constant input."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    return float(spearmanr(x, y).statistic)


SWEEP_FILES = ("sweep.json", "sweep.png")


def sweep_foreign(folder: Path) -> list[str]:
    """Entries of an existing sweep folder that no sweep writes (a sweep holds ``sweep.json``, ``sweep.png``,
    ``tensorboard/`` and one request folder per layer)."""
    from lightning_unlearn.pipeline import request_foreign

    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            foreign.append(entry.name)
        elif entry.is_file() and entry.name not in SWEEP_FILES:
            foreign.append(entry.name)
        elif entry.is_dir() and entry.name != "tensorboard":
            foreign += [f"{entry.name}/{name}" for name in request_foreign(entry)]
    return foreign


def describe_sweep_folder(folder: Path) -> str:
    """What an existing sweep folder holds, in words (for the refusal to replace it)."""
    layers = sorted(p.name for p in folder.iterdir() if (p / "report.json").is_file())
    files = [name for name in SWEEP_FILES if (folder / name).is_file()]
    if not layers and not files:
        return ", ".join(sorted(p.name for p in folder.iterdir()))
    parts = [f"report.json of {len(layers)} layers ({', '.join(layers[:4])}{' …' if len(layers) > 4 else ''})"]
    return " and ".join(parts[: bool(layers)] + [", ".join(files)] * bool(files)) + " from an earlier sweep"


def layer_sweep(
    run: str,
    reference: str | None = None,
    method: str = "first_order",
    out: str | None = None,
    accelerator: str = "auto",
    overwrite: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Unlearn with each weight layer alone and relate the improvement to the layer's mean Hessian diagonal.

    The output folder is claimed before any work and written whole (:class:`~lightning_unlearn.outputs.OutputClaim`):
    a second sweep into it is refused (unless ``overwrite``), a folder holding anything a sweep does not write is
    never replaced, and a failed or killed sweep leaves the folder as it was.

    Args:
        run: Training run directory (with its profile, or one is computed).
        reference: Run directory of the model retrained without the poisoned samples (adds % restored).
        method: ``first_order`` or ``second_order`` (one-step methods; the step is searched on validation per layer).
        out: Output folder; default ``<run>/sweep_<method>``.
        accelerator: Lightning accelerator for the requests.
        overwrite: Replace the results of an earlier sweep in ``out``, whole (refused by default).
        force: Sweep an unlearned checkpoint whose chain already unlearned this forget set (refused by default, as
            a request is: :func:`~lightning_unlearn.ledger.check_repeat`).

    Returns:
        The sweep results (also written to ``sweep.json``, ``sweep.png`` and TensorBoard in ``out``).
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_unlearn.checkpoints import verify_archive
    from lightning_unlearn.evaluation.suite import ACCURACY_ONLY, ATTACKED_METRICS
    from lightning_unlearn.pipeline import run_unlearning
    from lightning_unlearn.reference import reference_metrics
    from lightning_unlearn.run import TrainingRun, check_profile
    from lightning_unlearn.selection import DEFAULT_LAYER_TYPES, NamedLayers
    from lightning_unlearn.unlearn import UnlearnModule, get_method
    from lightning_unlearn.unlearn.module import unlearn_trainer

    if method not in METHOD_CONFIGS:
        raise ValueError(f"`method` must be one of {tuple(METHOD_CONFIGS)}, got {method!r}.")
    training_run = TrainingRun.from_path(run)
    training_run.check_unlearnable()
    final = Path(out or training_run.home / f"sweep_{method}")
    claim = OutputClaim.acquire(
        final, overwrite=overwrite, describe=describe_sweep_folder, foreign=sweep_foreign, what="sweep"
    )
    with claim:
        folder = claim.staging
        probe = UnlearnModule(run, get_method(method))
        if training_run.profile_path.is_file():
            verify_archive(training_run.profile_path, "sharpness profile")
        profile = probe.require_profile()
        check_profile(profile, probe, str(training_run.profile_path))
        datamodule = probe.datamodule
        ref = reference_metrics(reference, datamodule, ACCURACY_ONLY, poisoned=training_run) if reference else None
        key, direction, _ = ATTACKED_METRICS.get(datamodule.spec.kind, ("test/acc", -1, "test accuracy"))
        rows = []
        for stats in profile.layer_stats():
            if stats.type not in DEFAULT_LAYER_TYPES:
                continue
            module = UnlearnModule(run, get_method(method), NamedLayers([stats.name]))
            trainer = unlearn_trainer(accelerator=accelerator)
            # layer names are the model's own parameter names (checked above): one folder inside the sweep's
            report = run_unlearning(
                trainer,
                module,
                ref,
                out_dir=folder / safe_folder_name(stats.name, "layer"),
                evaluation=ACCURACY_ONLY,
                force=force,
            )
            rows.append(
                {
                    "layer": stats.name,
                    "type": stats.type,
                    "params": stats.numel,
                    "mean_diagonal": stats.mean,
                    "step": report["method"].get("step"),
                    "before": report["before"][key],
                    "after": report["after"][key],
                    "improvement": -direction * (report["after"][key] - report["before"][key]),
                    "test_acc_after": report["after"]["test/acc"],
                    "restored": report.get("restored", {}).get(key.replace("/", "_restored/", 1)),
                    "tow": report.get("comparison", {}).get("tow"),
                }
            )
        rho = spearman([r["mean_diagonal"] for r in rows], [r["improvement"] for r in rows])
        result = {"run": str(training_run.directory), "method": method, "metric": key, "spearman": rho, "layers": rows}
        atomic_write_text(folder / "sweep.json", json.dumps(result, indent=1, default=str))
        figure = sweep_figure(rows, key, rho)
        atomic_write(folder / "sweep.png", lambda handle: figure.savefig(handle, format="png", dpi=120))
        logger = TensorBoardLogger(str(folder), name="tensorboard")
        logger.experiment.add_figure("sweep/improvement_vs_mean_diagonal", figure)
        logger.log_metrics({"sweep/spearman": rho if math.isfinite(rho) else 0.0})
        logger.finalize("success")
        for row in rows:  # the reports name the folder they end up in
            _rename_output_dir(folder / row["layer"], final / row["layer"])
    from lightning_unlearn.reporting import format_table

    print(
        format_table(
            [
                {
                    k: r[k]
                    for k in ("layer", "type", "params", "mean_diagonal", "step", "before", "after", "improvement")
                }
                for r in rows
            ],
            floatfmt=".4g",
        )
    )
    print(f"Spearman rank correlation (mean diagonal vs improvement of {key}): {rho:.3f}")
    print(f"written: {final / 'sweep.json'}, {final / 'sweep.png'}")
    return result


def _rename_output_dir(staged: Path, final: Path) -> None:
    """Point a layer's ``report.json`` (written in the sweep's staging folder) at the folder it ends up in."""
    path = staged / "report.json"
    report = json.loads(path.read_text())
    report["output_dir"] = str(final)
    atomic_write_text(path, json.dumps(report, indent=1))


def sweep_figure(rows: list[dict[str, Any]], key: str, rho: float) -> Any:
    """Scatter of improvement vs mean Hessian diagonal (log x), one labelled point per layer."""
    from lightning_unlearn.evaluation.figures import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs = [r["mean_diagonal"] for r in rows]
    ys = [r["improvement"] for r in rows]
    ax.scatter(xs, ys, color="tab:blue")
    for r in rows:
        ax.annotate(
            r["layer"], (r["mean_diagonal"], r["improvement"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("mean Hessian diagonal of the layer")
    ax.set_ylabel(f"improvement of {key} (points)")
    ax.set_title(f"one layer at a time (Spearman ρ = {rho:.2f})")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    """``lightning-unlearn sweep ARGS``: :func:`layer_sweep` from the command line (``-c`` / ``--config`` too)."""
    from lightning_unlearn.cli import function_main

    function_main(layer_sweep, "sweep", sys.argv[1:] if argv is None else argv)
