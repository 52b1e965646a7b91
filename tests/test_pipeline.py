"""The unlearning pipeline's bookkeeping."""

import math

import pytest

from lightning_unlearn.evaluation.suite import restored


def test_percent_restored_per_metric_and_noise_floor():
    before = {"test/acc": 98.0, "test/acc_attacked": 90.0, "test/acc_other": 98.9}
    after = {"test/acc": 98.5, "test/acc_attacked": 96.0, "test/acc_other": 98.8}
    reference = {"test/acc": 99.0, "test/acc_attacked": 98.0, "test/acc_other": 99.0}
    out = restored(before, after, reference)
    assert out["test_restored/acc"] == pytest.approx(50.0)
    assert out["test_restored/acc_attacked"] == pytest.approx(75.0)
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
    # a second sweep into the same folder is refused before any work, unless told to overwrite
    with pytest.raises(FileExistsError, match=r"already holds report\.json"):
        layer_sweep(str(poisoned_run), out=str(tmp_path), accelerator="cpu")
    again = layer_sweep(str(poisoned_run), out=str(tmp_path), accelerator="cpu", overwrite=True)
    assert [row["step"] for row in again["layers"]] == [row["step"] for row in result["layers"]]


def test_spearman_reference_values():
    from lightning_unlearn.sweep import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert math.isnan(spearman([1, 2], [1, 2]))


def test_evaluate_model_matches_independent_references(poisoned_run):
    """One pass per split gives the same accuracies as a hand loop, the same MIA numbers as the loader-based
    attacks, and the same relearning attack as calling it directly."""
    import torch

    from lightning_unlearn.evaluation import mia_summary, relearning_attack
    from lightning_unlearn.evaluation.mia import mia_salun
    from lightning_unlearn.evaluation.suite import EvaluationOptions, evaluate_model, salun_metric_key
    from lightning_unlearn.run import TrainingRun

    training_run = TrainingRun.from_path(poisoned_run)
    datamodule, net = training_run.datamodule(), training_run.load_classifier().net
    options = EvaluationOptions(relearn_steps=3, relearn_fraction=0.2, relearn_seed=5)
    metrics = evaluate_model(net, datamodule, options)

    def accuracy(loader, keep=lambda y: torch.ones_like(y, dtype=torch.bool)):
        hits = total = 0
        with torch.no_grad():
            for x, y, *_ in loader:
                mask = keep(y)
                hits += int((net.eval()(x).argmax(1) == y)[mask].sum())
                total += int(mask.sum())
        return 100.0 * hits / total

    test = datamodule.test_dataloader()[0]
    assert metrics["test/acc"] == pytest.approx(accuracy(test))
    assert metrics["test/acc_attacked"] == pytest.approx(accuracy(test, lambda y: y == 9))
    assert metrics["test/acc_other"] == pytest.approx(accuracy(test, lambda y: y != 9))
    assert metrics["forget/acc"] == pytest.approx(accuracy(datamodule.forget_dataloader()))
    assert metrics["forget_true/acc"] == pytest.approx(accuracy(datamodule.corrected_forget_dataloader()))
    assert metrics["retain/acc"] == pytest.approx(accuracy(datamodule.retain_dataloader()))
    assert metrics["val/acc"] == pytest.approx(accuracy(datamodule.val_dataloader()))

    mia = mia_summary(net, datamodule.retain_dataloader(), test, datamodule.forget_dataloader())
    assert metrics["mia/svc"] == pytest.approx(mia["mia_svc"])
    assert metrics["mia/loss_auc_retain"] == pytest.approx(mia["mia_loss_auc_retain"], abs=1e-6)
    assert metrics["mia/loss_auc_forget"] == pytest.approx(mia["mia_loss_auc_forget"], abs=1e-6)
    salun = mia_salun(
        net,
        datamodule.retain_dataloader(),
        test,
        datamodule.forget_dataloader(),
        max_samples=options.mia_samples,
        subsample_repeats=options.mia_subsample_repeats,
    )
    salun_keys = {salun_metric_key(k) for k in salun}
    assert {salun_metric_key(k): v for k, v in salun.items()} == pytest.approx({k: metrics[k] for k in salun_keys})
    assert {k for k in metrics if "salun" in k or "m_entropy" in k} == salun_keys
    # the default: SalUn's full sets (the first |test| = all 3,800 retain samples against as many test samples)
    assert salun["members"] == salun["nonmembers"] == len(datamodule.retain_dataloader().dataset)
    assert salun["repeats"] == 1 and salun["confidence_std"] == 0.0
    attack = relearning_attack(net, datamodule.forget_dataloader(), test, fraction=0.2, steps=3, seed=5)
    assert metrics["relearn/forget_acc_after"] == pytest.approx(attack["forget_acc_after"])
    assert metrics["relearn/recovery"] == pytest.approx(attack["recovery"])

    fast = evaluate_model(net, datamodule, EvaluationOptions(mia=False, relearn=False))
    assert fast == {k: v for k, v in metrics.items() if "/" in k and k.split("/")[0] not in ("mia", "relearn")}


def test_compare_gives_tow_gap_and_restored():
    from lightning_unlearn.evaluation.suite import compare

    before = {"test/acc": 90.0, "forget/acc": 60.0, "retain/acc": 95.0, "mia/svc": 10.0}
    after = {"test/acc": 97.0, "forget/acc": 12.0, "retain/acc": 98.0, "mia/svc": 40.0}
    reference = {"test/acc": 98.0, "forget/acc": 10.0, "retain/acc": 99.0, "mia/svc": 50.0}
    out = compare(before, after, reference)
    assert out["tow"] == pytest.approx((1 - 0.02) * (1 - 0.01) * (1 - 0.01))
    # signed: forget is better lower (12 > 10 costs), retain/test better higher (both below the reference cost)
    assert out["tow_signed"] == pytest.approx((1 - 0.02) * (1 - 0.01) * (1 - 0.01))
    assert out["avg_gap"] == pytest.approx((2 + 1 + 1) / 3)
    assert out["gap_mia_svc"] == pytest.approx(10.0)
    assert out["test_restored/acc"] == pytest.approx(87.5)
    better = compare(before, {**after, "forget/acc": 8.0}, reference)
    assert better["tow_signed"] == pytest.approx((1 + 0.02) * (1 - 0.01) * (1 - 0.01))
    assert better["tow"] == pytest.approx(out["tow"])


@pytest.mark.parametrize(("argument", "value"), [("relearn_fraction", 0.0), ("relearn_steps", 0), ("relearn_lr", -1.0)])
def test_evaluation_options_reject_bad_values(argument, value):
    from lightning_unlearn.evaluation.suite import EvaluationOptions

    with pytest.raises(ValueError, match=argument):
        EvaluationOptions(**{argument: value})
