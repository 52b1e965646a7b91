"""Unlearning a model the library did not train: ``UnlearnModule(model=..., data=...)``.

Tiny models on synthetic blobs; every check against an independent computation (the update by hand with autograd,
bit-identity of frozen parameters, the user's own parameter names).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import TensorDataset

from lightning_unlearn import (
    AllLayers,
    Finetune,
    FirstOrder,
    LastLayer,
    NegGradPlus,
    SharpnessProfiler,
    UnlearnData,
    UnlearnModule,
)
from lightning_unlearn.unlearn.module import unlearn_trainer

NUM_CLASSES, DIM = 3, 6


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    centres = torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(0)) * 2.5
    return centres[y] + torch.randn(n, DIM, generator=g), y


def make_data(corrected: bool = True, test: bool = True) -> tuple[UnlearnData, dict[str, torch.Tensor]]:
    """Class 0 → 1 label flip on 40 of the 300 training samples."""
    x, y = blobs(300, 1)
    flipped = torch.nonzero(y == 0).flatten()[:40]
    poisoned = y.clone()
    poisoned[flipped] = 1
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[flipped] = False
    xv, yv = blobs(150, 2)
    xt, yt = blobs(150, 3)
    data = UnlearnData(
        forget=TensorDataset(x[flipped], poisoned[flipped]),
        retain=TensorDataset(x[keep], y[keep]),
        val=TensorDataset(xv, yv),
        corrected_labels=y[flipped] if corrected else None,
        test=TensorDataset(xt, yt) if test else None,
        attacked_class=0,
        batch_size=64,
    )
    return data, {"x": x, "poisoned": poisoned, "flipped": flipped}


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 200) -> nn.Module:
    opt = torch.optim.Adam(net.parameters(), lr=0.03)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def poisoned():
    data, raw = make_data()
    return train(make_net(), raw["x"], raw["poisoned"]), data, raw


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_first_order_on_a_plain_module_is_the_hand_computed_update_under_the_models_own_names(poisoned):
    net, data, raw = poisoned
    net = make_net()
    net.load_state_dict(poisoned[0].state_dict())
    before = snapshot(net)
    step = 3e-3
    module = UnlearnModule(
        model=net, data=data, method=FirstOrder(steps=[step], criterion="fixed"), selection=LastLayer()
    )
    unlearn_trainer().fit(module)

    assert set(module.profile.diagonals) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # the model's own names
    assert module.mask.layers == ["2"]
    # by hand: g = Σ_i ∇[ℓ(x_i, corrected_i) − ℓ(x_i, poisoned_i)] over the forget set, θ_2 ← θ_2 − τ g
    reference = make_net()
    reference.load_state_dict({k: v for k, v in before.items()})
    xf, yp = raw["x"][raw["flipped"]], raw["poisoned"][raw["flipped"]]
    yc = torch.zeros_like(yp)  # the flipped samples are all of class 0
    logits = reference(xf)
    loss = (F.cross_entropy(logits, yc, reduction="sum") - F.cross_entropy(logits, yp, reduction="sum")).double()
    grads = torch.autograd.grad(loss, [reference[2].weight, reference[2].bias])
    after = snapshot(net)
    torch.testing.assert_close(after["2.weight"], before["2.weight"] - step * grads[0].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after["2.bias"], before["2.bias"] - step * grads[1].float(), rtol=1e-5, atol=1e-6)
    for name in ("0.weight", "0.bias"):  # hard-frozen: bit-identical
        assert torch.equal(after[name], before[name]), name


def test_own_model_request_restores_the_attacked_class_and_reports_it(poisoned, tmp_path):
    net, data, raw = poisoned
    net = make_net()
    net.load_state_dict(poisoned[0].state_dict())
    retrained = train(make_net(1), *(t for t in (raw["x"][_keep(raw)], _clean_labels(raw)[_keep(raw)])))
    logger = TensorBoardLogger(tmp_path, name="own")
    module = UnlearnModule(model=net, data=data, method=FirstOrder(), selection=AllLayers(), reference=retrained)
    unlearn_trainer(logger=logger).fit(module)

    report = module.report
    effect = report["poison_effect"]
    assert effect["metric"] == "test/acc_attacked" and effect["harm"] > 10  # the flip bites: class 0 loses points
    assert report["after"]["test/acc_attacked"] > report["before"]["test/acc_attacked"] + 5
    assert report["restored"]["test_restored/acc_attacked"] > 20
    assert report["method"]["step"] > 0 and report["method"]["candidates"]
    assert report["after"]["val/acc"] >= report["before"]["val/acc"] - 1.0
    scalars = _logged_scalars(logger.log_dir)
    for key in ("before/test/acc_attacked", "after/test/acc_attacked", "comparison/tow", "poison/harm", "unlearn/step"):
        assert key in scalars, key
    assert math.isclose(scalars["after/test/acc_attacked"], report["after"]["test/acc_attacked"], rel_tol=1e-6)


def _keep(raw: dict[str, torch.Tensor]) -> torch.Tensor:
    keep = torch.ones(len(raw["x"]), dtype=torch.bool)
    keep[raw["flipped"]] = False
    return keep


def _clean_labels(raw: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = raw["poisoned"].clone()
    labels[raw["flipped"]] = 0
    return labels


def _logged_scalars(log_dir: str) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir)
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}


class TupleOutput(pl.LightningModule):
    """A user's LightningModule whose forward returns ``(logits, features)``."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(DIM, width), nn.ReLU())
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.head(features), features

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x)[0], y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.03)


def fit_tuple_model(x: torch.Tensor, y: torch.Tensor, path) -> None:
    """Train a :class:`TupleOutput` on ``(x, y)`` (3 epochs) and save its checkpoint at ``path``."""
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True)
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(TupleOutput(), loader)
    trainer.save_checkpoint(path)


def test_lightning_module_checkpoint_with_tuple_output_and_its_own_profile(poisoned, tmp_path):
    _, data, raw = poisoned
    path = tmp_path / "own.ckpt"
    fit_tuple_model(raw["x"], raw["poisoned"], path)

    module = UnlearnModule(
        model=str(path),
        model_class=f"{__name__}.TupleOutput",
        data=data,
        method=NegGradPlus(epochs=1),
        selection=LastLayer(),
        output_transform=lambda out: out[0],
    )
    frozen = {n: p.detach().clone() for n, p in module.names_root.named_parameters() if n.startswith("body")}
    unlearn_trainer(max_epochs=1).fit(module)
    assert module.mask.layers == ["head"]  # the LightningModule's own names
    for name, value in frozen.items():
        assert torch.equal(dict(module.names_root.named_parameters())[name], value), name
    assert module.report["after"]["forget/acc"] <= module.report["before"]["forget/acc"]


def test_profile_from_the_callback_on_the_users_trainer_fits_as_it_is(poisoned, tmp_path):
    _, data, raw = poisoned
    torch.manual_seed(0)

    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.03)

    model = Plain()
    train_loader = torch.utils.data.DataLoader(TensorDataset(raw["x"], raw["poisoned"]), batch_size=50)
    profiler = SharpnessProfiler(dataloader=train_loader, progress=False, log_histograms=False, log_figure=False)
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[profiler],
        default_root_dir=tmp_path,  # where the profiler saves its file
    )
    trainer.fit(model, train_loader)
    module = UnlearnModule(model=model, data=data, profile=profiler.profile, method=FirstOrder(), selection=LastLayer())
    unlearn_trainer().fit(module)
    assert module.mask.layers == ["net.2"]
    assert module.timings["profile_source"] == "given"


def test_removal_only_data_works_with_ascent_methods_and_is_refused_by_label_replacing_ones(poisoned):
    net, _, raw = poisoned
    data, _ = make_data(corrected=False, test=False)
    copy = make_net()
    copy.load_state_dict(net.state_dict())
    for method in (FirstOrder(), NegGradPlus(corrected_weight=0.5)):  # both use the corrected labels
        with pytest.raises(ValueError, match="corrected_labels"):
            UnlearnModule(model=copy, data=data, method=method, selection=LastLayer()).prepare()
    before = snapshot(copy)
    sgd = lambda params: torch.optim.SGD(params, lr=0.5)  # noqa: E731
    module = UnlearnModule(model=copy, data=data, method=NegGradPlus(epochs=3), selection=LastLayer(), optimizer=sgd)
    unlearn_trainer().fit(module)
    after = module.report["after"]
    assert "test/acc" not in after and "forget_true/acc" not in after  # no test split, no corrected labels
    assert after["forget/acc"] < module.report["before"]["forget/acc"]
    assert not torch.equal(copy[2].weight, before["2.weight"]) and torch.equal(copy[0].weight, before["0.weight"])


def test_finetune_logs_its_loss_per_epoch_with_few_steps(poisoned, tmp_path):
    net, data, _ = poisoned
    copy = make_net()
    copy.load_state_dict(net.state_dict())
    logger = TensorBoardLogger(tmp_path, name="ft")
    module = UnlearnModule(model=copy, data=data, method=Finetune(epochs=2, batch_size=128), selection=AllLayers())
    unlearn_trainer(logger=logger).fit(module)  # 3 steps per epoch, far below log_every_n_steps=50
    scalars = _logged_scalars(logger.log_dir)
    assert "unlearn/retain_loss_epoch" in scalars and "after/val/acc" in scalars


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"run": "somewhere", "model": nn.Linear(2, 2)}, "exactly one of `run`"),
        ({}, "exactly one of `run`"),
        ({"run": nn.Linear(2, 2)}, "pass your own model as `model=`"),  # was a raw pathlib TypeError
        ({"model": nn.Linear(2, 2)}, "`data` is required"),
        ({"model": 3, "data": object()}, "`model` must be an nn.Module"),
        ({"model": "/nonexistent.ckpt", "data": object()}, "no checkpoint file"),
        ({"model": nn.Linear(2, 2), "data": object()}, "forget_dataloader"),
        ({"model": nn.Linear(2, 2), "model_class": "x.Y", "data": object()}, "`model_class` applies"),
        ({"model": nn.Linear(2, 2), "data": None, "reference": 3}, "`data` is required"),
    ],
)
def test_bad_sources_get_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        UnlearnModule(**kwargs)


def test_unlearn_data_checks_its_inputs():
    x, y = torch.randn(4, DIM), torch.tensor([0, 1, 2, 0])
    ds = TensorDataset(x, y)
    with pytest.raises(ValueError, match="one per forget sample"):
        UnlearnData(forget=ds, retain=ds, val=ds, corrected_labels=[0, 1])
    with pytest.raises(ValueError, match="`val` is empty"):
        UnlearnData(forget=ds, retain=ds, val=TensorDataset(x[:0], y[:0]))
    with pytest.raises(ValueError, match="attacked_class"):
        UnlearnData(forget=ds, retain=ds, val=ds, attacked_class=-1)
    with pytest.raises(ValueError, match="class indices"):
        next(iter(UnlearnData(forget=TensorDataset(x, x[:, 0]), retain=ds, val=ds).forget_dataloader()))
    data = UnlearnData(forget=ds, retain=ds, val=torch.utils.data.DataLoader(ds), corrected_labels=ds)
    pairs = next(iter(data.forget_pairs_dataloader()))
    assert torch.equal(pairs[1], y) and torch.equal(pairs[2], y) and torch.equal(pairs[3], torch.arange(4))
    assert len(data.train_dataset()) == 8 and repr(data).startswith("UnlearnData(forget=4")


def test_a_run_that_is_not_the_librarys_points_to_model_and_data(tmp_path):
    """The friction: ``run=`` on a user's own checkpoint said "saved from another architecture?"."""
    torch.manual_seed(0)
    model = TupleOutput()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, torch.utils.data.DataLoader(TensorDataset(torch.randn(8, DIM), torch.arange(8) % 3)))
    trainer.save_checkpoint(tmp_path / "own.ckpt")
    with pytest.raises(ValueError, match=r"not a checkpoint of this library's ClassifierModule.*pass `model=`"):
        UnlearnModule(run=str(tmp_path / "own.ckpt"))


def test_the_request_pipeline_writes_an_own_checkpoint_that_reopens_unlearned(poisoned, tmp_path):
    """``run_unlearning`` (what ``unlearn.py`` runs) on an own LightningModule checkpoint: report.json, and an
    ``unlearned.ckpt`` that reopens with the model's own class and holds exactly the unlearned weights."""
    import json

    from lightning_unlearn.pipeline import run_unlearning
    from lightning_unlearn.reference import evaluate_reference

    _, data, raw = poisoned
    fit_tuple_model(raw["x"], raw["poisoned"], tmp_path / "poisoned.ckpt")
    fit_tuple_model(raw["x"][_keep(raw)], _clean_labels(raw)[_keep(raw)], tmp_path / "retrained.ckpt")

    module = UnlearnModule(
        model=str(tmp_path / "poisoned.ckpt"),
        model_class=TupleOutput,
        data=data,
        method=FirstOrder(),
        selection=LastLayer(),
        output_transform=lambda out: out[0],
    )
    options, reference, _ = evaluate_reference(tmp_path / "retrained.ckpt", data, poisoned=module.source)
    report = run_unlearning(unlearn_trainer(), module, reference, out_dir=tmp_path / "out", evaluation=options)
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["checkpoint"] == str(tmp_path / "poisoned.ckpt") and written["model"] == "TupleOutput"
    assert written["poison_effect"]["metric"] == "test/acc_attacked" and "comparison" in written
    assert report["after"]["test/acc_attacked"] == written["after"]["test/acc_attacked"]
    reopened = TupleOutput.load_from_checkpoint(tmp_path / "out" / "unlearned.ckpt", weights_only=True)
    for name, p in module.names_root.named_parameters():
        assert torch.equal(dict(reopened.named_parameters())[name], p.detach().cpu()), name
    with pytest.raises(ValueError, match="is the model to unlearn itself"):
        evaluate_reference(tmp_path / "poisoned.ckpt", data, poisoned=module.source)


def test_unlearn_cli_takes_an_own_lightning_module_checkpoint_and_data_module(tmp_path, capsys):
    """``unlearn.py --model.model CKPT --model.model_class … --model.data …``: the request runs on the user's classes,
    writes under the checkpoint's folder, and its ``unlearned.ckpt`` reopens with the user's class."""
    import json

    from support.own_model import ForgetData, TinyClassifier

    from lightning_unlearn.cli import unlearn_main

    data = ForgetData()
    for name, labels in (("poisoned", data.poisoned), ("retrained", None)):
        torch.manual_seed(0)
        model = TinyClassifier(num_classes=3, in_channels=4, lr=0.3)
        x, y = (data.x, labels) if labels is not None else (data.x[data.keep], data.y[data.keep])
        trainer = pl.Trainer(max_epochs=30, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(model, torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
        trainer.save_checkpoint(tmp_path / f"{name}.ckpt")

    args = [
        "-c",
        "configs/unlearn/sa_first_order.yaml",
        "--model.model",
        str(tmp_path / "poisoned.ckpt"),
        "--model.model_class",
        "support.own_model.TinyClassifier",
        "--model.data",
        "support.own_model.ForgetData",
        "--model.selection",
        "LastLayer",
        "--reference",
        str(tmp_path / "retrained.ckpt"),
        "--evaluation.mia",
        "false",
        "--evaluation.relearn",
        "false",
        "--trainer.accelerator",
        "cpu",
    ]
    report = unlearn_main(args)
    folder = Path(report["output_dir"])
    assert folder.parent.parent == tmp_path / "unlearn"  # beside the checkpoint, as a run's requests are
    written = json.loads((folder / "report.json").read_text())
    assert written["model"] == "TinyClassifier" and written["selection"]["layers"] == ["net.2"]
    assert written["poison_effect"]["metric"] == "test/acc_attacked"
    reopened = TinyClassifier.load_from_checkpoint(folder / "unlearned.ckpt", weights_only=True)
    before = TinyClassifier.load_from_checkpoint(tmp_path / "poisoned.ckpt", weights_only=True)
    assert torch.equal(reopened.net[0].weight, before.net[0].weight)  # hard-frozen
    assert not torch.equal(reopened.net[2].weight, before.net[2].weight)  # unlearned

    for bad, message in (
        (["--model.model", str(tmp_path / "poisoned.ckpt")], "needs `--model.data`"),
        (["--model.model", str(tmp_path / "nothing.ckpt"), "--model.data", "support.own_model.ForgetData"], "path of"),
    ):
        with pytest.raises(SystemExit):
            unlearn_main(["-c", "configs/unlearn/sa_first_order.yaml", *bad])
        assert message in capsys.readouterr().err


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_own_model_under_ddp_spawn_equals_one_process(poisoned):
    """Two gloo ranks (``ddp_spawn``) on an own model and ``UnlearnData``: the forget gradient is summed over the ranks'
    exact shards, so the one-step update equals one process's; rank zero's report comes back to the caller."""
    from lightning_unlearn.unlearn.module import TRAINER_DEFAULTS

    net, data, _ = poisoned
    results = {}
    for strategy in ("auto", "ddp_spawn"):
        copy = make_net()
        copy.load_state_dict(net.state_dict())
        method = FirstOrder(steps=[3e-3], criterion="fixed", batch_size=16)  # several batches per rank
        module = UnlearnModule(model=copy, data=data, method=method, selection=LastLayer())
        devices = 2 if strategy == "ddp_spawn" else 1
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=devices,
            strategy=strategy,
            logger=False,
            enable_progress_bar=False,
            max_epochs=1,
            **TRAINER_DEFAULTS,
        )
        trainer.fit(module)
        results[strategy] = (snapshot(module.names_root), module.report)
    (one, one_report), (two, two_report) = results["auto"], results["ddp_spawn"]
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7)
    assert two_report["after"] == pytest.approx(one_report["after"])
