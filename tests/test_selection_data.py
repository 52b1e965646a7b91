"""Data-aware selections (``Saliency``, ``FisherRatio``), profiles keyed by split, and the ``SSD`` method.

A tiny float64 MLP on synthetic data, removal-only (no corrected labels). Every result is checked against an
independent computation: gradients and per-sample squared gradients by ``torch.func``, batch importances by a plain
loop, the dampening written out by hand; frozen entries must stay bit-identical.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

from lightning_unlearn import (
    METHODS,
    SSD,
    STRATEGIES,
    FisherRatio,
    ParameterMask,
    Saliency,
    TopKParameters,
    UnlearnData,
    UnlearnModule,
    unlearn_model,
)
from lightning_unlearn.selection import EmptySelectionError, SmallestLayer
from lightning_unlearn.unlearn.methods.ssd import dampening_factor
from lightning_unlearn.unlearn.module import unlearn_trainer

DIM, CLASSES = 4, 3


def make_request(seed: int = 0) -> tuple[nn.Module, UnlearnData, dict[str, torch.Tensor]]:
    """A float64 MLP trained on 40 samples, 10 of them (mislabelled as class 2) to forget; no corrected labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, DIM, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    y[:10] = 2  # the forget set: labels the model was trained on
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(DIM, 5), nn.ReLU(), nn.Linear(5, CLASSES)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    xv = torch.randn(12, DIM, generator=g, dtype=torch.float64)
    data = UnlearnData(
        forget=TensorDataset(x[:10], y[:10]),
        retain=TensorDataset(x[10:], y[10:]),
        val=TensorDataset(xv, (xv[:, 0] > 0).long()),
        batch_size=7,
    )
    # the training set as trained on: retain then forget (UnlearnData's default order)
    raw = {"xf": x[:10], "yf": y[:10], "xt": torch.cat([x[10:], x[:10]]), "yt": torch.cat([y[10:], y[:10]])}
    return net.eval(), data, raw


def per_sample_grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def batch_importance(net: nn.Module, x: torch.Tensor, y: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """SSD's ``calc_importance`` written out: squared batch-mean gradients, averaged over consecutive batches."""
    out = {k: torch.zeros_like(p) for k, p in net.named_parameters()}
    starts = range(0, len(x), size)
    for s in starts:
        net.zero_grad()
        F.cross_entropy(net(x[s : s + size]), y[s : s + size]).backward()
        for k, p in net.named_parameters():
            out[k] += p.grad**2
    net.zero_grad()
    return {k: v / len(starts) for k, v in out.items()}


def fit(module: UnlearnModule) -> None:
    unlearn_trainer(accelerator="cpu", max_epochs=module.max_epochs).fit(module)


def test_registered_and_refused_without_data():
    assert STRATEGIES["saliency"] is Saliency and STRATEGIES["fisher_ratio"] is FisherRatio and METHODS["ssd"] is SSD
    net, _, _ = make_request()
    from lightning_unlearn.curvature import SharpnessProfile

    profile = SharpnessProfile.from_model(net, {k: torch.ones_like(p) for k, p in net.named_parameters()}, "exact", 1)
    with pytest.raises(ValueError, match="needs the model and its forget set"):
        Saliency()(profile)
    for bad, match in (
        (lambda: Saliency(fraction=0.0), "`fraction` must lie in"),
        (lambda: FisherRatio(alpha=-1), "`alpha` must be"),
        (lambda: FisherRatio(importance="hutchinson"), "`importance` must be one of"),
        (lambda: FisherRatio(batch_size=0), "`batch_size` must be"),
        (lambda: SSD(dampening=0), "`dampening` must be"),
    ):
        with pytest.raises(ValueError, match=match):
            bad()


def test_saliency_is_the_top_fraction_of_the_forget_gradient_magnitude():
    net, data, raw = make_request()
    module = UnlearnModule(model=net, data=data, method=SSD(), selection=Saliency(fraction=0.3), evaluate=False)
    module.prepare()
    # by hand: the mean forget loss at the trained-on labels, one threshold over the whole model
    grads = torch.autograd.grad(F.cross_entropy(net(raw["xf"]), raw["yf"]), list(net.parameters()))
    flat = torch.cat([g.abs().reshape(-1) for g in grads])
    k = int(0.3 * flat.numel())
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[torch.topk(flat, k).indices] = True
    got = torch.cat([module.mask.masks.get(n, torch.zeros_like(p, dtype=torch.bool)).reshape(-1)
                     for n, p in net.named_parameters()])  # fmt: skip
    assert torch.equal(got, expected) and module.mask.num_selected == k
    assert module.mask.details["threshold"] == pytest.approx(float(flat[expected].min()))


class _Context:
    """Any object with the statistics the selection reads (the UnlearnContext protocol)."""

    def __init__(self, gradient):
        self.gradient = gradient

    def split_gradient(self, split):
        assert split == "forget"
        return self.gradient


def test_saliency_breaks_ties_by_position():
    context = _Context({"a": torch.tensor([1.0, -1.0, 1.0]), "b": torch.tensor([[-1.0, 1.0]])})
    mask = Saliency(fraction=0.5).select_for(context)  # int(0.5 * 5) = 2 of five equal magnitudes: the first two
    assert mask.masks["a"].tolist() == [True, True, False] and "b" not in mask.masks


@pytest.mark.parametrize("importance", ["batch", "fisher"])
def test_fisher_ratio_selects_where_forget_importance_exceeds_alpha_times_full(importance):
    net, data, raw = make_request()
    alpha = 1.5
    selection = FisherRatio(alpha=alpha, importance=importance, batch_size=4)
    module = UnlearnModule(model=net, data=data, method=SSD(), selection=selection, evaluate=False)
    module.prepare()
    if importance == "batch":  # SSD's definition, batches of 4 consecutive samples (the last one smaller)
        forget = batch_importance(net, raw["xf"], raw["yf"], 4)
        full = batch_importance(net, raw["xt"], raw["yt"], 4)
    else:  # the empirical Fisher: mean of per-sample squared gradients
        forget = {k: (g**2).mean(0) for k, g in per_sample_grads(net, raw["xf"], raw["yf"]).items()}
        full = {k: (g**2).mean(0) for k, g in per_sample_grads(net, raw["xt"], raw["yt"]).items()}
        assert module.split_profile("forget", "fisher").metadata["split"] == "forget"
    selected = 0
    for name, f in forget.items():
        expected = f > alpha * full[name]
        got = module.mask.masks.get(name, torch.zeros_like(expected))
        assert torch.equal(got, expected), name
        selected += int(expected.sum())
    assert 0 < selected < sum(p.numel() for p in net.parameters())  # the criterion bites, both ways
    assert module.mask.details["alpha"] == alpha and module.mask.details["importance"] == importance


def test_split_profile_of_the_forget_set_is_kept_in_memory():
    net, data, raw = make_request()
    # a selection that reads curvature: the training profile is computed (a last-layer request would compute none)
    module = UnlearnModule(model=net, data=data, selection=SmallestLayer(), method=SSD(), estimator="fisher")
    module.prepare()
    forget = module.split_profile("forget")
    assert forget is module.split_profile("forget") and forget.metadata["split"] == "forget"
    assert forget.num_samples == 10 and module.split_profile("train") is module.profile  # the training profile
    expected = {k: (g**2).mean(0) for k, g in per_sample_grads(net, raw["xf"], raw["yf"]).items()}
    for name, value in expected.items():
        torch.testing.assert_close(forget.diagonals[name].double(), value, rtol=1e-6, atol=1e-12)


def test_ssd_dampens_exactly_the_selected_entries_and_reuses_the_selections_importances():
    net, data, raw = make_request()
    original = {k: p.detach().clone() for k, p in net.named_parameters()}
    forget = batch_importance(net, raw["xf"], raw["yf"], 4)
    full = batch_importance(net, raw["xt"], raw["yt"], 4)
    alpha, lam = 1.5, 0.7
    module = UnlearnModule(
        model=net, data=data, method=SSD(dampening=lam), selection=FisherRatio(alpha, batch_size=4), evaluate=False
    )
    fit(module)
    changed = 0
    for name, p in net.named_parameters():
        chosen = forget[name] > alpha * full[name]
        # θ ← θ · min(λ · I_full / I_forget, 1) where chosen (I_forget > 0 there), untouched elsewhere
        factor = torch.clamp(lam * full[name] / forget[name].clamp_min(1e-300), max=1.0)
        expected = torch.where(chosen, original[name] * factor, original[name])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=0)
        assert torch.equal(p.detach()[~chosen], original[name][~chosen])  # bit-identical
        changed += int((p.detach() != original[name]).sum())
    assert changed > 0
    # the importances were computed once, by the selection; SSD read them from the module
    assert set(module.split_computations.values()) == {1} and len(module.split_computations) == 2
    report = module.method.report()
    assert report["importance"] == "batch" and report["batch_size"] == 4 and report["dampening"] == lam


def test_ssd_with_another_selection_on_a_users_model_through_unlearn_model():
    net, data, raw = make_request()
    original = {k: p.detach().clone() for k, p in net.named_parameters()}
    forget = batch_importance(net, raw["xf"], raw["yf"], 128)
    full = batch_importance(net, raw["xt"], raw["yt"], 128)
    report = unlearn_model(net, data, SSD(dampening=2.0), TopKParameters(fraction=0.5), accelerator="cpu",
                           estimator="fisher")  # fmt: skip
    assert report["method"]["importance"] == "batch" and report["method"]["batch_size"] == 128
    selected = report["selection"]["num_selected"]
    dampened = 0
    mask_names = set()
    for name, p in net.named_parameters():
        factor = torch.where(forget[name] > 0, (2.0 * full[name] / forget[name]).clamp(max=1.0), 1.0)
        moved = p.detach() != original[name]
        if moved.any():
            mask_names.add(name)
            torch.testing.assert_close(p.detach()[moved], (original[name] * factor)[moved], rtol=1e-10, atol=0)
        dampened += int(moved.sum())
    assert 0 < dampened <= selected == report["method"]["selected"]
    assert dampened == report["method"]["dampened"]


def test_ssd_refuses_validated_and_splits_are_checked():
    from lightning_unlearn import Validated

    net, data, _ = make_request()
    original = [p.detach().clone() for p in net.parameters()]
    module = UnlearnModule(model=net, data=data, method=SSD(), selection=Validated(k=1), estimator="fisher")
    with pytest.raises(ValueError, match="SSD has no step"):
        fit(module)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), original, strict=True))
    with pytest.raises(ValueError, match="`split` must be one of"):
        module.split_profile("test")


def test_dampening_factor_keeps_entries_without_forget_importance():
    factor = dampening_factor(torch.tensor([0.0, 2.0, 1.0, 4.0]), torch.tensor([0.0, 0.5, 3.0, 0.0]), 1.0)
    assert factor.tolist() == [1.0, 0.25, 1.0, 0.0]


def test_a_mask_from_select_for_is_refused_when_empty():
    class Nothing(Saliency):
        def select_for(self, context):
            return self.checked(ParameterMask({}, self.name))

    with pytest.raises(EmptySelectionError, match="selected no parameter"):  # a ValueError
        Nothing().select_for(None)
    assert issubclass(EmptySelectionError, ValueError)


def test_sharpness_profiler_profiles_the_forget_split_after_training(tmp_path):
    import lightning.pytorch as pl
    from support.own_model import ForgetData, TinyClassifier

    from lightning_unlearn import SharpnessProfiler

    data = ForgetData()
    torch.manual_seed(0)
    model = TinyClassifier(num_classes=3, in_channels=4, lr=0.3)
    profiler = SharpnessProfiler(split="forget", estimator="fisher", progress=False, dirpath=str(tmp_path))
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[profiler], limit_val_batches=0)  # fmt: skip
    trainer.fit(model, datamodule=data)
    profile = profiler.profile
    assert profile.metadata["split"] == "forget" and profile.num_samples == len(data.positions) == 30
    x, y = data.x[data.positions], data.poisoned[data.positions]  # the labels the model was trained on
    expected = {k: (g**2).mean(0) for k, g in per_sample_grads(model.eval(), x, y).items()}
    for name, value in expected.items():
        torch.testing.assert_close(profile.diagonals[name], value, rtol=1e-4, atol=1e-9)


def test_ssd_config_runs_from_the_cli_on_a_users_checkpoint(tmp_path):
    import json
    from pathlib import Path

    import lightning.pytorch as pl
    from support.own_model import ForgetData, TinyClassifier

    from lightning_unlearn.cli import unlearn_main

    data = ForgetData()
    torch.manual_seed(0)
    model = TinyClassifier(num_classes=3, in_channels=4, lr=0.3)
    trainer = pl.Trainer(max_epochs=20, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, torch.utils.data.DataLoader(TensorDataset(data.x, data.poisoned), batch_size=32, shuffle=True))
    trainer.save_checkpoint(tmp_path / "poisoned.ckpt")
    report = unlearn_main([
        "-c", "configs/unlearn/ssd.yaml", "--model.model", str(tmp_path / "poisoned.ckpt"),
        "--model.model_class", "support.own_model.TinyClassifier", "--model.data", "support.own_model.ForgetData",
        "--model.selection.init_args.alpha", "2.0", "--model.estimator", "fisher",
        "--evaluation.mia", "false", "--evaluation.relearn", "false", "--trainer.accelerator", "cpu",
    ])  # fmt: skip
    written = json.loads((Path(report["output_dir"]) / "report.json").read_text())
    assert written["selection"]["strategy"] == "fisher_ratio" and written["selection"]["alpha"] == 2.0
    assert written["method"]["method"] == "ssd" and written["method"]["dampened"] > 0
    after = TinyClassifier.load_from_checkpoint(Path(report["output_dir"]) / "unlearned.ckpt", weights_only=True)
    moved = sum(int((a != b).sum()) for a, b in zip(after.parameters(), model.parameters(), strict=True))
    assert moved == written["method"]["dampened"]
