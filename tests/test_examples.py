"""The examples in ``examples/`` run as a user runs them (a fresh interpreter, from the repository root) and do what
their docstrings say: the poison harms the attacked class, and unlearning restores it measurably."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")  # the examples' data: scikit-learn's digits (installed by `make install`, extra `eval`)

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def restored(output: str) -> float:
    match = re.search(r"% restored(?: \(class 3\))?:? (-?[\d.]+)", output)
    assert match, output
    return float(match.group(1))


def harm(output: str) -> float:
    match = re.search(r"^Harm (-?[\d.]+) points", output, re.MULTILINE)
    assert match, output
    return float(match.group(1))


@pytest.mark.parametrize("name", ["own_lightning_module.py", "plain_module.py"])
def test_example_unlearns_a_poison_that_bites(name):
    before = set(ROOT.iterdir())
    output = run_example(name)
    assert harm(output) >= 15  # the label flip costs class 3 tens of points
    assert restored(output) >= 50  # and unlearning gives most of them back
    assert set(ROOT.iterdir()) == before  # nothing left behind in the working directory


def test_the_transformer_example_runs_without_workarounds_or_console_warnings():
    """``examples/own_transformer.py``: a tiny ViT (attention, GELU, LayerNorm, positional embedding), dict items, the
    profiler's exact GGN diagonal after fit and the default request — restored, with no warning on the console but
    Lightning's own deprecation of torch's pytree API (raised inside Lightning, on any fit with this torch)."""
    result = subprocess.run(
        [sys.executable, "-W", "default", str(ROOT / "examples" / "own_transformer.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout
    assert "the ggn diagonal of 1200 samples" in output
    assert harm(output) >= 15 and restored(output) >= 50
    warned = [line for line in result.stderr.splitlines() if re.search(r"[Ww]arn|: [A-Z]\w*Warning", line)]
    lightning_internal = [line for line in warned if "lightning/pytorch/utilities/_pytree.py" in line]
    assert warned == lightning_internal, warned
