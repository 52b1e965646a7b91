"""Shared fixtures: real MNIST (offline copy) loaded once per session."""

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(scope="session")
def mnist():
    from lightning_unlearn.data.sources import load_mnist

    return load_mnist()


ROOT = Path(__file__).resolve().parents[1]


def debug_train_args(save_dir: Path, *extra: str) -> list[str]:
    """``train.py`` arguments: the MNIST CNN on a small poisoned subset of real MNIST, profiler attached."""
    return [
        "fit",
        "-c",
        str(ROOT / "configs" / "mnist_cnn_targeted.yaml"),
        "-c",
        str(ROOT / "configs" / "debug.yaml"),
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        *extra,
    ]


def train_debug_run(save_dir: Path, *extra: str) -> Path:
    """Train with :func:`debug_train_args` in this process; return the run directory."""
    from lightning_unlearn.cli import TrainCLI

    cli = TrainCLI(args=debug_train_args(save_dir, *extra))
    return Path(cli.trainer.log_dir)


#: The session runs' data and schedule: 4,000 MNIST training images, 200 of class 9 poisoned, 2 epochs.
SESSION_RUN = ("--data.train_subset", "4000", "--data.poison.count", "200", "--trainer.max_epochs", "2")


@pytest.fixture(scope="session")
def poisoned_run(tmp_path_factory):
    """:data:`SESSION_RUN`, poisoned; profile of the exact Hessian diagonal."""
    return train_debug_run(tmp_path_factory.mktemp("runs"), *SESSION_RUN)


@pytest.fixture(scope="session")
def retrained_run(tmp_path_factory):
    """The reference of :func:`poisoned_run`: the same data and schedule, retrained without the poisoned samples."""
    retrain = ("-c", str(ROOT / "configs" / "retrain.yaml"))
    return train_debug_run(tmp_path_factory.mktemp("runs_retrained"), *retrain, *SESSION_RUN)


@pytest.fixture(scope="session")
def bn_run(tmp_path_factory):
    """The same CNN with BatchNorm after each convolution, one short epoch."""
    return train_debug_run(tmp_path_factory.mktemp("runs_bn"), "--model.arch_kwargs", '{"batch_norm": true}')
