"""RandomLabel, L1Sparse, SCRUB and FirstOrderRemoval against their definitions, on a user's own model.

Each method runs real Lightning steps of ``UnlearnModule`` on a tiny float64 network with removal-only data (no
corrected labels) and an element-wise selection; the result is compared with a hand computation written here with
``torch.func`` (SGD with momentum and weight decay spelled out), and every entry outside the selection must be
bit-identical. Every phase fits in one batch, so the order of samples inside a batch does not matter.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from test_own_model import make_data, make_net, train
from torch import nn
from torch.func import functional_call, grad
from torch.utils.data import TensorDataset

from lightning_unlearn import (
    METHODS,
    SCRUB,
    AllLayers,
    Finetune,
    FirstOrder,
    FirstOrderRemoval,
    L1Sparse,
    LastLayer,
    RandomLabel,
    TopKParameters,
    UnlearnData,
    UnlearnModule,
    unlearn_model,
)
from lightning_unlearn.__main__ import main
from lightning_unlearn.unlearn.module import unlearn_trainer

Params = dict[str, torch.Tensor]
LR, MOMENTUM, DECAY = 0.3, 0.5, 0.01


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


TEMPLATE = tiny_net()  # the architecture for functional calls (its own weights are never used)


def tiny_data() -> tuple[UnlearnData, dict[str, torch.Tensor]]:
    """6 forget and 10 retain samples, 3 classes, float64; removal-only (no corrected labels)."""
    g = torch.Generator().manual_seed(1)
    xf, xr, xv = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (6, 10, 8))
    yf, yr, yv = (torch.randint(0, 3, (n,), generator=g) for n in (6, 10, 8))
    data = UnlearnData(forget=TensorDataset(xf, yf), retain=TensorDataset(xr, yr), val=TensorDataset(xv, yv))
    return data, {"xf": xf, "yf": yf, "xr": xr, "yr": yr}


def run(method, lr: float = LR, selection=None, data=None, **kwargs) -> tuple[UnlearnModule, Params, Params, int]:
    """One fit on a fresh tiny network; returns the module, the weights before and after, and the global step."""
    net = tiny_net()
    data = data or tiny_data()[0]
    sgd = lambda params: torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=DECAY)  # noqa: E731
    selection = selection or TopKParameters(0.4)
    module = UnlearnModule(model=net, data=data, method=method, selection=selection, optimizer=sgd, evaluate=False,
                           estimator="hutchinson", **kwargs)  # fmt: skip
    before = values(net)
    trainer = unlearn_trainer(accelerator="cpu")
    trainer.fit(module)
    return module, before, values(net), trainer.global_step


def values(net: nn.Module) -> Params:
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def logits(params: Params, x: torch.Tensor) -> torch.Tensor:
    return functional_call(TEMPLATE, params, (x,))


def ce(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits(params, x), y)


def masks_of(module: UnlearnModule, params: Params) -> Params:
    selected = module.mask.masks
    return {n: selected.get(n, torch.zeros_like(v, dtype=torch.bool)) for n, v in params.items()}


def sgd_by_hand(theta: Params, losses: list, masks: Params) -> Params:
    """torch's SGD (``d = g + wd θ``, ``b = d`` first then ``μ b + d``, ``θ − lr b``) on the selected entries only."""
    buffers: Params = {}
    for loss in losses:
        g = grad(loss)(theta)
        step = {}
        for n in theta:
            d = g[n] + DECAY * theta[n]
            buffers[n] = d if n not in buffers else MOMENTUM * buffers[n] + d
            step[n] = torch.where(masks[n], theta[n] - LR * buffers[n], theta[n])
        theta = step
    return theta


def assert_matches(module: UnlearnModule, before: Params, after: Params, expected: Params) -> None:
    masks = masks_of(module, before)
    assert any(m.any() and not m.all() for m in masks.values()), "the selection should be element-wise"
    for name, value in after.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-10, atol=1e-12)
        assert torch.equal(value[~masks[name]], before[name][~masks[name]]), f"{name}: a frozen entry moved"
        assert not torch.equal(value[masks[name]], before[name][masks[name]]) or not masks[name].any(), name


# ------------------------------------------------------------------------------------------------ RandomLabel
@pytest.mark.parametrize("order", ["forget_then_retain", "shuffled"])
def test_random_label_equals_hand_computation(order):
    """Epoch e: CE on the forget set with row e of ``randint(0, 3, (epochs, 6), seed)``, then (or shuffled together
    with) CE on the retain set; two epochs, SGD with momentum across all steps."""
    epochs, seed = 2, 7
    module, before, after, steps = run(RandomLabel(epochs=epochs, batch_size=64, order=order, seed=seed))
    _, d = tiny_data()
    labels = torch.randint(0, 3, (epochs, 6), generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(labels[0], labels[1])  # new labels every epoch
    losses = []
    for e in range(epochs):
        if order == "shuffled":  # one batch of all 16 samples: the mean over forget (random labels) and retain
            x, y = torch.cat([d["xf"], d["xr"]]), torch.cat([labels[e], d["yr"]])
            losses.append(lambda p, x=x, y=y: ce(p, x, y))
        else:
            losses += [lambda p, y=labels[e]: ce(p, d["xf"], y), lambda p: ce(p, d["xr"], d["yr"])]
    assert steps == len(losses)
    assert_matches(module, before, after, sgd_by_hand(before, losses, masks_of(module, before)))
    assert module.method.report() | {"seed": seed, "order": order} == module.method.report()


def test_random_label_draws_uniformly_over_all_classes():
    """The official draw (``randint(0, num_classes)``): every class, the trained-on label included, equally likely."""
    method = RandomLabel(epochs=4, seed=3)
    method._num_forget = 6000
    labels = method.random_labels(outputs=3)
    counts = torch.bincount(labels.flatten(), minlength=3).double() / labels.numel()
    assert labels.shape == (4, 6000) and torch.allclose(counts, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.01)
    with pytest.raises(ValueError, match="`num_classes` = 5 exceeds"):
        RandomLabel(num_classes=5).random_labels(outputs=3)


def test_random_label_restarts_its_labels_for_every_learning_rate():
    """Under ``lr_grid`` each rate's run starts from the original weights at epoch 0: the same rate twice gives the
    same weights, so both candidates score exactly the same on validation."""
    module, *_ = run(RandomLabel(epochs=2, batch_size=4, seed=1), lr_grid=[LR, LR])
    first, second = [c for c in module.lr_search["candidates"] if c["epochs"] == 2]  # each rate's whole run
    assert (
        first["val_loss"] == second["val_loss"] and first["val_loss"] != module.lr_search["candidates"][0]["val_loss"]
    )


# --------------------------------------------------------------------------------------------------- L1Sparse
def test_l1_sparse_equals_hand_computation_with_the_decaying_penalty():
    """``CE(D_r) + α_e Σ_selected |θ|`` with ``α_e = α(1 − e/(E − E₀))``: 3 epochs, ``E₀ = 1`` → α, α/2, 0."""
    alpha = 0.05
    method = L1Sparse(epochs=3, batch_size=64, alpha=alpha, no_l1_epochs=1)
    assert [method.alpha_at(e) for e in range(3)] == [alpha, alpha / 2, 0.0]
    module, before, after, steps = run(method)
    _, d = tiny_data()
    masks = masks_of(module, before)

    def loss(a: float):
        return lambda p: ce(p, d["xr"], d["yr"]) + a * sum((p[n].abs() * masks[n]).sum() for n in p)

    assert steps == 3
    assert_matches(module, before, after, sgd_by_hand(before, [loss(alpha), loss(alpha / 2), loss(0.0)], masks))


def test_l1_sparse_schedule_edges():
    assert [L1Sparse(epochs=4, alpha=1.0).alpha_at(e) for e in range(4)] == [1.0, 0.75, 0.5, 0.25]  # official default
    assert [L1Sparse(epochs=2, alpha=1.0, no_l1_epochs=2).alpha_at(e) for e in range(2)] == [1.0, 1.0]  # their elif


# ------------------------------------------------------------------------------------------------------ SCRUB
def test_scrub_equals_hand_computation_and_keeps_the_teacher_out_of_the_module():
    """3 epochs, ``msteps = 2``: max (−KL_T on D_f), min (γ CE + α KL_T on D_r), max, min, min; KL_T =
    ``T² KL(softmax(t/T) ‖ softmax(s/T))`` against the original weights, one SGD state for all steps."""
    alpha, gamma, temperature = 0.5, 0.9, 2.0
    method = SCRUB(epochs=3, batch_size=64, forget_batch_size=64, msteps=2, temperature=temperature,
                   alpha=alpha, gamma=gamma)  # fmt: skip
    net = tiny_net()
    keys = set(UnlearnModule(model=net, data=tiny_data()[0], method=SCRUB(), estimator="hutchinson").state_dict())
    module, before, after, steps = run(method)
    _, d = tiny_data()

    def kl(p: Params, x: torch.Tensor) -> torch.Tensor:
        teacher = F.softmax(logits(before, x) / temperature, dim=1)
        student = F.log_softmax(logits(p, x) / temperature, dim=1)
        return (teacher * (teacher.log() - student)).sum(1).mean() * temperature**2

    def maximise(p):
        return -kl(p, d["xf"])

    def minimise(p):
        return gamma * ce(p, d["xr"], d["yr"]) + alpha * kl(p, d["xr"])

    assert steps == 5
    assert_matches(module, before, after, sgd_by_hand(before, [maximise, minimise, maximise, minimise, minimise],
                                                      masks_of(module, before)))  # fmt: skip
    # the teacher: the original weights, untrained, frozen, and not part of the module's state or parameters
    teacher = values(method.teacher)
    assert all(torch.equal(teacher[n], before[n]) for n in before)
    assert not any(p.requires_grad for p in method.teacher.parameters())
    assert set(module.state_dict()) == keys and not any("teacher" in k for k in keys)
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in net.parameters())


def test_scrub_without_max_steps_is_distillation_on_the_retain_set():
    """``msteps = 0``: only min steps (one per epoch)."""
    *_, steps = run(SCRUB(epochs=2, batch_size=64, msteps=0))
    assert steps == 2


# ------------------------------------------------------------------------------------------ FirstOrderRemoval
@pytest.mark.parametrize("criterion", ["fixed", "loss"])
def test_first_order_removal_is_theta_plus_tau_times_the_summed_forget_gradient(criterion):
    """``θ_S + τ Σ_{i∈D_f} ∇ℓ(x_i, y_i)`` at the applied step (fixed, or the one the validation search chose)."""
    method = FirstOrderRemoval(steps=[0.05], criterion=criterion) if criterion == "fixed" else FirstOrderRemoval(
        criterion=criterion
    )
    _, d = tiny_data()
    # forget: all trained on class 0; validation: the same inputs as class 1, so moving away from class 0 helps
    y = torch.zeros(6, dtype=torch.long)
    data = UnlearnData(TensorDataset(d["xf"], y), TensorDataset(d["xr"], d["yr"]), TensorDataset(d["xf"], y + 1))
    module, before, after, _ = run(method, data=data)
    tau = method.result["step"]
    assert tau > 0 and (criterion == "loss" or tau == 0.05)
    g = grad(lambda p: ce(p, d["xf"], y) * len(y))(before)  # Σ_i ∇ℓ(x_i, y_i): the mean's gradient times |D_f|
    masks = masks_of(module, before)
    expected = {n: torch.where(masks[n], before[n] + tau * g[n], before[n]) for n in before}
    assert_matches(module, before, after, expected)


def test_first_order_needs_corrected_labels_where_removal_does_not():
    with pytest.raises(ValueError, match="corrected_labels"):
        UnlearnModule(model=tiny_net(), data=tiny_data()[0], method=FirstOrder(), selection=LastLayer()).prepare()
    assert not FirstOrderRemoval.needs_corrected_labels and FirstOrderRemoval().one_step


# ----------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("factory", "argument"),
    [
        (lambda: RandomLabel(order="interleaved"), "`order` must be one of"),
        (lambda: RandomLabel(num_classes=1), "`num_classes`"),
        (lambda: L1Sparse(alpha=-1.0), "`alpha`"),
        (lambda: L1Sparse(epochs=2, no_l1_epochs=3), "`no_l1_epochs`"),
        (lambda: SCRUB(msteps=-1), "`msteps`"),
        (lambda: SCRUB(temperature=0.0), "`temperature`"),
        (lambda: SCRUB(gamma=-0.5), "`alpha` and `gamma`"),
        (lambda: SCRUB(forget_batch_size=0), "`forget_batch_size`"),
        (lambda: RandomLabel(epochs=0), "`epochs`"),
    ],
)
def test_bad_arguments_name_the_argument(factory, argument):
    with pytest.raises(ValueError, match=argument):
        factory()


def test_registered_by_name():
    for cls in (RandomLabel, L1Sparse, SCRUB, FirstOrderRemoval):
        assert METHODS[cls.name] is cls and not cls.needs_corrected_labels


# ------------------------------------------------------------------- a user's plain nn.Module, removal-only data
@pytest.fixture(scope="module")
def own():
    """A plain MLP trained on blobs with 40 of class 0 labelled 1 (``test_own_model``'s request); forget those 40
    without corrected labels, keep the rest, validate on clean blobs."""
    data, raw = make_data(corrected=False, test=False)
    return train(make_net(), raw["x"], raw["poisoned"]), data


def unlearn_own(own, method, selection=None, lr: float = 0.1) -> tuple[nn.Module, dict, Params, Params]:
    """``unlearn_model`` on a copy of the user's model; returns it, the report, the weights before and after."""
    net = copy.deepcopy(own[0])
    before = values(net)
    sgd = lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)  # noqa: E731
    report = unlearn_model(net, own[1], method, selection or LastLayer(), accelerator="cpu", optimizer=sgd)
    return net, report, before, values(net)


def assert_only_last_layer_moved(before: Params, after: Params) -> None:
    assert torch.equal(after["0.weight"], before["0.weight"]) and torch.equal(after["0.bias"], before["0.bias"])
    assert not torch.equal(after["2.weight"], before["2.weight"])


def test_random_label_on_an_own_model_with_removal_only_data(own):
    _, report, before, after = unlearn_own(own, RandomLabel(epochs=3, batch_size=64, seed=0))
    assert_only_last_layer_moved(before, after)
    assert report["after"]["forget/acc"] < report["before"]["forget/acc"]  # the fit to the poisoned labels drops
    assert report["method"]["seed"] == 0 and report["method"]["method"] == "random_label"


def test_l1_sparse_on_an_own_model_shrinks_the_selection_more_than_fine_tuning(own):
    def l1(weights: Params) -> float:
        return float(weights["2.weight"].abs().sum() + weights["2.bias"].abs().sum())

    _, _, before, finetuned = unlearn_own(own, Finetune(epochs=2, batch_size=64))
    _, report, _, sparse = unlearn_own(own, L1Sparse(epochs=2, batch_size=64, alpha=0.01))
    assert_only_last_layer_moved(before, sparse)
    assert l1(sparse) < l1(finetuned) and report["method"]["alpha"] == 0.01


def test_scrub_on_an_own_model_forgets_and_leaves_its_teacher_behind(own):
    method = SCRUB(epochs=3, batch_size=64, forget_batch_size=64)
    net, report, before, after = unlearn_own(own, method, AllLayers(), lr=0.05)
    assert report["after"]["forget/acc"] < report["before"]["forget/acc"]
    assert report["after"]["val/acc"] > 80
    assert all(torch.equal(t, before[n]) for n, t in values(method.teacher).items())  # the original, untouched


def test_first_order_removal_on_an_own_model_where_first_order_is_refused(own):
    with pytest.raises(ValueError, match="corrected_labels"):
        unlearn_own(own, FirstOrder())
    # the validation loss's search (the flipped samples' true labels are unknown here: see test_auto for the target's)
    _, report, before, after = unlearn_own(own, FirstOrderRemoval(criterion="loss"))
    assert_only_last_layer_moved(before, after)
    assert report["method"]["step"] > 0
    assert report["after"]["forget/acc"] < report["before"]["forget/acc"]
    assert report["after"]["val/acc"] > report["before"]["val/acc"]


# ------------------------------------------------------------------------------------- on a run of the library
@pytest.mark.parametrize(
    "method",
    [
        lambda: RandomLabel(epochs=1, batch_size=64),
        lambda: L1Sparse(epochs=1, batch_size=64, alpha=1e-4),
        lambda: SCRUB(epochs=1, batch_size=64, forget_batch_size=256, msteps=1),  # 1 max step (a zero gradient), 2 min
        lambda: FirstOrderRemoval(steps=[1e-5], criterion="fixed"),
    ],
    ids=["random_label", "l1_sparse", "scrub", "first_order_removal"],
)
def test_each_runs_on_a_training_run_and_freezes_the_rest(poisoned_run, method):
    """The library's ``PoisonedDataModule`` (MNIST CNN, debug run): a few steps on the smallest-diagonal layer."""
    module = UnlearnModule(str(poisoned_run), method(), LastLayer(), evaluate=False)
    before = {n: p.detach().clone() for n, p in module.net_named_parameters()}
    unlearn_trainer(accelerator="cpu", limit_train_batches=3).fit(module)
    after = dict(module.net_named_parameters())
    assert module.selected_names and all(
        torch.equal(after[n], v) != (n in module.selected_names) for n, v in before.items()
    )


def test_scrub_from_the_command_line_writes_its_settings_into_the_report(poisoned_run, tmp_path):
    """``unlearn.py -c configs/unlearn/scrub.yaml`` on a run (a short budget): the report names the method and its
    settings; the unlearned checkpoint holds the student only."""
    config = Path(__file__).resolve().parents[1] / "configs" / "unlearn" / "scrub.yaml"
    short = ["--model.method.init_args.epochs", "1", "--model.method.init_args.forget_batch_size", "256"]
    short += ["--model.selection", "LastLayer", "--trainer.limit_train_batches", "3", "--trainer.accelerator", "cpu"]
    short += ["--evaluation.mia", "false", "--evaluation.relearn", "false", "--trainer.enable_progress_bar", "false"]
    logger = ["--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.name", "scrub"]
    main(["unlearn", "-c", str(config), "--model.run", str(poisoned_run), *short, *logger])
    (report_path,) = tmp_path.glob("scrub/version_*/report.json")
    report = json.loads(report_path.read_text())
    assert report["method"] | {"method": "scrub", "msteps": 2, "temperature": 4.0, "epochs": 1} == report["method"]
    state = torch.load(report_path.parent / "unlearned.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert not any("teacher" in key for key in state)


def test_scrub_on_a_fitted_lightning_module_and_its_data_module():
    """The teacher is a copy of a LightningModule that a Trainer fitted (its Trainer is not copied along); the data
    module has no ``corrected_forget_dataloader`` in use: SCRUB reads the forget and retain loaders only."""
    import lightning.pytorch as pl
    from support.own_model import ForgetData, TinyClassifier

    model, data = TinyClassifier(num_classes=3), ForgetData()
    pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_checkpointing=False).fit(model, data)
    method = SCRUB(epochs=2, batch_size=32, forget_batch_size=32, msteps=1)
    before = values(model)
    report = unlearn_model(model, data, method, AllLayers(), accelerator="cpu")
    assert method.teacher is not model and method.teacher._trainer is None
    assert all(torch.equal(t, before[n]) for n, t in values(method.teacher).items())
    assert any(not torch.equal(p, before[n]) for n, p in values(model).items())
    assert report["method"]["method"] == "scrub"
