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
