"""The unlearning pipeline's bookkeeping."""

import math

import pytest

from lightning_unlearn.pipeline import restored


def test_percent_restored_per_metric_and_noise_floor():
    before = {"test/acc": 98.0, "test/acc_target": 90.0, "test/acc_other": 98.9}
    after = {"test/acc": 98.5, "test/acc_target": 96.0, "test/acc_other": 98.8}
    reference = {"test/acc": 99.0, "test/acc_target": 98.0, "test/acc_other": 99.0}
    out = restored(before, after, reference)
    assert out["test_restored/acc"] == pytest.approx(50.0)
    assert out["test_restored/acc_target"] == pytest.approx(75.0)
    assert math.isnan(out["test_restored/acc_other"])  # a 0.1-point gap is within test noise
    assert restored(before, after, reference, min_gap=0.05)["test_restored/acc_other"] == pytest.approx(-100.0)
