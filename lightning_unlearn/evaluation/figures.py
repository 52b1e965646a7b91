"""Figures for TensorBoard: the one-step search's validation curve and the relearning attack's recovery curves.

Figures are drawn only where a TensorBoard logger will receive them (matplotlib's ``Agg`` backend, no screen needed),
on global rank zero, and closed after logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any


def _tensorboard_loggers(loggers: Iterable[Any]) -> list[Any]:
    from lightning.pytorch.loggers import TensorBoardLogger

    return [logger for logger in loggers if isinstance(logger, TensorBoardLogger)]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the ``Agg`` backend (no screen needed; a backend the user chose stays), imported on
    first use: every figure of the package and its benchmarks is drawn through it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def log_figure(loggers: Iterable[Any], tag: str, make: Callable[[], Any], step: int = 0) -> bool:
    """Draw ``make()`` and add it to every TensorBoard logger among ``loggers``; returns whether it was logged.
    Nothing is drawn without a TensorBoard logger. Call on global rank zero only."""
    targets = _tensorboard_loggers(loggers)
    if not targets:
        return False
    plt = pyplot()
    figure = make()
    for logger in targets:
        logger.experiment.add_figure(tag, figure, global_step=step, close=False)
    plt.close(figure)
    return True


def step_search_figure(candidates: list[dict[str, Any]], result: dict[str, Any], title: str) -> Any:
    """Validation loss of every step a one-step search evaluated, by phase, the chosen one marked; "no change"
    (τ = 0) drawn as a horizontal line. One curve per searched setting (candidate selection, damping)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    settings = list(dict.fromkeys(_setting(c) for c in candidates))
    markers = {"grid": "o", "extend": "s", "refine": "x"}
    for setting in settings:
        points = sorted((c for c in candidates if _setting(c) == setting and c["step"] > 0), key=lambda c: c["step"])
        label = setting or "validation loss"
        (line,) = ax.plot([c["step"] for c in points], [c["val_loss"] for c in points], lw=0.8, label=label)
        for phase, marker in markers.items():
            chosen = [c for c in points if c["phase"] == phase]
            ax.scatter(
                [c["step"] for c in chosen], [c["val_loss"] for c in chosen], marker=marker, color=line.get_color()
            )
    zero = [c["val_loss"] for c in candidates if c["step"] == 0 and math.isfinite(c["val_loss"])]
    if zero:
        ax.axhline(zero[0], color="grey", lw=0.8, ls="--", label="no change (τ = 0)")
    if result.get("step"):
        ax.axvline(result["step"], color="black", lw=0.8, label=f"chosen τ = {result['step']:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("step size τ (o grid, s extension, x golden-section refinement)")
    ax.set_ylabel("validation cross-entropy")
    ax.set_title(f"{title}: step search on the validation split")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _setting(candidate: dict[str, Any]) -> str:
    """A curve's label: the candidate selection and the damping it was searched with, where those vary."""
    parts = [str(candidate["selection"])] if "selection" in candidate else []
    if "damping_relative" in candidate:
        parts.append(f"damping {candidate['damping_relative']:g}")
    return ", ".join(parts)


def relearn_figure(curves: dict[str, tuple[list[int], list[float]]], title: str = "relearning attack") -> Any:
    """Held-out forget accuracy (poisoned labels) over the attack's steps, one curve per model."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (steps, values) in curves.items():
        ax.plot(steps, values, marker="o", ms=3, label=label)
    ax.set_xlabel("attack step (SGD on part of the forget set, poisoned labels)")
    ax.set_ylabel("held-out forget accuracy w.r.t. poisoned labels (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def curve_of(metrics: dict[str, float]) -> tuple[list[int], list[float]]:
    """The recovery curve stored in flat metrics as ``relearn/curve@<step>`` (see ``evaluate_model``)."""
    points = sorted((int(k.split("@", 1)[1]), v) for k, v in metrics.items() if k.startswith("relearn/curve@"))
    return [s for s, _ in points], [v for _, v in points]


__all__ = ["curve_of", "log_figure", "relearn_figure", "step_search_figure"]
