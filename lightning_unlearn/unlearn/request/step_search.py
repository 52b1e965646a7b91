"""Choosing a one-step update's size on validation: bracket on a log grid, then golden-section search on log τ.

A one-step method moves the selected parameters along a fixed direction ``d``: ``θ(τ) = θ − τ d``. The step size
``τ`` is chosen by minimising a score ``f(τ)`` measured on the clean validation split (by default the validation
cross-entropy; accuracy on 10,000 images moves in steps of 0.01 points and is too coarse a signal to place a step).
:func:`search_step` does it in three phases, every evaluation recorded:

1. **grid**: ``f(0)`` ("no change") and ``f`` on the coarse log grid the method gives;
2. **extend**: while the best step is the grid's largest, try ``ratio`` times larger steps; while it is the smallest
   (or "no change" is best), try ``ratio`` times smaller ones, each at most ``max_extend`` times;
3. **refine**: once the best positive step ``τ*`` has evaluated neighbours ``τ⁻ < τ* < τ⁺`` that both score worse,
   golden-section search for the minimum of ``u ↦ f(10ᵘ)`` on ``[log₁₀ τ⁻, log₁₀ τ⁺]`` until the bracket is
   narrower than ``tol`` decades (default 0.01: the chosen step is within about 2.3 % of the bracket's minimiser).

The result is the evaluated step with the lowest score, "no change" included, so the search never returns a step
that scores worse on validation than leaving the model as it is. With a unimodal ``f`` on the bracket the refinement
finds its minimum to the tolerance (tested on known functions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: The golden ratio's conjugate, 1/φ.
INV_PHI = (math.sqrt(5) - 1) / 2
#: Default tolerance of the refinement, in decades of τ.
DEFAULT_TOL = 0.01


@dataclass
class StepSearch:
    """Every step evaluated, in order, with its phase and measurements; ``best`` is the chosen one.

    Attributes:
        evaluations: ``{"step", "phase", "score", **extra}`` dicts (``extra``: whatever the score function returned
            besides the score, e.g. validation accuracy and loss).
        tol: The refinement's tolerance (decades).
        bracket: ``(τ⁻, τ⁺)`` the refinement searched, or None if none was found (best at an end of the range, or
            "no change").
    """

    evaluations: list[dict[str, Any]] = field(default_factory=list)
    tol: float = DEFAULT_TOL
    bracket: tuple[float, float] | None = None

    @property
    def best(self) -> dict[str, Any]:
        """The evaluation with the lowest score (non-finite scores count as +∞; ties: the smaller step)."""
        return min(self.evaluations, key=lambda e: (_finite(e["score"]), e["step"]))

    def scored(self, step: float) -> float | None:
        for e in self.evaluations:
            if e["step"] == step:
                return e["score"]
        return None


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def search_step(
    evaluate: Callable[[float], tuple[float, dict[str, Any]]],
    grid: list[float],
    *,
    refine: bool = True,
    tol: float = DEFAULT_TOL,
    ratio: float = math.sqrt(10.0),
    max_extend: int = 4,
    max_refine: int = 40,
) -> StepSearch:
    """Minimise ``evaluate(τ)[0]`` over ``τ ≥ 0`` (see the module docstring).

    Args:
        evaluate: ``τ ↦ (score, extra)``; lower scores are better; ``extra`` is stored with the evaluation.
        grid: The coarse grid of positive steps (sorted here).
        refine: Run the extend and refine phases (False: the grid and "no change" only).
        tol: Width, in decades, below which the golden-section bracket counts as converged.
        ratio: Factor between successive steps of the extend phase.
        max_extend: Extensions in each direction at most.
        max_refine: Golden-section evaluations at most.

    Raises:
        ValueError: On an empty grid or non-positive steps, ``tol <= 0`` or ``ratio <= 1``.
    """
    grid = sorted(set(grid))
    if not grid or any(not math.isfinite(s) or s <= 0 for s in grid):
        raise ValueError(f"`steps` must be a non-empty list of positive step sizes, got {grid}.")
    if not tol > 0 or not ratio > 1:
        raise ValueError(f"`tol` must be > 0 and `ratio` > 1, got {tol} and {ratio}.")
    search = StepSearch(tol=tol)

    def run(step: float, phase: str) -> float:
        known = search.scored(step)
        if known is not None:
            return known
        score, extra = evaluate(step)
        search.evaluations.append({"step": step, "phase": phase, "score": float(score), **extra})
        return float(score)

    for step in [0.0, *grid]:
        run(step, "grid")
    if not refine:
        return search

    for _ in range(max_extend):  # the minimum lies beyond the largest step: extend upwards
        largest = max(e["step"] for e in search.evaluations)
        if search.best["step"] != largest:
            break
        run(largest * ratio, "extend")
    for _ in range(max_extend):  # "no change" or the smallest step is best: try smaller steps
        positive = sorted(e["step"] for e in search.evaluations if e["step"] > 0)
        if search.best["step"] not in (0.0, positive[0]):
            break
        run(positive[0] / ratio, "extend")

    bracket = _bracket(search)
    if bracket is None:
        return search
    search.bracket = bracket
    lo, hi = math.log10(bracket[0]), math.log10(bracket[1])
    x1, x2 = hi - INV_PHI * (hi - lo), lo + INV_PHI * (hi - lo)
    f1, f2 = run(10**x1, "refine"), run(10**x2, "refine")
    for _ in range(max_refine - 2):
        if hi - lo < tol:
            break
        if _finite(f1) <= _finite(f2):  # the minimum lies in [lo, x2]
            hi, x2, f2 = x2, x1, f1
            x1 = hi - INV_PHI * (hi - lo)
            f1 = run(10**x1, "refine")
        else:  # in [x1, hi]
            lo, x1, f1 = x1, x2, f2
            x2 = lo + INV_PHI * (hi - lo)
            f2 = run(10**x2, "refine")
    return search


def _bracket(search: StepSearch) -> tuple[float, float] | None:
    """Neighbours ``(τ⁻, τ⁺)`` of the best positive step that both score worse, if there are such."""
    best = search.best
    if best["step"] == 0.0:
        return None
    positive = sorted((e["step"], _finite(e["score"])) for e in search.evaluations if e["step"] > 0)
    steps = [s for s, _ in positive]
    i = steps.index(best["step"])
    if i == 0 or i == len(steps) - 1:
        return None
    return steps[i - 1], steps[i + 1]


__all__ = ["DEFAULT_TOL", "StepSearch", "search_step"]
