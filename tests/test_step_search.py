"""The one-step methods' step search: bracketing on a log grid, golden-section refinement, "no change" kept."""

import math
import random

import pytest

from lightning_unlearn.unlearn.request.step_search import search_step

HALF_DECADES = [10 ** (e / 2) for e in range(-12, -3)]  # 1e-6 ... 1e-2, the first-order default grid


def _counted(f):
    calls = []

    def evaluate(step):
        calls.append(step)
        return f(step), {"value": f(step)}

    return evaluate, calls


@pytest.mark.parametrize("optimum", [3.7e-4, 1.1e-6 * 5, 2.2e-3, 6.5e-5])
@pytest.mark.parametrize("tol", [0.01, 0.001])
def test_refinement_finds_the_minimum_of_a_known_function_to_tolerance(optimum, tol):
    def loss(step):  # unimodal in log τ, minimum at `optimum`, "no change" worse than every step nearby
        return 1.0 if step == 0 else (math.log10(step) - math.log10(optimum)) ** 2

    evaluate, calls = _counted(loss)
    search = search_step(evaluate, HALF_DECADES, tol=tol)
    assert abs(math.log10(search.best["step"]) - math.log10(optimum)) <= tol
    assert search.bracket is not None and search.bracket[0] < optimum < search.bracket[1]
    assert {e["phase"] for e in search.evaluations} >= {"grid", "refine"}
    assert len(calls) == len(set(calls)) == len(search.evaluations)  # every step evaluated once
    assert len(calls) <= len(HALF_DECADES) + 1 + 40


def test_an_asymmetric_valley_and_golden_section_count():
    optimum = 1.3e-4

    def loss(step):
        u = math.log10(step) - math.log10(optimum) if step else 5.0
        return u * u * (3.0 if u > 0 else 1.0) + 0.2

    search = search_step(lambda s: (loss(s), {}), HALF_DECADES, tol=0.01)
    assert abs(math.log10(search.best["step"]) - math.log10(optimum)) <= 0.01
    refined = [e for e in search.evaluations if e["phase"] == "refine"]
    # the bracket spans one decade: golden section needs log(0.01)/log(0.618) ≈ 10 narrowings
    assert 9 <= len(refined) <= 13


def test_minimum_beyond_the_grid_is_reached_by_extension():
    optimum = 0.5  # 1.7 decades above the grid's largest step

    def loss(step):
        return 9.0 if step == 0 else (math.log10(step) - math.log10(optimum)) ** 2

    search = search_step(lambda s: (loss(s), {}), HALF_DECADES, tol=0.01)
    assert any(e["phase"] == "extend" for e in search.evaluations)
    assert abs(math.log10(search.best["step"]) - math.log10(optimum)) <= 0.01


def test_no_step_helps_gives_no_change():
    search = search_step(lambda s: (1.0 + s, {}), HALF_DECADES)
    assert search.best["step"] == 0.0
    assert search.bracket is None
    assert min(e["step"] for e in search.evaluations if e["step"] > 0) < min(HALF_DECADES)  # smaller steps tried


def test_never_worse_than_no_change_on_random_functions():
    rng = random.Random(0)
    for _ in range(200):
        table = {}

        def loss(step, table=table):  # an arbitrary, non-unimodal function of the step (NaNs and infs included)
            if step not in table:
                table[step] = rng.choice([rng.uniform(0, 2), rng.uniform(0, 2), math.nan, math.inf])
            return table[step]

        search = search_step(lambda s: (loss(s), {}), HALF_DECADES)
        zero = search.scored(0.0)
        best = search.best["score"]
        assert (not math.isfinite(zero)) or (math.isfinite(best) and best <= zero)
        grid_best = min(
            (e["score"] for e in search.evaluations if e["phase"] == "grid" and math.isfinite(e["score"])),
            default=math.inf,
        )
        assert (not math.isfinite(grid_best)) or best <= grid_best


def test_grid_only_and_bad_arguments():
    search = search_step(lambda s: ((s - 1e-4) ** 2, {}), HALF_DECADES, refine=False)
    assert [e["step"] for e in search.evaluations] == [0.0, *HALF_DECADES]
    assert search.best["step"] == 1e-4
    with pytest.raises(ValueError, match="`steps`"):
        search_step(lambda s: (s, {}), [])
    with pytest.raises(ValueError, match="`steps`"):
        search_step(lambda s: (s, {}), [1e-3, -1.0])
    with pytest.raises(ValueError, match="`tol`"):
        search_step(lambda s: (s, {}), [1e-3], tol=0)
