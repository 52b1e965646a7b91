"""Unlearning: hand-computed one-step updates, exact inverse-HVP solves, hard-freeze bit-identity, SAM mechanics."""

import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import Trainer
from torch import nn

from lightning_unlearn.run import TrainingRun
from lightning_unlearn.selection import (
    AllLayers,
    LastLayer,
    NamedLayers,
    RandomEntries,
    SmallestLayer,
    TopKParameters,
    Validated,
)
from lightning_unlearn.unlearn import (
    Finetune,
    FirstOrder,
    NegGradPlus,
    SamForget,
    SecondOrder,
    SharpMinMax,
    UnlearnModule,
    get_method,
)
from lightning_unlearn.unlearn.methods.inverse_hvp import conjugate_gradient, lissa
from lightning_unlearn.unlearn.methods.one_step import forget_gradient
from lightning_unlearn.unlearn.methods.sam import Perturbation


def make_trainer(**kwargs) -> Trainer:
    from lightning_unlearn.unlearn.module import unlearn_trainer

    return unlearn_trainer(**{"accelerator": "cpu", "max_epochs": 1, **kwargs})


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


# ------------------------------------------------------------------------------------------------ pure functions
def test_forget_gradient_matches_closed_form_for_softmax_regression():
    """For logits = W x + b, ∇ CE(y_true) − ∇ CE(y_poisoned) = (e_poisoned − e_true) xᵀ: independent of p."""
    torch.manual_seed(0)
    net = nn.Linear(5, 3).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    y_true = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    y_poisoned = (y_true + torch.tensor([1, 2, 1, 2, 1, 1, 2])) % 3
    g_w, g_b = forget_gradient(net, x, y_poisoned, y_true, [net.weight, net.bias])
    diff = F.one_hot(y_poisoned, 3).double() - F.one_hot(y_true, 3).double()
    torch.testing.assert_close(g_w, diff.T @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_b, diff.sum(0), rtol=1e-12, atol=1e-12)


def _tiny_relu_problem():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    names = [n for n, _ in net.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    shapes = [p.shape for p in net.parameters()]

    def loss_of(flat):
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            n = shape.numel()
            params[name] = flat[offset : offset + n].reshape(shape)
            offset += n
        return F.cross_entropy(torch.func.functional_call(net, params, (x,)), y)

    hessian = torch.func.hessian(loss_of)(flat0)

    def hvp(v):
        flat = flat0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of(flat), flat, create_graph=True)
        (hv,) = torch.autograd.grad(g @ v, flat)
        return hv

    return hessian, hvp, torch.randn(len(flat0), dtype=torch.float64)


@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_cg_and_lissa_converge_to_exact_inverse_hvp(margin):
    hessian, hvp, b = _tiny_relu_problem()
    # only the *diagonal* of a ReLU net's Hessian equals the GGN's: the full matrix can be indefinite
    damping = max(0.0, -float(torch.linalg.eigvalsh(hessian).min())) + margin
    exact = torch.linalg.solve(hessian + damping * torch.eye(len(b), dtype=b.dtype), b)
    x_cg, info = conjugate_gradient(hvp, b, damping, max_iter=500, tol=1e-12)
    assert info.status == "converged"
    torch.testing.assert_close(x_cg, exact, rtol=1e-8, atol=1e-10)
    top = float(torch.linalg.eigvalsh(hessian).max()) + damping
    x_lissa, info = lissa(hvp, b, damping, scale=1.05 * top, depth=5_000, tol=1e-13)
    assert info.status == "converged"
    torch.testing.assert_close(x_lissa, exact, rtol=1e-6, atol=1e-8)


def test_lissa_guard_and_cg_negative_curvature():
    hessian, hvp, b = _tiny_relu_problem()
    _, info = lissa(hvp, b, 0.01, scale=1e-3, depth=200)  # scale far below the top eigenvalue
    assert info.status == "diverged"
    _, info = conjugate_gradient(lambda v: -v, b, 0.0)
    assert info.status == "negative_curvature"


def test_perturbation_is_restored_exactly():
    torch.manual_seed(2)
    params = [nn.Parameter(torch.randn(10, 10)), nn.Parameter(torch.randn(10))]
    before = [p.detach().clone() for p in params]
    eps = Perturbation(params, [torch.randn(10, 10), torch.randn(10)], rho=0.37, sign=1.0)
    assert eps.applied and not torch.equal(params[0], before[0])
    eps.restore()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    skipped = Perturbation(params, [torch.full((10, 10), float("nan")), None], rho=0.37, sign=1.0)
    assert not skipped.applied and torch.equal(params[0], before[0])


# ---------------------------------------------------------------------------------------- with a real tiny run
def _hand_forget_gradient(run_dir, selected: list[str]) -> dict[str, torch.Tensor]:
    """Per-sample float64 loop over the forget set (an independent computation of g)."""
    classifier = TrainingRun.from_path(run_dir).load_classifier().double().eval()
    dm = TrainingRun.from_path(run_dir).datamodule()
    dm.setup("fit")
    params = dict(classifier.named_parameters())
    total = {name: torch.zeros_like(params[name]) for name in selected}
    for x, y_poisoned, y_true, _ in dm.forget_pairs_dataloader(batch_size=1):
        logits = classifier(x.double())
        for label, sign in ((y_true, 1.0), (y_poisoned, -1.0)):
            grads = torch.autograd.grad(
                F.cross_entropy(logits, label), [params[n] for n in selected], retain_graph=True
            )
            for name, grad in zip(selected, grads, strict=True):
                total[name] += sign * grad
    return total


def test_first_order_equals_hand_computed_update(poisoned_run):
    module = UnlearnModule(str(poisoned_run), FirstOrder(steps=[1e-3], criterion="fixed"), LastLayer())
    before = params_of(module)
    make_trainer().fit(module)
    selected = ["net.fc2.weight", "net.fc2.bias"]
    assert module.mask.trainable == selected
    g = _hand_forget_gradient(poisoned_run, selected)
    for name, value in params_of(module).items():
        if name in selected:
            torch.testing.assert_close(value.double(), before[name].double() - 1e-3 * g[name], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(value, before[name]), name


def test_second_order_diag_equals_hand_computed_update(poisoned_run):
    method = SecondOrder(solver="diag", damping=0.5, steps=[1.0], criterion="fixed")
    module = UnlearnModule(str(poisoned_run), method, LastLayer())
    before = params_of(module)
    make_trainer().fit(module)
    selected = ["net.fc2.weight", "net.fc2.bias"]
    g = _hand_forget_gradient(poisoned_run, selected)
    n = module.num_train_samples
    h = {name: n * module.profile.diagonals[name].double() for name in selected}
    level = torch.cat([h[name].reshape(-1) for name in selected]).mean()
    for name in selected:
        expected = before[name].double() - g[name] / (h[name] + 0.5 * level)
        torch.testing.assert_close(params_of(module)[name].double(), expected, rtol=1e-5, atol=1e-6)


def test_second_order_cg_runs_and_reports(poisoned_run):
    method = SecondOrder(solver="cg", damping=1.0, steps=[1.0], criterion="fixed", max_iter=20, hvp_samples=256)
    module = UnlearnModule(str(poisoned_run), method, LastLayer())
    make_trainer().fit(module)
    report = method.report()
    (solve,) = report["solves"]
    assert report["solver"] == "cg" and solve["iterations"] >= 1 and solve["residual"] < 1.0


METHODS = [
    lambda: FirstOrder(steps=[1e-3], criterion="fixed"),
    lambda: SecondOrder(steps=[0.5], criterion="fixed"),
    lambda: Finetune(batch_size=64),
    lambda: NegGradPlus(batch_size=64),
    lambda: SamForget(batch_size=64, rho=0.1),
]


@pytest.mark.parametrize(
    ("make_method", "selection"),
    [
        *[(m, s) for m in METHODS for s in (SmallestLayer(), TopKParameters(0.05))],
        (METHODS[0], RandomEntries(0.05, seed=1)),
        (METHODS[2], RandomEntries(0.05, seed=1)),
    ],
    ids=[
        *[
            f"{m}-{s}"
            for m in ("first_order", "second_order", "finetune", "neggrad_plus", "sam")
            for s in ("smallest", "topk")
        ],
        "first_order-random_entries",
        "finetune-random_entries",
    ],
)
def test_frozen_parameters_are_bit_identical(poisoned_run, make_method, selection):
    """With weight decay and momentum in the optimizer, nothing outside the mask moves, bit for bit."""

    def optimizer(params):
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.1)

    module = UnlearnModule(str(poisoned_run), make_method(), copy.deepcopy(selection), optimizer=optimizer)
    before = params_of(module)
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    make_trainer(limit_train_batches=4).fit(module)
    after = params_of(module)
    changed = 0
    for name, value in after.items():
        keep = module.mask.masks.get(name, torch.zeros_like(value, dtype=torch.bool))
        assert torch.equal(value[~keep], before[name][~keep]), f"frozen entries of {name} moved"
        changed += int((value[keep] != before[name][keep]).sum())
    assert changed > 0, "the selected parameters did not change"
    assert all(torch.equal(b, buffers[name]) for name, b in module.named_buffers())


def test_sharp_minmax_changes_both_parts(poisoned_run):
    module = UnlearnModule(str(poisoned_run), SharpMinMax(batch_size=64), SmallestLayer())
    before = params_of(module)
    trainer = make_trainer(limit_train_batches=3)
    trainer.fit(module)
    moved = {name for name, value in params_of(module).items() if not torch.equal(value, before[name])}
    assert moved & module.selected_names and moved - module.selected_names
    assert trainer.global_step == 6  # two optimizer steps per batch: retain branch, then forget branch


def test_sam_keeps_batchnorm_statistics_and_counts_steps(bn_run):
    module = UnlearnModule(str(bn_run), SamForget(batch_size=32, rho=0.5), SmallestLayer(layer_types="all"))
    stats = {name: b.clone() for name, b in module.named_buffers() if "running" in name}
    assert stats, "the BN model has running statistics"
    trainer = make_trainer(limit_train_batches=3)  # the forget set has 100 samples: 4 batches of 32
    trainer.fit(module)
    assert trainer.global_step == 3
    for name, b in module.named_buffers():
        if name in stats:
            assert torch.equal(b, stats[name]), name


@pytest.mark.parametrize("criterion", ["loss", "acc"])
def test_one_step_search_uses_validation_and_never_worsens_it(poisoned_run, criterion):
    method = FirstOrder(criterion=criterion)
    module = UnlearnModule(str(poisoned_run), method, SmallestLayer())
    acc_before, loss_before = module.validate()
    make_trainer().fit(module)
    report = method.report()
    chosen = next(c for c in report["candidates"] if c["step"] == report["step"])
    if criterion == "loss":
        assert chosen["val_loss"] <= loss_before
        assert chosen["val_loss"] == min(c["val_loss"] for c in report["candidates"])
        assert {c["phase"] for c in report["candidates"]} >= {"grid", "refine"}  # a bracket was found and refined
    else:
        assert chosen["val_acc"] >= acc_before
        assert {c["step"] for c in report["candidates"]} == {0.0, *method.steps}  # accuracy: the grid only
    acc, loss = module.validate()  # the model is left at the chosen step
    assert acc == pytest.approx(chosen["val_acc"]) and loss == pytest.approx(chosen["val_loss"], rel=1e-6)
    assert {0.0, *method.steps} <= {c["step"] for c in report["candidates"]}
    assert report["evaluations"] == len(report["candidates"])


def test_second_order_searches_its_damping(poisoned_run):
    method = SecondOrder(damping=[0.1, 1.0, 10.0], criterion="loss")  # the strict minimum (no noise test)
    module = UnlearnModule(str(poisoned_run), method, LastLayer())
    make_trainer().fit(module)
    report = method.report()
    assert {c["damping_relative"] for c in report["candidates"]} == {0.1, 1.0, 10.0}
    best = min(report["candidates"], key=lambda c: (c["val_loss"], c["step"]))
    assert (report["damping_relative"], report["step"]) == (best["damping_relative"], best["step"])
    assert module.validate()[1] == pytest.approx(best["val_loss"], rel=1e-6)


def test_validated_selection_picks_what_separate_requests_pick(poisoned_run):
    """Validated = the candidate whose own request (same method, same search) reaches the lowest validation loss,
    with exactly that request's weights; everything else bit-identical to the trained model."""
    validated = Validated(k=2, last_layer=True, topk_fraction=0.01)
    module = UnlearnModule(str(poisoned_run), FirstOrder(), validated)
    before = params_of(module)
    make_trainer().fit(module)
    profile = module.profile
    separate = {}
    for label, mask in validated.candidates(profile):
        strategy = TopKParameters(0.01) if mask.strategy == "topk" else NamedLayers(mask.layers)
        other = UnlearnModule(str(poisoned_run), FirstOrder(), strategy)
        make_trainer().fit(other)
        separate[label] = (other.method.report()["val_loss"], params_of(other))
    assert len(separate) >= 3
    chosen = min(separate, key=lambda label: separate[label][0])
    report = module.method.report()
    assert report["selection"] == chosen == module.mask.details["chosen"]
    assert report["val_loss"] == pytest.approx(separate[chosen][0], rel=1e-6)
    after = params_of(module)
    for name, value in after.items():
        torch.testing.assert_close(value, separate[chosen][1][name], rtol=1e-6, atol=1e-7)
        keep = module.mask.masks.get(name, torch.zeros_like(value, dtype=torch.bool))
        assert torch.equal(value[~keep], before[name][~keep]), f"entries of {name} outside the chosen candidate moved"
    assert {row["selection"] for row in module.mask.details["candidates"]} == set(separate)


def test_learning_rate_grid_keeps_the_best_rate_on_validation(poisoned_run):
    """Each rate runs from the original weights on the same data order: the kept weights are exactly those of a
    separate request with the chosen rate, and the chosen rate has the lowest validation loss ("no change" too)."""
    grid = [1e-3, 0.1]
    module = UnlearnModule(str(poisoned_run), Finetune(batch_size=64), AllLayers(), lr_grid=grid)
    trainer = make_trainer(limit_train_batches=3, max_epochs=module.max_epochs)
    trainer.fit(module)
    search = module.lr_search
    assert [c["lr"] for c in search["candidates"]] == [0.0, *grid]
    assert trainer.current_epoch == len(grid)
    best = min(search["candidates"], key=lambda c: c["val_loss"])
    assert search["lr"] == best["lr"] and module.validate()[1] == pytest.approx(best["val_loss"], rel=1e-6)

    def optimizer(params):
        return torch.optim.SGD(params, lr=search["lr"], momentum=0.9)

    alone = UnlearnModule(str(poisoned_run), Finetune(batch_size=64), AllLayers(), optimizer=optimizer)
    make_trainer(limit_train_batches=3).fit(alone)
    if search["lr"] > 0:
        for name, value in params_of(module).items():
            assert torch.equal(value, params_of(alone)[name]), name
    with pytest.raises(ValueError, match="`lr_grid`"):
        UnlearnModule(str(poisoned_run), FirstOrder(), AllLayers(), lr_grid=[0.1])
    with pytest.raises(ValueError, match="`lr_grid`"):
        UnlearnModule(str(poisoned_run), Finetune(), AllLayers(), lr_grid=[0.1, -1.0])


@pytest.mark.parametrize(
    ("factory", "argument"),
    [
        (lambda: get_method("retrain"), "`method` must be one of"),
        (lambda: FirstOrder(steps=[]), "`steps`"),
        (lambda: FirstOrder(steps=[-1.0]), "`steps`"),
        (lambda: FirstOrder(criterion="auc"), "`criterion`"),
        (lambda: FirstOrder(steps=[1e-3, 1e-2], criterion="fixed"), "exactly one step"),
        (lambda: SecondOrder(solver="qr"), "`solver`"),
        (lambda: SamForget(rho=-1), "`rho`"),
        (lambda: NegGradPlus(alpha=2), "`alpha`"),
        (lambda: Finetune(epochs=0), "`epochs`"),
    ],
)
def test_bad_method_arguments(factory, argument):
    with pytest.raises(ValueError, match=argument):
        factory()


# --------------------------------------------------------------------------------------------------- end to end
def test_unlearn_cli_end_to_end_improves_target_class(poisoned_run, retrained_run, tmp_path):
    """SA first-order through `unlearn.py`: report, TensorBoard, a loadable unlearned checkpoint, class 9 improves."""
    import json

    from lightning_unlearn.__main__ import main
    from lightning_unlearn.models import ClassifierModule

    config = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "configs/unlearn/sa_first_order.yaml")
    main(
        [
            "unlearn",
            "-c",
            config,
            "--model.run",
            str(poisoned_run),
            "--reference",
            str(retrained_run),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
            # the CLI's cap on SalUn's attack: two subsamples of 1,000 (its default, the full sets: test_pipeline.py)
            "--evaluation.mia_samples",
            "1000",
            "--evaluation.mia_subsample_repeats",
            "2",
        ]
    )
    out = tmp_path / "firstorder_smallestlayer" / "version_0"
    report = json.loads((out / "report.json").read_text())
    assert report["selection"]["strategy"] == "smallest" and report["method"]["method"] == "first_order"
    candidates = report["method"]["candidates"]
    assert report["method"]["step"] > 0 and {c["step"] for c in candidates} >= {0.0, *FirstOrder().steps}
    assert report["after"]["test/acc_attacked"] > report["before"]["test/acc_attacked"]
    no_change = next(c for c in candidates if c["step"] == 0.0)
    assert report["method"]["val_loss"] <= no_change["val_loss"]  # chosen on validation loss, never worse
    assert report["method"]["seconds_update"] > 0 and report["method"]["seconds_search"] > 0  # timed (no bound)
    # the evaluation suite: every model judged on accuracies, MIA and the relearning attack, compared by ToW
    salun = {f"mia/salun_{name}" for name in ("correctness", "confidence", "entropy", "prob")}
    salun |= {"mia/m_entropy_song_mittal"}
    salun |= {f"{key}_std" for key in salun}
    for model in ("before", "after", "reference"):
        assert {"mia/svc", "mia/loss_auc_forget", "relearn/recovery", *salun} <= set(report[model]), model
        assert report[model]["mia/salun_members"] == report[model]["mia/salun_nonmembers"] == 1000  # 3,800 retain
        assert report[model]["mia/salun_repeats"] == 2
        assert report[model]["mia/salun_forget"] == report["forget_samples"]
    assert "gap_mia_salun_confidence" in report["comparison"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in out.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {f"{model}/mia/salun_confidence" for model in ("before", "after", "reference")} <= tags
    from lightning_unlearn.evaluation import tow

    split = {"forget": "forget/acc", "retain": "retain/acc", "test": "test/acc"}
    after, reference = ({s: report[m][k] for s, k in split.items()} for m in ("after", "reference"))
    expected = tow(after, reference)
    assert report["comparison"]["tow"] == pytest.approx(expected)
    assert report["cost"]["seconds"] >= report["timings"]["fit_wall_seconds"] > 0
    assert report["cost"]["memory_device"] == "cpu" and report["cost"]["peak_mib"] > 0  # measured in the rank
    unlearned = ClassifierModule.load_from_checkpoint(out / "unlearned.ckpt", weights_only=True)
    before = TrainingRun.from_path(poisoned_run).load_classifier()
    layer = report["selection"]["layers"][0]
    for name, value in unlearned.state_dict().items():
        same = torch.equal(value, before.state_dict()[name])
        assert same != name.startswith(layer + "."), name  # exactly the selected layer changed
    assert list(out.glob("events.out.tfevents.*"))


@pytest.mark.timeout(300)  # the code before ran 1000 epochs here
def test_a_trainer_without_max_epochs_runs_the_methods_own_schedule(poisoned_run):
    """Lightning's default is 1000 epochs: a user's ``Trainer().fit(module)`` must still make one one-step update (a
    second epoch would compute a new gradient at the moved weights and step again) and an iterative method's epochs."""
    from lightning_unlearn.unlearn.module import unlearn_trainer

    one_step = UnlearnModule(str(poisoned_run), FirstOrder(criterion="fixed", steps=[1e-4]), LastLayer())
    before = {n: p.detach().clone() for n, p in one_step.net.named_parameters()}
    trainer = unlearn_trainer(accelerator="cpu")  # no max_epochs
    trainer.fit(one_step)
    assert trainer.current_epoch == 1
    reference = UnlearnModule(str(poisoned_run), FirstOrder(criterion="fixed", steps=[1e-4]), LastLayer())
    unlearn_trainer(accelerator="cpu", max_epochs=1).fit(reference)
    for name, p in one_step.net.named_parameters():
        assert torch.equal(p, dict(reference.net.named_parameters())[name]), name
    assert not torch.equal(one_step.net.fc2.weight, before["fc2.weight"])  # it did move, once
    iterative = UnlearnModule(str(poisoned_run), Finetune(epochs=2, batch_size=256), LastLayer())
    trainer = unlearn_trainer(accelerator="cpu", limit_train_batches=2)
    trainer.fit(iterative)
    assert trainer.current_epoch == 2
