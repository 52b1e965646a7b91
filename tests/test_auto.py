"""``Auto`` and the one criterion inside requests (issue 29): the default request restores a label flip, removes a
class and a trigger without corrected labels, makes the same choice at one and two threads, keeps to its budget,
computes no profile it does not need; iterative methods' learning rate and epochs are chosen by the criterion."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from support.own_model import ForgetData, TinyClassifier
from torch.utils.data import DataLoader, TensorDataset

from lightning_unlearn.curvature.compute import profile_model
from lightning_unlearn.data import UnlearnData
from lightning_unlearn.selection import AutoCandidates, LastLayer, SmallestLayer
from lightning_unlearn.unlearn import Auto, Finetune, FirstOrder, UnlearnModule
from lightning_unlearn.unlearn.module import unlearn_trainer


def _fit(x: torch.Tensor, y: torch.Tensor, seed: int = 0, epochs: int = 25) -> TinyClassifier:
    torch.manual_seed(seed)
    model = TinyClassifier(num_classes=3, in_channels=4, hidden=32, lr=0.3)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
    return model.eval()


@pytest.fixture(scope="module")
def flipped() -> tuple[TinyClassifier, ForgetData]:
    """A label flip that bites: 30 samples of class 0 trained as class 1."""
    data = ForgetData(n=384, flipped=60)
    return _fit(data.x, data.poisoned), data


def test_auto_is_the_default_request_and_restores_a_label_flip_on_the_last_layer(flipped):
    model, data = flipped
    model = copy.deepcopy(model)
    module = UnlearnModule(model=model, data=data)
    assert isinstance(module.method, Auto) and isinstance(module.selection, AutoCandidates)
    frozen = model.net[0].weight.detach().clone()
    unlearn_trainer().fit(module)
    report = module.report
    assert report["target"]["target"] == "corrected"
    before, after = report["target"]["before"], report["target"]["after"]
    assert after["distance"] < before["distance"] and report["method"]["step"] > 0
    assert report["after"]["test/acc_attacked"] > report["before"]["test/acc_attacked"] + 10
    assert report["method"]["direction"] in ("corrected", "removal")
    assert module.mask.layers == ["net.2"] and torch.equal(model.net[0].weight, frozen)  # the last layer alone moved
    assert module.profile.is_layout  # no curvature was computed: nothing read it
    assert module.timings["profile_source"].startswith("layout only")
    budget = report["method"]["budget"]
    assert budget["epochs"] == 0.5 and budget["epoch_seconds"] > 0 and budget["spent_seconds"] > 0


def test_explicit_methods_keep_the_papers_default_selection():
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    ds = TensorDataset(x, y)
    data = UnlearnData(forget=ds, retain=ds, val=ds, corrected_labels=y)
    module = UnlearnModule(model=TinyClassifier(num_classes=3), data=data, method=FirstOrder())
    assert isinstance(module.selection, SmallestLayer) and module.method.criterion == "target"
    assert FirstOrder(criterion="loss").criterion == "loss"
    with pytest.raises(ValueError, match="`forget_weight` and `validation_weights` change the validation-loss"):
        FirstOrder(criterion="target", forget_weight=1.0)
    assert FirstOrder(forget_weight=1.0).criterion == "loss"  # the option of the validation-loss criterion asks for it
    with pytest.raises(ValueError, match="`budget_epochs` must be a number > 0"):
        Auto(budget_epochs=0)
    with pytest.raises(ValueError, match="`directions` must be a non-empty list"):
        Auto(directions=["sideways"])


def test_a_class_is_removed_without_corrected_labels(flipped):
    _, data = flipped
    clean = _fit(data.x, data.y, seed=1)
    removed = data.y == 2
    unlearn_data = UnlearnData(
        forget=TensorDataset(data.x[removed], data.y[removed]),
        retain=TensorDataset(data.x[~removed], data.y[~removed]),
        val=data.val_dataloader(),
        test=data.test_dataloader(),
    )
    module = UnlearnModule(model=clean, data=unlearn_data, forgetting_target="class_removed")
    unlearn_trainer().fit(module)
    report = module.report
    assert report["target"]["target"] == "class_removed"
    assert report["target"]["before"]["forget"] > 0.5  # the model predicts the class it was trained on
    assert report["target"]["after"]["forget"] < 0.2 * report["target"]["before"]["forget"]
    assert report["after"]["forget/acc"] < 20.0 < report["before"]["forget/acc"]
    assert report["method"]["direction"] in ("relabel", "removal")


def test_the_choice_is_the_same_at_one_and_two_threads(flipped):
    model, data = flipped
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            module = UnlearnModule(model=copy.deepcopy(model), data=data, method=Auto(budget_epochs=100.0))
            unlearn_trainer().fit(module)
            method = module.report["method"]
            results.append((method.get("selection"), method["direction"], method["step"]))
    finally:
        torch.set_num_threads(threads)
    (sel_1, dir_1, step_1), (sel_2, dir_2, step_2) = results
    assert (sel_1, dir_1) == (sel_2, dir_2)
    assert step_2 == pytest.approx(step_1, rel=0.05)  # the step refinement's tolerance is 0.01 decades (2.3 %)


def test_the_budget_stops_the_fallback_direction_and_says_so(flipped):
    model, data = flipped
    module = UnlearnModule(model=copy.deepcopy(model), data=data, method=Auto(budget_epochs=1e-9))
    unlearn_trainer().fit(module)
    budget = module.report["method"]["budget"]
    assert budget["skipped"] == ["last layer (net.2) / removal"]  # the target's own direction always runs
    evaluated = {c.get("direction") for c in module.report["method"]["candidates"]}
    assert evaluated == {"corrected"}


def test_the_targets_own_direction_is_tried_on_every_selection_before_the_fallback(flipped):
    """With curvature in the profile Auto's candidates are the last and the flattest layer; the target's own direction
    (corrected) runs on both whatever the budget (the choice between selections must not depend on the clock), and
    the removal direction of either only within it."""
    model, data = flipped
    profile = profile_model(model, DataLoader(TensorDataset(data.x, data.poisoned), batch_size=64), "exact")
    module = UnlearnModule(model=copy.deepcopy(model), data=data, method=Auto(budget_epochs=1e-9), profile=profile)
    unlearn_trainer().fit(module)
    if profile.rank_layers()[0] == "net.2":
        pytest.skip("the fitted net's last layer is its flattest: a single candidate")
    skipped = module.report["method"]["budget"]["skipped"]
    assert skipped == ["last layer (net.2) / removal", "flattest layer (net.0) / removal"]
    tried = {(c["selection"], c["direction"]) for c in module.report["method"]["candidates"]}
    assert tried == {("last layer (net.2)", "corrected"), ("flattest layer (net.0)", "corrected")}
    unlimited = UnlearnModule(model=copy.deepcopy(model), data=data, method=Auto(budget_epochs=100.0), profile=profile)
    unlearn_trainer().fit(unlimited)
    order = [(c["selection"], c["direction"]) for c in unlimited.report["method"]["candidates"]]
    assert list(dict.fromkeys(order)) == [
        ("last layer (net.2)", "corrected"), ("flattest layer (net.0)", "corrected"),
        ("last layer (net.2)", "removal"), ("flattest layer (net.0)", "removal"),
    ]  # fmt: skip


def test_iterative_methods_choose_rate_and_epochs_by_the_criterion(flipped):
    model, data = flipped
    module = UnlearnModule(
        model=copy.deepcopy(model), data=data, method=Finetune(epochs=3, batch_size=64), selection=LastLayer(),
        lr_grid=[0.01, 0.3],
    )  # fmt: skip
    unlearn_trainer().fit(module)
    record = module.lr_search
    assert record["criterion"] == "target"
    scored = [(c["lr"], c["epochs"]) for c in record["candidates"]]
    assert scored == [(0.0, 0), (0.01, 1), (0.01, 2), (0.01, 3), (0.3, 1), (0.3, 2), (0.3, 3)]
    best = min(record["candidates"], key=lambda c: c["score"])
    assert (record["lr"], record["epochs"]) == (best["lr"], best["epochs"])
    legacy = UnlearnModule(
        model=copy.deepcopy(model), data=data, method=Finetune(epochs=1), selection=LastLayer(), lr_grid=[0.1],
        lr_criterion="loss",
    )  # fmt: skip
    unlearn_trainer().fit(legacy)
    assert legacy.lr_search["criterion"] == "loss"
    assert legacy.lr_search["candidates"][0]["score"] == legacy.lr_search["candidates"][0]["val_loss"]
