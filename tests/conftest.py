"""Shared fixtures: real MNIST (offline copy) loaded once per session."""

import os

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(scope="session")
def mnist():
    from lightning_unlearn.data.sources import load_mnist

    return load_mnist()
