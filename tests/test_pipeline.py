"""The unlearning pipeline's bookkeeping."""

import math

import pytest

from lightning_unlearn.evaluation.suite import restored


def test_percent_restored_per_metric_and_noise_floor():
    before = {"test/acc": 98.0, "test/acc_target": 90.0, "test/acc_other": 98.9}
    after = {"test/acc": 98.5, "test/acc_target": 96.0, "test/acc_other": 98.8}
    reference = {"test/acc": 99.0, "test/acc_target": 98.0, "test/acc_other": 99.0}
    out = restored(before, after, reference)
    assert out["test_restored/acc"] == pytest.approx(50.0)
    assert out["test_restored/acc_target"] == pytest.approx(75.0)
    assert math.isnan(out["test_restored/acc_other"])  # a 0.1-point gap is within test noise
    assert restored(before, after, reference, min_gap=0.05)["test_restored/acc_other"] == pytest.approx(-100.0)


def test_layer_sweep_writes_results_and_figure(poisoned_run, tmp_path):
    import json

    from lightning_unlearn.sweep import layer_sweep, spearman

    result = layer_sweep(str(poisoned_run), out=str(tmp_path), accelerator="cpu")
    assert [row["layer"] for row in result["layers"]] == ["net.conv1", "net.conv2", "net.fc1", "net.fc2"]
    for row in result["layers"]:
        assert row["improvement"] == pytest.approx(row["after"] - row["before"])
        assert row["improvement"] >= 0 or row["step"] > 0  # step 0 ("no change") leaves the accuracy as it was
    expected = spearman([r["mean_diagonal"] for r in result["layers"]], [r["improvement"] for r in result["layers"]])
    assert json.loads((tmp_path / "sweep.json").read_text())["spearman"] == pytest.approx(expected, nan_ok=True)
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))


def test_spearman_reference_values():
    from lightning_unlearn.sweep import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert math.isnan(spearman([1, 2], [1, 2]))
