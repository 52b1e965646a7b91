"""The quiet console: Lightning's noise is dropped inside ``quiet()`` only, everything else passes, and the commands
print no warning lines."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
from conftest import debug_train_args

from lightning_unlearn.__main__ import main
from lightning_unlearn.console import NOISE_LOGS, NOISE_WARNINGS, quiet

ROOT = Path(__file__).resolve().parents[1]
NOISE_LOGGER = logging.getLogger("lightning.pytorch.utilities.rank_zero")


def _emit() -> None:
    warnings.warn(
        "`LightningModule.configure_optimizers` returned `None`, this fit will run with no optimizer", stacklevel=2
    )
    warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`", stacklevel=2)
    warnings.warn("a warning the user must see", stacklevel=2)
    NOISE_LOGGER.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
    NOISE_LOGGER.info("GPU available: False, used: False")
    NOISE_LOGGER.info("`Trainer.fit` stopped: `max_epochs=5` reached.")
    NOISE_LOGGER.info("a log line the user must see")


def test_quiet_drops_only_the_listed_noise_and_only_inside_the_block(caplog):
    caplog.set_level(logging.INFO, logger=NOISE_LOGGER.name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet():
            _emit()
    assert [str(w.message) for w in caught] == ["a warning the user must see"]
    assert [r.getMessage() for r in caplog.records] == ["a log line the user must see"]
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:  # outside the block nothing is filtered
        warnings.simplefilter("always")
        _emit()
    assert len(caught) == 3 and len(caplog.records) == 4


def test_importing_the_package_changes_no_warning_filter():
    import subprocess
    import sys

    script = (
        "import warnings, torch, torchvision, torchmetrics, lightning.pytorch, lightning.pytorch.cli, scipy.stats\n"
        "import sklearn.svm, sklearn.metrics, matplotlib, tensorboard, jsonargparse, numpy\n"
        "before = list(warnings.filters)  # the dependencies' own filters are theirs\n"
        "import lightning_unlearn, lightning_unlearn.__main__, lightning_unlearn.unlearn.module\n"
        "import lightning_unlearn.cli, lightning_unlearn.demo, lightning_unlearn.pipeline\n"
        "assert list(warnings.filters) == before, [f for f in warnings.filters if f not in before]\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("pattern", NOISE_WARNINGS + NOISE_LOGS)
def test_every_noise_pattern_is_a_valid_regex(pattern):
    import re

    re.compile(pattern)


def test_a_training_command_prints_no_noise(tmp_path, capfd, caplog):
    """`lightning-unlearn train` (what train.py and the demo run): no listed noise on the console."""
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["train", *debug_train_args(tmp_path, "--data.train_subset", "2000")])
    import re

    noisy = [str(w.message) for w in caught if any(re.match(p, str(w.message)) for p in NOISE_WARNINGS)]
    assert not noisy
    logged = [r.getMessage() for r in caplog.records if any(re.search(p, r.getMessage()) for p in NOISE_LOGS)]
    assert not logged
    out = capfd.readouterr()
    assert "Tip:" not in out.out + out.err and "LeafSpec" not in out.out + out.err
