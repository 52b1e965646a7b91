"""Evaluation: accuracy, % restored, ToW, membership inference, relearning attack, cost; hand-made references."""

import math
import time
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_unlearn.data import PoisonedDataModule, PoisonSpec
from lightning_unlearn.evaluation import (
    Cost,
    evaluate_accuracy,
    gap,
    label_probabilities,
    losses,
    measure,
    mia_loss_auc,
    mia_summary,
    mia_svc,
    percent_restored,
    relearning_attack,
    tow,
)
from lightning_unlearn.evaluation import cost as cost_module
from lightning_unlearn.evaluation.relearn import calibrate_relearning, curve_area
from lightning_unlearn.evaluation.suite import EvaluationOptions, evaluate_model, poison_effect
from lightning_unlearn.models.cnn import MnistCNN

NUM_CLASSES = 10


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is as fast, and far faster when other processes load the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------ tiny models
class ConstantModel(nn.Module):
    """Always predicts ``label``; has a BatchNorm (train-mode sensitive) and a submodule kept in eval mode."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label
        self.norm = nn.BatchNorm1d(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not self.training, "evaluation must run in eval mode"
        logits = torch.zeros(len(x), NUM_CLASSES)
        logits[:, self.label] = 1.0
        return logits


class LookupModel(nn.Module):
    """A 'model' whose logits are looked up by the index stored in the input's first feature."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()]


def _confident(label: int) -> torch.Tensor:
    row = torch.full((NUM_CLASSES,), -1e4)
    row[label] = 0.0  # softmax: exactly 1.0 on the label in float32
    return row


def _uniform() -> torch.Tensor:
    return torch.zeros(NUM_CLASSES)  # softmax: exactly 1/C everywhere


def _lookup_setup(groups: dict[str, list[str]]):
    """A LookupModel plus one loader per group; each sample is 'member' (prob 1) or 'non' (prob 1/C)."""
    rows, loaders, start = [], {}, 0
    for name, kinds in groups.items():
        labels = torch.arange(len(kinds)) % NUM_CLASSES
        for kind, label in zip(kinds, labels.tolist(), strict=True):
            rows.append(_confident(label) if kind == "member" else _uniform())
        index = torch.arange(start, start + len(kinds))
        start += len(kinds)
        dataset = TensorDataset(index.float().unsqueeze(1), labels, index)
        loaders[name] = DataLoader(dataset, batch_size=7)  # 7: the member limit cuts through a batch
    return LookupModel(torch.stack(rows)), loaders


# ------------------------------------------------------------------------------------------------ accuracy metrics
def test_percent_restored_hand_computed():
    assert percent_restored(90.0, 80.0, 95.0) == pytest.approx(200 / 3)
    assert percent_restored(95.0, 80.0, 95.0) == pytest.approx(100.0)
    assert percent_restored(100.0, 80.0, 95.0) == pytest.approx(400 / 3)
    assert percent_restored(75.0, 80.0, 95.0) == pytest.approx(-100 / 3)
    assert percent_restored(10.0, 30.0, 20.0) == pytest.approx(200.0)  # works for "lower is better" too
    assert math.isnan(percent_restored(90.0, 80.0, 80.0))
    assert math.isnan(percent_restored(90.0, 80.0, 80.0 + 1e-12))


def test_tow_hand_computed_both_forms():
    retrained = {"forget": 5.0, "retain": 99.0, "test": 92.0}
    worse = {"forget": 10.0, "retain": 95.0, "test": 90.0}
    assert tow(worse, retrained) == pytest.approx(0.95 * 0.96 * 0.98)
    assert tow(worse, retrained, signed=True) == pytest.approx(0.95 * 0.96 * 0.98)
    better = {"forget": 2.0, "retain": 100.0, "test": 93.0}
    # unsigned: 1 - |2-5|/100, 1 - |100-99|/100, 1 - |93-92|/100
    assert tow(better, retrained) == pytest.approx(0.97 * 0.99 * 0.99)
    # signed: forget lower is better -> 1 - (2-5)/100 = 1.03; retain/test higher is better -> 1.01, 1.01
    signed = tow(better, retrained, signed=True)
    assert signed == pytest.approx(1.03 * 1.01 * 1.01) and signed > 1
    assert tow(retrained, retrained) == 1.0 == tow(retrained, retrained, signed=True)
    assert tow(worse, retrained, splits=("test",)) == pytest.approx(0.98)
    assert tow({"forget_true": 80.0}, {"forget_true": 90.0}, splits=["forget_true"], signed=True) == pytest.approx(0.9)
    assert 0.0 <= tow({"forget": 0.0, "retain": 100.0, "test": 100.0}, {"forget": 100.0, "retain": 0.0, "test": 0.0})


def test_tow_rejects_bad_arguments():
    accs = {"forget": 5.0, "retain": 99.0, "test": 92.0}
    with pytest.raises(ValueError, match="splits.*unknown.*'train'.*allowed"):
        tow(accs, accs, splits=("forget", "train"))
    with pytest.raises(ValueError, match="splits"):
        tow(accs, accs, splits=())
    with pytest.raises(ValueError, match="retrained.*'test'"):
        tow(accs, {"forget": 1.0, "retain": 2.0})
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        tow({**accs, "test": 0.92 * 1000}, accs)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        tow({**accs, "test": math.nan}, accs)


def test_gap():
    assert gap(90.0, 92.5) == 2.5
    a, b = {"forget": 10.0, "retain": 95.0, "test": 90.0}, {"forget": 5.0, "retain": 99.0, "test": 92.0}
    assert gap(a, b) == pytest.approx((5 + 4 + 2) / 3)
    assert gap(a, b, keys=["test"]) == 2.0
    with pytest.raises(ValueError, match="keys"):
        gap(a, {"forget": 1.0})
    with pytest.raises(ValueError, match="both"):
        gap(a, 1.0)


def test_evaluate_accuracy_matches_hand_count():
    labels = torch.tensor([3, 3, 1, 5, 3, 0, 5, 3, 9, 3, 2, 3, 7])  # 6 threes
    loader = DataLoader(TensorDataset(torch.randn(len(labels), 4), labels, torch.arange(len(labels))), batch_size=5)
    model = ConstantModel(3)
    model.train()
    model.frozen.eval()
    out = evaluate_accuracy(model, loader)
    assert out["acc"] == pytest.approx(100 * 6 / 13) and out["n"] == 13
    assert model.training and model.norm.training and not model.frozen.training  # modes restored one by one
    out = evaluate_accuracy(model, loader, attacked_class=3)
    assert out["acc_attacked"] == 100.0 and out["n_attacked"] == 6
    assert out["acc_other"] == 0.0 and out["n_other"] == 7
    out = evaluate_accuracy(model, loader, attacked_class=5)  # micro averages over samples
    assert out["acc_attacked"] == 0.0 and out["acc_other"] == pytest.approx(100 * 6 / 11)
    assert math.isnan(evaluate_accuracy(model, loader, attacked_class=8)["acc_attacked"])
    dict_loader = [{"x": torch.randn(4, 4), "y": torch.tensor([3, 3, 0, 1])}]
    assert evaluate_accuracy(model, dict_loader)["acc"] == 50.0
    with pytest.raises(ValueError, match="loader"):
        evaluate_accuracy(model, [])


# -------------------------------------------------------------------------------------------- membership inference
def test_label_probabilities_and_losses_are_exact():
    model, loaders = _lookup_setup({"a": ["member", "non", "member"]})
    assert label_probabilities(model, loaders["a"]).tolist() == [1.0, pytest.approx(0.1), 1.0]
    assert losses(model, loaders["a"]).tolist() == [0.0, pytest.approx(math.log(NUM_CLASSES)), 0.0]
    assert len(label_probabilities(model, loaders["a"], limit=2)) == 2


def test_mia_on_a_known_lookup_model():
    model, loaders = _lookup_setup(
        {
            "retain": ["member"] * 30,
            "test": ["non"] * 20,
            "forget_unseen": ["non"] * 9,
            "forget_seen": ["member"] * 11,
            "forget_mixed": ["member"] * 6 + ["non"] * 6,
        }
    )
    retain, test = loaders["retain"], loaders["test"]
    assert mia_loss_auc(model, retain, test) == 1.0
    assert mia_loss_auc(model, loaders["forget_seen"], test) == 1.0
    assert mia_loss_auc(model, loaders["forget_unseen"], test) == 0.5  # all ties
    assert mia_svc(model, retain, test, loaders["forget_unseen"]) == pytest.approx(100.0)
    assert mia_svc(model, retain, test, loaders["forget_seen"]) == pytest.approx(0.0)
    assert mia_svc(model, retain, test, loaders["forget_mixed"]) == pytest.approx(50.0)
    summary = mia_summary(model, retain, test, loaders["forget_unseen"])
    assert summary == {"mia_svc": 100.0, "mia_loss_auc_retain": 1.0, "mia_loss_auc_forget": 0.5}


def test_mia_svc_balances_members_and_non_members():
    # Retain longer than test: only its first |test| samples are members. The later ones look like non-members; if
    # they were used, 'non-member-looking' points would mostly be labelled member and the forget set would score ~0.
    model, loaders = _lookup_setup(
        {"retain": ["member"] * 10 + ["non"] * 200, "test": ["non"] * 10, "forget": ["non"] * 5}
    )
    assert mia_svc(model, loaders["retain"], loaders["test"], loaders["forget"]) == pytest.approx(100.0)
    # Retain shorter than test: the test set is cut to |retain|. Its later samples look like members; if they were
    # used, member-looking forget samples would be called non-members.
    model, loaders = _lookup_setup(
        {"retain": ["member"] * 10, "test": ["non"] * 10 + ["member"] * 200, "forget": ["member"] * 5}
    )
    assert mia_svc(model, loaders["retain"], loaders["test"], loaders["forget"]) == pytest.approx(0.0)


def test_mia_rejects_empty_loaders():
    model, loaders = _lookup_setup({"a": ["member"] * 4, "b": ["non"] * 4})
    with pytest.raises(ValueError, match="forget_loader"):
        mia_svc(model, loaders["a"], loaders["b"], [])
    with pytest.raises(ValueError, match="retain_loader"):
        mia_svc(model, [], loaders["b"], loaders["a"])
    with pytest.raises(ValueError, match="nonmember_loader"):
        mia_loss_auc(model, loaders["a"], [])


# ------------------------------------------------------------------------------------------------ relearning attack
def _toy_problem(n: int = 40):
    torch.manual_seed(0)
    x = torch.randn(n, 6)
    y = torch.randint(0, 3, (n,))
    forget = DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=16)
    test = DataLoader(TensorDataset(torch.randn(50, 6), torch.randint(0, 3, (50,))), batch_size=16)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    return model, forget, test


def test_relearning_attack_leaves_the_model_alone_and_is_reproducible():
    model, forget, test = _toy_problem()
    model[0].weight.requires_grad_(False)  # e.g. frozen by unlearning; the attacker still trains everything
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_state = torch.get_rng_state()
    kwargs = {"fraction": 0.25, "steps": 15, "lr": 0.1, "batch_size": 4}
    first = relearning_attack(model, forget, test, seed=3, **kwargs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.training and not model[0].weight.requires_grad and model[3].weight.requires_grad
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert relearning_attack(model, forget, test, seed=3, **kwargs) == first
    assert first["n_attack"] == 10 and first["n_remaining"] == 30
    assert first["attack_acc_after"] > first["attack_acc_before"]  # it did train on the attack set
    assert {first["fraction"], first["steps"], first["lr"], first["batch_size"], first["seed"]} == {0.25, 15, 0.1, 4, 3}
    # the split depends on the seed: accuracy on the held-out forget samples is a sample mean over a different subset
    others = {relearning_attack(model, forget, test, seed=s, **kwargs)["forget_acc_before"] for s in range(4, 9)}
    assert len(others | {first["forget_acc_before"]}) > 1


def test_relearning_attack_whole_forget_set_and_errors():
    model, forget, test = _toy_problem()
    out = relearning_attack(model, forget, test, fraction=1.0, steps=2)
    assert out["n_attack"] == 40 and out["n_remaining"] == 0
    assert math.isnan(out["forget_acc_before"]) and math.isnan(out["recovery"])
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"`fraction`.*\(0, 1\]"):
            relearning_attack(model, forget, test, fraction=bad)
    with pytest.raises(ValueError, match="`steps`.*>= 1"):
        relearning_attack(model, forget, test, steps=0)
    with pytest.raises(ValueError, match="`batch_size`"):
        relearning_attack(model, forget, test, batch_size=0)
    with pytest.raises(ValueError, match="`lr`"):
        relearning_attack(model, forget, test, lr=0.0)
    with pytest.raises(ValueError, match="forget_loader"):
        relearning_attack(model, [], test)
    with pytest.raises(ValueError, match="test_loader"):
        relearning_attack(model, forget, [])


@pytest.fixture(scope="module")
def poisoned_mnist():
    dm = PoisonedDataModule(
        "mnist",
        poison=PoisonSpec("targeted", count=150, target_class=9, poison_label=4, seed=1),
        train_subset=3000,
        eval_batch_size=1000,
    )
    dm.setup("fit")
    return dm


def _train_cnn(dm: PoisonedDataModule, drop_poisoned: bool, steps: int = 200) -> MnistCNN:
    torch.manual_seed(0)
    model = MnistCNN()
    data = dm.train_dataset()
    positions = dm.retain_positions if drop_poisoned else torch.arange(len(data.labels))
    x, y = data.images[positions], data.labels[positions]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(y), (32,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    return model


def test_relearning_attack_on_poisoned_mnist(poisoned_mnist):
    dm = poisoned_mnist
    forget = dm.forget_dataloader()
    test = DataLoader(Subset(dm.test_dataloader()[0].dataset, range(2000)), batch_size=1000)  # a part keeps it fast
    n_forget = len(dm.record)
    fraction = 0.1
    expected_attack = math.ceil(Fraction(str(fraction)) * n_forget)  # exact ⌈m·|D_f|⌉ = 15, not 16
    results = {}
    for name, drop in (("poisoned", False), ("retrained", True)):
        model = _train_cnn(dm, drop)
        overall = evaluate_accuracy(model, forget)["acc"]
        test_acc = evaluate_accuracy(model, test)["acc"]
        out = relearning_attack(model, forget, test, fraction=fraction, steps=20, lr=0.01, seed=0)
        results[name] = out
        assert out["n_forget"] == n_forget and out["n_attack"] == expected_attack == 15
        assert out["n_remaining"] == n_forget - expected_attack
        for key in ("forget_acc_before", "forget_acc_after", "attack_acc_before", "attack_acc_after"):
            assert 0.0 <= out[key] <= 100.0
        assert 0.0 <= out["test_acc_after"] <= 100.0 and out["test_acc_before"] == pytest.approx(test_acc)
        assert out["recovery"] == out["forget_acc_after"] - out["forget_acc_before"]
        # attack + remaining partition the forget set: their counts of correct predictions add up
        correct = (out["attack_acc_before"] * out["n_attack"] + out["forget_acc_before"] * out["n_remaining"]) / 100
        assert correct == pytest.approx(overall * n_forget / 100)
        # recovered accuracies count whole samples of the remaining set
        assert (out["forget_acc_after"] * out["n_remaining"] / 100) == pytest.approx(
            round(out["forget_acc_after"] * out["n_remaining"] / 100)
        )
        assert out["recovery"] >= 0.0  # fine-tuning on poisoned labels does not lower poisoned-label accuracy here
    # the poisoned model starts high on its poisoned labels; the retrained one never learnt them and relearns a lot
    assert results["poisoned"]["forget_acc_before"] > 50.0 > results["retrained"]["forget_acc_before"]
    assert results["retrained"]["recovery"] > 20.0


# ------------------------------------------------------------------------------------------------------------- cost
def test_measure_cpu_sees_a_large_allocation():
    size = 128 * 2**20  # bytes
    with measure("cpu") as cost:
        block = torch.ones(size // 4, dtype=torch.float32)  # written, so resident
        time.sleep(0.05)
    assert isinstance(cost, Cost) and cost.device == "cpu"
    assert cost.seconds >= 0.05 and cost.method in ("proc_statm_sampled", "getrusage_maxrss")
    assert cost.peak_bytes >= 0
    if cost.method == "proc_statm_sampled":
        assert cost.peak_bytes >= 0.8 * size  # still alive at exit: caught by the final sample at least
    del block
    # freed before the block ends: only the background sampler can see it
    with measure("cpu", interval=0.001) as cost:
        block = torch.ones(size // 4)
        time.sleep(0.2)
        del block
    if cost.method == "proc_statm_sampled":
        assert cost.peak_bytes >= 0.5 * size
    assert cost.to_dict()["seconds"] == cost.seconds


def test_measure_fills_cost_on_error_and_falls_back_without_proc(monkeypatch):
    with pytest.raises(RuntimeError):
        with measure("cpu") as cost:
            raise RuntimeError("boom")
    assert cost.seconds > 0 and cost.peak_bytes >= 0
    monkeypatch.setattr(cost_module, "_STATM", "/nonexistent/statm")
    with measure("cpu") as cost:
        torch.ones(2**20)
    assert cost.method == "getrusage_maxrss" and cost.peak_bytes >= 0 and cost.seconds > 0
    with pytest.raises(ValueError, match="interval"):
        with measure("cpu", interval=0):
            pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_cuda_peak():
    size = 64 * 2**20
    with measure("cuda") as cost:
        block = torch.ones(size // 4, device="cuda")
        del block
    assert cost.method == "cuda_max_memory_allocated" and cost.device.startswith("cuda")
    assert cost.peak_bytes - cost.baseline_bytes >= size


# ----------------------------------------------------------------------------- recovery curve and calibration
def test_recovery_curve_matches_shorter_attacks_and_its_area():
    model, forget, test = _toy_problem()
    kwargs = {"fraction": 0.25, "lr": 0.1, "batch_size": 4, "seed": 3}
    out = relearning_attack(model, forget, test, steps=15, eval_every=5, **kwargs)
    assert out["curve_steps"] == [0, 5, 10, 15]
    assert out["curve"][0] == out["forget_acc_before"] and out["curve"][-1] == out["forget_acc_after"]
    for step, value in zip(out["curve_steps"][1:], out["curve"][1:], strict=True):  # the same batches, cut short
        assert relearning_attack(model, forget, test, steps=step, **kwargs)["forget_acc_after"] == value
    s, v = out["curve_steps"], out["curve"]
    by_hand = sum((s[i + 1] - s[i]) * (v[i] + v[i + 1]) / 2 for i in range(3)) / 15
    assert out["auc"] == pytest.approx(by_hand)
    assert curve_area([0, 10, 20], [0.0, 50.0, 100.0]) == 50.0
    assert math.isnan(curve_area([0, 10], [math.nan, 1.0]))
    with pytest.raises(ValueError, match="`eval_every`"):
        relearning_attack(model, forget, test, eval_every=0)


def test_calibration_picks_the_strongest_rate_that_keeps_a_clean_model_below_the_ceiling():
    model, forget, _ = _toy_problem(n=80)
    lrs = (0.001, 0.03, 1.0)
    finals = {lr: relearning_attack(model, forget, forget, steps=20, lr=lr, seed=1)["forget_acc_after"] for lr in lrs}
    ceiling = sorted(finals.values())[1]  # exactly the middle rate's final accuracy
    out = calibrate_relearning(model, forget, steps=20, seed=1, ceiling=ceiling, lrs=lrs)
    assert [c["final"] for c in out["candidates"]] == [finals[lr] for lr in lrs]
    assert out["lr"] == max(lr for lr in lrs if finals[lr] <= ceiling) and not out["reached_ceiling"]
    low = calibrate_relearning(model, forget, steps=20, seed=1, ceiling=min(finals.values()) - 1e-9, lrs=lrs)
    assert low["lr"] == min(lrs) and low["reached_ceiling"]
    with pytest.raises(ValueError, match="`ceiling`"):
        calibrate_relearning(model, forget, ceiling=120.0)


def test_poison_effect_states_harm_fit_and_noise():
    flip = poison_effect(
        {"test/acc_attacked": 10.8, "forget/acc": 89.3}, {"test/acc_attacked": 97.0, "forget/acc": 0.2}, "label_flip"
    )
    assert flip["harm"] == pytest.approx(86.2) and flip["plain"] and flip["metric"] == "test/acc_attacked"
    assert "Harm 86.20 points" in flip["statement"] and "below the noise" not in flip["statement"]
    backdoor = poison_effect({"test/asr": 98.8, "forget/acc": 100.0}, {"test/asr": 0.1, "forget/acc": 0.0}, "backdoor")
    assert backdoor["harm"] == pytest.approx(98.7) and backdoor["plain"]  # a success rate: the poison raises it
    nothing = poison_effect(
        {"test/acc_attacked": 95.3, "forget/acc": 0.6}, {"test/acc_attacked": 95.9, "forget/acc": 0.2}, "targeted"
    )
    assert not nothing["plain"] and "no unlearning result on this run can show" in nothing["statement"]
    noise = poison_effect({"test/acc": 97.2, "forget/acc": 53.1}, {"test/acc": 98.6, "forget/acc": 1.0}, "untargeted")
    assert noise["plain"] and noise["memorisation"] == pytest.approx(52.1) and "memorised" in noise["statement"]
    assert poison_effect({}, {}, "none")["statement"] == "No poison: nothing to unlearn."


def test_backdoor_evaluation_reports_the_attack_success_rate():
    spec = PoisonSpec("backdoor", count=60, target_class=0, trigger_position="top_left", seed=0)
    dm = PoisonedDataModule("mnist", poison=spec, train_subset=1000, eval_batch_size=1000)
    torch.manual_seed(0)
    net = MnistCNN()
    metrics = evaluate_model(net, dm, EvaluationOptions(mia=False, relearn=False))
    assert metrics["test/asr"] == pytest.approx(evaluate_accuracy(net, dm.triggered_test_dataloader())["acc"])
    assert "test/acc_attacked" not in metrics  # a backdoor attacks no single class


def test_retain_samples_evaluates_the_first_retain_samples_only():
    spec = PoisonSpec("targeted", count=50, target_class=9, seed=0)
    dm = PoisonedDataModule("mnist", poison=spec, train_subset=1000, eval_batch_size=1000)
    torch.manual_seed(0)
    net = MnistCNN()
    part = evaluate_model(net, dm, EvaluationOptions(mia=False, relearn=False, retain_samples=300))
    first = DataLoader(Subset(dm.retain_dataloader().dataset, range(300)), batch_size=300)
    assert part["retain/acc"] == pytest.approx(evaluate_accuracy(net, first)["acc"])
    full = evaluate_model(net, dm, EvaluationOptions(mia=False, relearn=False, retain_samples=10**6))
    assert full["retain/acc"] == pytest.approx(evaluate_accuracy(net, dm.retain_dataloader())["acc"])
    with pytest.raises(ValueError, match="`retain_samples`"):
        EvaluationOptions(retain_samples=0)


def test_svc_score_fits_repeated_points_once_with_their_count_as_weight():
    """The deduplicated, weighted fit is the same SVM as OPTML's plain fit on every point: same calls on the forget set
    (checked against sklearn's plain fit on data with many repeated probabilities, as a confident model gives)."""
    import numpy as np
    from sklearn.svm import SVC

    from lightning_unlearn.evaluation.mia import SVC_PARAMS, svc_score

    g = torch.Generator().manual_seed(0)
    members = torch.where(torch.rand(2000, generator=g) < 0.7, 1.0, torch.rand(2000, generator=g).round(decimals=2))
    nonmembers = torch.where(torch.rand(2000, generator=g) < 0.4, 1.0, torch.rand(2000, generator=g).round(decimals=2))
    forget = torch.rand(500, generator=g).round(decimals=2)
    x = torch.cat([members, nonmembers]).double().numpy().reshape(-1, 1)
    y = np.r_[np.ones(2000), np.zeros(2000)]
    plain = SVC(**SVC_PARAMS).fit(x, y).predict(forget.double().numpy().reshape(-1, 1))
    assert svc_score(members, nonmembers, forget) == pytest.approx(100.0 * (1.0 - plain.mean()), abs=0.2)
    assert 0.0 < svc_score(members, nonmembers, forget) < 100.0  # the case separates some forget samples, not all
