"""``validation_weights="retain"``: the one-step search's criterion read on the retain set's class distribution.

Checked against an independent computation: the class weights ``p_retain(c) / p_val(c)`` counted by hand, and every
candidate's validation loss and accuracy recomputed with ``torch.func.functional_call`` at ``θ + τ d`` as a weighted
mean over the validation samples (class-wise forgetting: the forgotten class gets weight 0).
"""

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call, grad
from torch.utils.data import TensorDataset

from lightning_unlearn import FirstOrder, FirstOrderRemoval, SecondOrder, TopKParameters, UnlearnData, UnlearnModule
from lightning_unlearn.unlearn.module import unlearn_trainer
from lightning_unlearn.unlearn.request.validation import accuracy_and_loss

#: Retain: 6 samples of class 0, 2 of class 1, none of class 2 (the class to forget); validation: 4, 2, 2.
RETAIN_COUNTS, VAL_COUNTS = (6, 2, 0), (4, 2, 2)
#: p_retain / p_val = (0.75 / 0.5, 0.25 / 0.25, 0 / 0.25)
EXPECTED_WEIGHTS = [1.5, 1.0, 0.0]


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def classwise_data() -> tuple[UnlearnData, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)

    def split(counts):
        y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        x = torch.randn(len(y), 3, generator=g, dtype=torch.float64) + F.one_hot(y, 3).double()  # learnable
        return x, y

    (xr, yr), (xv, yv) = split(RETAIN_COUNTS), split(VAL_COUNTS)
    xf = torch.randn(5, 3, generator=g, dtype=torch.float64) + torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    yf = torch.full((5,), 2)  # class-wise forgetting: every training sample of class 2
    data = UnlearnData(forget=TensorDataset(xf, yf), retain=TensorDataset(xr, yr), val=TensorDataset(xv, yv))
    return data, {"xf": xf, "yf": yf, "xr": xr, "yr": yr, "xv": xv, "yv": yv}


TEMPLATE = tiny_net()  # the architecture for functional calls (its own weights are never used)


def ce(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(functional_call(TEMPLATE, params, (x,)), y, reduction=reduction)


def masks_of(module: UnlearnModule, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The selection's boolean mask of every parameter (all False where nothing is selected)."""
    return {n: module.mask.masks.get(n, torch.zeros_like(v, dtype=torch.bool)) for n, v in before.items()}


def fit(
    method, validation_cache_mb: float = 1024.0, data: UnlearnData | None = None
) -> tuple[UnlearnModule, dict[str, torch.Tensor]]:
    """One request on a fresh tiny network (``data``: the class-wise data by default); the module and the weights
    before it."""
    net = tiny_net()
    data = data or classwise_data()[0]
    module = UnlearnModule(model=net, data=data, method=method, selection=TopKParameters(0.5), evaluate=False,
                           estimator="hutchinson", validation_cache_mb=validation_cache_mb)  # fmt: skip
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    unlearn_trainer(accelerator="cpu").fit(module)
    return module, before


def test_weighted_accuracy_and_loss_match_a_hand_computation():
    torch.manual_seed(0)
    logits, y = torch.randn(7, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0, 0])
    weights = torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64)
    logits[2, 2] = -math.inf  # an infinite loss on a sample of weight 0 does not count
    w = weights[y]
    losses = torch.where(w > 0, F.cross_entropy(logits, y, reduction="none"), 0.0)
    hits = (logits.argmax(-1) == y).double()
    acc, loss = accuracy_and_loss([(logits[:4], y[:4]), (logits[4:], y[4:])], weights)
    assert acc == pytest.approx(100 * float((w * hits).sum() / w.sum()), rel=1e-12)
    assert loss == pytest.approx(float((w * losses).sum() / w.sum()), rel=1e-12)
    plain_acc, plain_loss = accuracy_and_loss([(logits, y)])
    assert plain_acc == pytest.approx(100 * float(hits.mean())) and plain_loss == math.inf
    with pytest.raises(ValueError, match="weight 0"):
        accuracy_and_loss([(logits, y)], torch.zeros(3))


@pytest.mark.parametrize("cache_mb", [1024.0, 0.0], ids=["frozen-activation cache", "full forward passes"])
def test_retain_weighted_search_scores_every_candidate_on_the_retain_distribution(cache_mb):
    method = FirstOrderRemoval(validation_weights="retain")
    module, before = fit(method, cache_mb)
    report = method.report()
    assert report["validation_weights"] == "retain"
    assert report["class_weights"] == pytest.approx(EXPECTED_WEIGHTS, rel=1e-12)
    _, d = classwise_data()
    g = grad(lambda p: ce(p, d["xf"], d["yf"]) * len(d["yf"]))(before)  # removal: θ + τ Σ ∇ℓ(x_f, y_f)
    masks = masks_of(module, before)
    w = torch.tensor(EXPECTED_WEIGHTS, dtype=torch.float64)[d["yv"]]
    for candidate in report["candidates"]:
        theta = {n: torch.where(masks[n], v + candidate["step"] * g[n], v) for n, v in before.items()}
        out = functional_call(TEMPLATE, theta, (d["xv"],))
        losses = F.cross_entropy(out, d["yv"], reduction="none")
        assert candidate["val_loss"] == pytest.approx(float((w * losses).sum() / w.sum()), rel=1e-9, abs=1e-12)
        hits = (out.argmax(-1) == d["yv"]).double()
        assert candidate["val_acc"] == pytest.approx(100 * float((w * hits).sum() / w.sum()), rel=1e-9)
    best = min(report["candidates"], key=lambda c: (c["val_loss"], c["step"]))
    assert report["step"] == best["step"] > 0  # the forgotten class no longer holds the step back
    # and the weighted criterion is what the module reports for the model it leaves behind
    weights = torch.tensor(EXPECTED_WEIGHTS, dtype=torch.float64)
    assert module.validate(weights)[1] == pytest.approx(best["val_loss"], rel=1e-9)


def test_uniform_weights_are_the_plain_validation_loss():
    method = FirstOrderRemoval()
    module, _ = fit(method)
    report = method.report()
    assert report["validation_weights"] == "uniform" and "class_weights" not in report
    assert module.validate()[1] == pytest.approx(report["val_loss"], rel=1e-9)


@pytest.mark.parametrize("cls", [FirstOrder, FirstOrderRemoval, SecondOrder])
def test_validation_weights_is_checked_and_named(cls):
    with pytest.raises(ValueError, match=r"`validation_weights` must be one of \('uniform', 'retain'\)"):
        cls(validation_weights="balanced")
    assert cls(validation_weights="retain").report()["validation_weights"] == "retain"


# ------------------------------------------------------------------------------------ forget_weight (a poison)
def poison_data() -> tuple[UnlearnData, dict[str, torch.Tensor]]:
    """A backdoor in miniature: the forget inputs carry a trigger (feature 2 = 3) and were trained as class 0; their
    true labels are 1 or 2. No validation input has the trigger."""
    g = torch.Generator().manual_seed(5)
    xf = torch.randn(6, 3, generator=g, dtype=torch.float64)
    xf[:, 2] = 3.0
    y_true, y_poisoned = torch.tensor([1, 2, 1, 2, 1, 2]), torch.zeros(6, dtype=torch.long)
    xr, xv = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (10, 8))
    xr[:, 2], xv[:, 2] = 0.0, 0.0
    yr, yv = (torch.randint(0, 3, (n,), generator=g) for n in (10, 8))
    data = UnlearnData(
        TensorDataset(xf, y_poisoned), TensorDataset(xr, yr), TensorDataset(xv, yv), corrected_labels=y_true
    )
    return data, {"xf": xf, "y_true": y_true, "y_poisoned": y_poisoned, "xv": xv, "yv": yv}


@pytest.mark.parametrize("criterion", ["loss", "acc"])
@pytest.mark.parametrize("cache_mb", [1024.0, 0.0], ids=["frozen-activation cache", "full forward passes"])
def test_forget_weight_scores_validation_plus_the_corrected_forget_set(criterion, cache_mb):
    weight = 0.5
    method = FirstOrder(criterion=criterion, forget_weight=weight)
    data, d = poison_data()
    module, before = fit(method, cache_mb, data)
    report = method.report()
    assert report["forget_weight"] == weight
    # Warnecke's first-order direction: Σ_i [∇ℓ(x_i, y_true) − ∇ℓ(x_i, y_poisoned)], the update θ − τ g
    g = grad(lambda p: ce(p, d["xf"], d["y_true"], "sum") - ce(p, d["xf"], d["y_poisoned"], "sum"))(before)
    masks = masks_of(module, before)
    scores = []
    for c in report["candidates"]:
        theta = {n: torch.where(masks[n], v - c["step"] * g[n], v) for n, v in before.items()}
        val_out, forget_out = (functional_call(TEMPLATE, theta, (x,)) for x in (d["xv"], d["xf"]))
        assert c["val_loss"] == pytest.approx(float(F.cross_entropy(val_out, d["yv"])), rel=1e-9)
        assert c["forget_loss"] == pytest.approx(float(F.cross_entropy(forget_out, d["y_true"])), rel=1e-9)
        assert c["forget_acc"] == pytest.approx(100 * float((forget_out.argmax(-1) == d["y_true"]).double().mean()))
        if criterion == "loss":
            assert c["score"] == pytest.approx(c["val_loss"] + weight * c["forget_loss"], rel=1e-12)
        else:
            combined = (c["val_acc"] + weight * c["forget_acc"]) / (1 + weight)
            assert c["score"] == pytest.approx(-combined + 1e-6 * (c["val_loss"] + weight * c["forget_loss"]))
        scores.append((c["score"], c["step"]))
    assert report["step"] == min(scores)[1]
    assert {"forget_loss", "forget_acc"} <= report.keys()


def test_forget_weight_is_checked_and_refused_where_there_are_no_corrected_labels():
    for bad in (-1.0, math.inf, "1", True):
        with pytest.raises(ValueError, match="`forget_weight` must be a finite number >= 0"):
            FirstOrder(forget_weight=bad)
    with pytest.raises(ValueError, match="`forget_weight` scores the forget set with its corrected labels"):
        FirstOrderRemoval(forget_weight=1.0)
    assert SecondOrder(forget_weight=2).report()["forget_weight"] == 2.0
    # data without corrected labels: FirstOrder itself is refused before any search (the module's own check)
    data, _ = classwise_data()
    module = UnlearnModule(model=tiny_net(), data=data, method=FirstOrder(forget_weight=1.0), evaluate=False,
                           estimator="hutchinson", selection=TopKParameters(0.5))  # fmt: skip
    with pytest.raises(ValueError, match="corrected labels"):
        unlearn_trainer(accelerator="cpu").fit(module)


def test_retain_weights_read_labels_from_dict_items():
    """A user's validation set of ``{"x", "y"}`` dicts (the data protocol's other item form) gives the same weights and
    the same search as tuples."""

    class Dicts(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, i):
            x, y = self.dataset[i]
            return {"x": x, "y": y}

    data, d = classwise_data()
    forget, retain, val = (TensorDataset(d[f"x{k}"], d[f"y{k}"]) for k in "frv")
    as_dicts = UnlearnData(forget=forget, retain=retain, val=Dicts(val))
    reports = []
    for d in (data, as_dicts):
        method = FirstOrderRemoval(validation_weights="retain")
        fit(method, data=d)
        reports.append(method.report())
    assert reports[1]["class_weights"] == pytest.approx(EXPECTED_WEIGHTS, rel=1e-12)
    assert reports[1]["step"] == reports[0]["step"] and reports[1]["val_loss"] == pytest.approx(reports[0]["val_loss"])
