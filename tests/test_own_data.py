"""A user's own data with no workarounds (issue 31, Why 3–7): dict batches through ``batch_transform``, idiomatic
data modules under the CLI, a report that never passes overall accuracy off as the attack, ``output_transform`` named
for a model that returns a tuple, and warnings for a forget set that looks unlearned already or that the retain or
validation split still holds.

Tiny MLPs on synthetic blobs (seconds); every check reads what the request did, not a flag it set.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_own_model import make_data, make_net, train
from torch import nn
from torch.utils.data import TensorDataset

from lightning_unlearn import FirstOrder, LastLayer, UnlearnData, UnlearnModule
from lightning_unlearn.unlearn.adapters.source import ForgetSetWarning
from lightning_unlearn.unlearn.module import SplitOverlapWarning, unlearn_trainer


def _trained(raw: dict[str, torch.Tensor]) -> nn.Module:
    return train(make_net(), raw["x"], raw["poisoned"])


@pytest.fixture(scope="module")
def poisoned():
    data, raw = make_data()
    return _trained(raw), raw


def _dicts(dataset: TensorDataset) -> list[dict[str, torch.Tensor]]:
    return [{"pixels": x, "target": y} for x, y in dataset]


def _dict_data(data: UnlearnData, **kwargs) -> UnlearnData:
    """``data``'s splits as lists of dict items ``{"pixels", "target"}``: keys the library does not guess."""
    return UnlearnData(
        forget=_dicts(data._forget), retain=_dicts(data._retain), val=_dicts(data._val), test=_dicts(data._test),
        corrected_labels=data.corrected, attacked_class=data.attacked_class, batch_size=64, **kwargs,
    )  # fmt: skip


def _request(net: nn.Module, data, method=None, **kwargs) -> dict:
    clone = make_net()
    clone.load_state_dict(net.state_dict())
    module = UnlearnModule(model=clone, data=data, method=method or FirstOrder(), selection=LastLayer(), **kwargs)
    unlearn_trainer(logger=False).fit(module)
    return module.report


def test_dict_batches_through_batch_transform_give_the_same_request_as_tuples(poisoned):
    """Why 5: dict items with the user's own keys run through ``batch_transform`` (on the data or on the request)
    and give exactly the request the same samples as tuples give; without it the error names the remedy."""
    net, raw = poisoned
    data, _ = make_data()
    as_tuples = _request(net, data)

    def keys(item: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return item["pixels"], item["target"]

    on_data = _request(net, _dict_data(data, batch_transform=keys))
    on_request = _request(net, _dict_data(data), batch_transform=keys)
    for report in (on_data, on_request):
        assert report["method"]["step"] == as_tuples["method"]["step"]
        assert report["after"] == pytest.approx(as_tuples["after"], abs=1e-9)
    with pytest.raises(ValueError, match=r"`batch_transform`") as error:
        _request(net, _dict_data(data))
    assert "pixels" in str(error.value) and "corrected_labels" not in str(error.value)


def test_a_data_module_with_dict_batches_and_save_hyperparameters_runs_under_the_cli(tmp_path):
    """Why 3 and 5: ``--model.data`` naming an idiomatic LightningDataModule (``save_hyperparameters()``, dict batches
    read by its ``batch_transform`` given on the command line) runs the request and reports the attacked class."""
    from support.own_model import ForgetData, TinyClassifier

    from lightning_unlearn.cli import unlearn_main

    data = ForgetData()
    torch.manual_seed(0)
    model = TinyClassifier(num_classes=3, in_channels=4, lr=0.3)
    trainer = pl.Trainer(max_epochs=30, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, torch.utils.data.DataLoader(TensorDataset(data.x, data.poisoned), batch_size=32, shuffle=True))
    trainer.save_checkpoint(tmp_path / "poisoned.ckpt")
    report = unlearn_main([
        "-c", "configs/unlearn/sa_first_order.yaml",
        "--model.model", str(tmp_path / "poisoned.ckpt"),
        "--model.model_class", "support.own_model.TinyClassifier",
        "--model.data", "support.own_model.IdiomaticForgetData",
        "--model.data.batch_size", "16",
        "--model.batch_transform", "support.own_model.pixels_and_target",
        "--model.selection", "LastLayer",
        "--evaluation.mia", "false", "--evaluation.relearn", "false", "--trainer.accelerator", "cpu",
    ])  # fmt: skip
    written = json.loads((Path(report["output_dir"]) / "report.json").read_text())
    assert written["poison"]["kind"] == "targeted"  # its attacked_class was read
    assert written["after"]["test/acc_attacked"] > written["before"]["test/acc_attacked"]


def test_the_progress_bar_shows_the_requests_version_not_the_staging_folders(tmp_path):
    """Why 8: the CLI's logger writes into a staging folder until the request is put in place; the progress bar
    shows ``v_num=3`` for ``version_3``, not the staging name's last four letters (``v_num=ging``)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_unlearn.cli import _show_version

    logger = TensorBoardLogger(tmp_path, name="r", version=".version_3.1.ab.lightning-unlearn.staging")
    trainer = pl.Trainer(logger=logger, enable_progress_bar=True)
    bar = trainer.progress_bar_callback
    assert bar.get_metrics(trainer, None)["v_num"] == "ging"  # what Lightning shows for it
    _show_version(trainer, "version_3")
    assert bar.get_metrics(trainer, None)["v_num"] == 3


def test_without_an_attacked_class_the_harm_is_stated_as_overall_accuracy_and_said_to_be(poisoned):
    """Why 4: no ``attacked_class`` → no class row, and the poison effect names overall test accuracy and how to
    state it on the attacked class, instead of calling overall accuracy the attack."""
    net, raw = poisoned
    data, _ = make_data()
    data.attacked_class = None
    clean = raw["poisoned"].clone()
    clean[raw["flipped"]] = 0
    retrained = train(make_net(1), raw["x"][_keep(raw)], clean[_keep(raw)])
    report = _request(net, data, reference=retrained)
    effect = report["poison_effect"]
    assert effect["metric"] == "test/acc" and "no attacked class was given" in effect["statement"]
    assert "`attacked_class`" in effect["statement"]
    assert "test/acc_attacked" not in report["after"]


class LogitsAndFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x), x


def test_a_model_returning_a_tuple_is_refused_naming_output_transform(poisoned):
    """Why 6: a forward that returns ``(logits, features)`` gets an error naming ``output_transform=``, not
    ``'tuple' object has no attribute …``; with it, the request runs."""
    net, _ = poisoned
    data, _ = make_data()
    model = LogitsAndFeatures()
    model.net.load_state_dict(net.state_dict())
    with pytest.raises(ValueError, match=r"output_transform"):
        UnlearnModule(model=model, data=data, method=FirstOrder(), selection=LastLayer()).prepare()
    module = UnlearnModule(model=model, data=data, method=FirstOrder(), selection=LastLayer(),
                           output_transform=lambda out: out[0])  # fmt: skip
    unlearn_trainer(logger=False).fit(module)
    assert module.report["after"]["test/acc_attacked"] > module.report["before"]["test/acc_attacked"]


def _no_warnings_of(category, run) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [w for w in caught if issubclass(w.category, category)]


def test_a_forget_set_the_model_never_trained_on_or_of_other_samples_is_warned_about(poisoned):
    """Why 7: a forget set that already reads at the held-out level (samples never trained on; an index bug that
    picks other images) is warned about; the real forget set is not."""
    net, raw = poisoned
    data, _ = make_data()
    assert not _no_warnings_of(ForgetSetWarning, lambda: _request(net, data))
    # never trained on: a model trained on the retain set only, asked to forget the flip
    clean = train(make_net(), raw["x"][_keep(raw)], raw["poisoned"][_keep(raw)])
    caught = _no_warnings_of(ForgetSetWarning, lambda: _request(clean, data))
    assert caught and "already meets the request's target 'corrected'" in str(caught[0].message)
    # an index bug: class-0 images that were never flipped, given as the flipped ones (poisoned label 1, corrected 0)
    unflipped = torch.tensor([i for i in torch.nonzero(raw["poisoned"] == 0).flatten().tolist()][:40])
    wrong = UnlearnData(
        forget=TensorDataset(raw["x"][unflipped], torch.ones(40, dtype=torch.long)), retain=data._retain,
        val=data._val, test=data._test, corrected_labels=torch.zeros(40, dtype=torch.long), attacked_class=0,
        batch_size=64,
    )  # fmt: skip
    caught = _no_warnings_of(ForgetSetWarning, lambda: _request(net, wrong))
    assert caught and "indices into the right split" in str(caught[0].message)


def _keep(raw: dict[str, torch.Tensor]) -> torch.Tensor:
    keep = torch.ones(len(raw["x"]), dtype=torch.bool)
    keep[raw["flipped"]] = False
    return keep


def test_a_retain_or_validation_split_that_holds_forget_samples_is_warned_about(poisoned):
    """Why 7: forget samples found in the retain split (by content) are warned about, with their count."""
    net, raw = poisoned
    data, _ = make_data()
    assert not _no_warnings_of(SplitOverlapWarning, lambda: _request(net, data))
    x, y = raw["x"], raw["poisoned"]
    leaky = UnlearnData(
        forget=data._forget, retain=TensorDataset(x, y), val=data._val, test=data._test,
        corrected_labels=data.corrected, attacked_class=0, batch_size=64,
    )  # fmt: skip
    caught = _no_warnings_of(SplitOverlapWarning, lambda: _request(net, leaky))
    assert caught and "40" in str(caught[0].message) and "retain" in str(caught[0].message)

