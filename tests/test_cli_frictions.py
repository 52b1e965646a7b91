"""The command-line frictions of issue 15 (item 3), one test each (each fails on the CLI before the fix).

* ``train`` takes any LightningModule / LightningDataModule by class path (subclass mode), the library's classes
  staying the defaults with their data → model links, links that leave other classes alone;
* the profiler attaches by its short name, on the command line and in a config, to the user's own classes;
* no dead or shadowing options: ``unlearn`` has no top-level ``--data`` / ``--optimizer`` / ``--lr_scheduler``,
  ``train`` refuses a top-level ``--optimizer`` that would replace the library model's ``--model.optimizer``;
* ``lightning-unlearn --help`` describes every command, every command's ``--help`` names it, ``profile`` and
  ``sweep`` take ``-c`` (as ``train`` and ``unlearn`` do).

The user's classes are :mod:`support.own_model` (synthetic tensors, a two-layer MLP): every fit here is one or two
epochs of four batches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_unlearn.__main__ import COMMANDS, main
from lightning_unlearn.callbacks import SharpnessProfiler
from lightning_unlearn.cli import TrainCLI, UnlearnCLI
from lightning_unlearn.data.datamodule import PoisonedDataModule
from lightning_unlearn.models.classifier import ClassifierModule

ROOT = Path(__file__).resolve().parents[1]
OWN = "support.own_model"
QUIET = ("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false")


@pytest.fixture(autouse=True)
def _command_line(monkeypatch):
    """As ``lightning-unlearn ARGS``: LightningCLI reads ``sys.argv`` too (pytest's arguments are not ours)."""
    monkeypatch.setattr(sys, "argv", ["lightning-unlearn"])


def own_fit(tmp_path: Path, *extra: str, model: str = "TinyClassifier", data: str = "TinyData") -> list[str]:
    """``train fit`` arguments for the user's own classes, one epoch, the run under ``tmp_path``."""
    return [
        "fit",
        "--model",
        f"{OWN}.{model}",
        "--data",
        f"{OWN}.{data}",
        "--trainer.max_epochs",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path),
        *QUIET,
        *extra,
    ]


# -- train: any LightningModule / LightningDataModule by class path


def test_train_takes_own_module_and_data_by_class_path(tmp_path, capsys):
    from support.own_model import TinyClassifier, TinyData

    cli = TrainCLI(args=own_fit(tmp_path, "--data.num_classes", "5", "--model.hidden", "7"))
    assert type(cli.model) is TinyClassifier and type(cli.datamodule) is TinyData
    # the data module's num_classes / in_channels reach the model's arguments of those names (both have them)
    assert cli.model.hparams.num_classes == 5 and cli.model.net[-1].out_features == 5
    assert cli.model.hparams.in_channels == 4 and cli.model.hparams.hidden == 7
    # their own defaults, not those of the default classes' arguments of the same name (PoisonedDataModule: 128)
    assert cli.datamodule.batch_size == 16
    run = Path(cli.trainer.log_dir)
    assert run.parent.parent == tmp_path  # the default logger under default_root_dir
    results = json.loads((run / "results.json").read_text())
    assert 0.0 <= results["metrics"]["test/acc"] <= 100.0  # tested after fit, with the model's own test_step
    assert "Test metrics of TinyClassifier" in capsys.readouterr().out
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["class_path"] == f"{OWN}.TinyClassifier"
    assert config["data"]["class_path"] == f"{OWN}.TinyData"
    # the run's config.yaml is a config the command takes back
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "fit", "-c", str(run / "config.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["init_args"]["num_classes"] == 5 and printed["model"]["init_args"]["hidden"] == 7


def test_own_classes_from_a_config_file(tmp_path):
    config = tmp_path / "own.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"class_path": f"{OWN}.TinyClassifier", "init_args": {"lr": 0.25}},
                "data": {"class_path": f"{OWN}.TinyData", "init_args": {"num_classes": 4, "n": 32}},
            }
        )
    )
    cli = TrainCLI(args=["-c", str(config), "--trainer.logger", "false", *QUIET], run=False)
    assert cli.model.hparams.lr == 0.25 and cli.model.hparams.num_classes == 4 and cli.datamodule.n == 32


def test_library_classes_stay_the_defaults_with_their_links():
    """Every existing config and option still means the library's classes, and the dataset → model links apply."""
    configs = ("-c", str(ROOT / "configs" / "mnist_cnn_targeted.yaml"), "-c", str(ROOT / "configs" / "debug.yaml"))
    cli = TrainCLI(args=[*configs, "--data.poison.count", "7", "--trainer.logger", "false"], run=False)
    assert type(cli.model) is ClassifierModule and type(cli.datamodule) is PoisonedDataModule
    assert cli.datamodule.poison.count == 7 and cli.datamodule.train_subset == 2000
    linked = ("--data.pad_to", "32", "--data.repeat_channels", "3", "--trainer.logger", "false")
    cli = TrainCLI(args=[*linked, "--model.arch_kwargs", '{"batch_norm": true}'], run=False)
    assert type(cli.model) is ClassifierModule and type(cli.datamodule) is PoisonedDataModule
    hparams = cli.model.hparams
    assert (hparams.num_classes, hparams.in_channels, hparams.image_size) == (10, 3, 32)
    assert hparams.arch_kwargs == {"batch_norm": True}


def test_links_leave_classes_without_the_attributes_alone(tmp_path, capsys):
    from support.own_model import BareData, BareModule, TinyClassifier

    # a data module without num_classes / in_channels: the model keeps its own defaults (not ClassifierModule's)
    own = ["--model", f"{OWN}.TinyClassifier", "--data", f"{OWN}.BareData", "--trainer.logger", "false"]
    cli = TrainCLI(args=own, run=False)
    assert type(cli.model) is TinyClassifier and type(cli.datamodule) is BareData
    assert (cli.model.hparams.num_classes, cli.model.hparams.in_channels) == (2, 4)
    # a model without those arguments, on the library's data module (which has the attributes)
    cli = TrainCLI(args=["--model", f"{OWN}.BareModule", "--trainer.logger", "false"], run=False)
    assert type(cli.model) is BareModule and type(cli.datamodule) is PoisonedDataModule
    # neither has them; a model without its own optimizer gets LightningCLI's `--optimizer`; no test_step: no test
    adam = ("--optimizer", "Adam", "--optimizer.lr", "0.01")
    cli = TrainCLI(args=own_fit(tmp_path, *adam, model="BareModule", data="BareData"))
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 0.01
    assert cli.trainer.current_epoch == 1
    assert "Not tested after fit (`--test_after_fit`): BareModule has no test_step" in capsys.readouterr().out
    assert not (Path(cli.trainer.log_dir) / "results.json").exists()


# -- the profiler by its short name


@pytest.mark.parametrize("how", ["flag", "config"])
def test_profiler_by_short_name_on_own_classes(tmp_path, how):
    if how == "flag":
        attach = ["--trainer.callbacks+=SharpnessProfiler"]
    else:
        config = tmp_path / "profiler.yaml"
        callback = {"class_path": "SharpnessProfiler", "init_args": {"estimator": "exact"}}
        config.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
        attach = ["-c", str(config)]
    cli = TrainCLI(args=own_fit(tmp_path, *attach))
    profilers = [cb for cb in cli.trainer.callbacks if isinstance(cb, SharpnessProfiler)]
    assert len(profilers) == 1
    profile = Path(cli.trainer.log_dir) / "sharpness_profile.pt"
    assert profile.is_file()
    from lightning_unlearn.curvature import SharpnessProfile

    loaded = SharpnessProfile.load(profile)
    assert loaded.num_samples == 64 and {"net.0.weight", "net.2.weight"} <= set(loaded.diagonals)


# -- no dead or shadowing options


def test_unlearn_has_no_dead_or_shadowing_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    options = {line.split()[0] for line in lines if line.startswith("  --")}
    assert "--model.optimizer" in options  # the one way to set the optimizer
    assert not options & {"--data", "--optimizer", "--optimizer.help", "--lr_scheduler", "--lr_scheduler.help"}
    request = ["-c", str(ROOT / "configs" / "unlearn" / "finetune_all.yaml"), "--model.run", "no-such-run"]
    for given, hint in (
        (["--optimizer", "Adam", "--optimizer.lr", "1.0"], "`--model.optimizer`"),
        (["--lr_scheduler", "StepLR"], "`--model.optimizer`"),
        (["--data", f"{OWN}.TinyData"], "`--model.run`"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            UnlearnCLI(args=[*request, *given])  # refused while parsing: before the (missing) run is looked at
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert f"unrecognized arguments: {given[0]}" in error.lower() and hint in error, error


def test_train_refuses_an_optimizer_that_would_replace_the_models(capsys):
    for given, option in ((["--optimizer", "Adam"], "--model.optimizer"), (["--lr_scheduler", "StepLR"], None)):
        args = [*given, "--data.train_subset", "64", "--trainer.logger", "false"]
        if option is None:  # a scheduler needs an optimizer's step: `--lr_scheduler.step_size`
            args += ["--lr_scheduler.step_size", "1"]
            option = "--model.lr_scheduler"
        with pytest.raises(SystemExit) as exit_info:
            TrainCLI(args=args, run=False)
        assert exit_info.value.code == 2
        assert f"`{option}`" in capsys.readouterr().err


# -- help and -c


def test_top_level_help_describes_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in COMMANDS:
        line = next(line for line in out.splitlines() if line.split()[:1] == [command])
        assert len(line.split()) >= 4, line  # the command and a description of it


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_help_names_it(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lightning-unlearn {command} "), out[:200]
    if command != "demo":  # the demo has no options to configure
        assert "[-c CONFIG]" in " ".join(out.split("\n\n")[0].split()), out[:400]


@pytest.mark.parametrize("option", ["-c", "--config"])
@pytest.mark.parametrize(
    ("command", "setting", "message"),
    [("profile", {"estimator": "bogus"}, "`estimator` must be one of"), ("sweep", {"method": "bogus"}, "`method`")],
)
def test_profile_and_sweep_take_c(tmp_path, option, command, setting, message):
    config = tmp_path / "command.yaml"
    config.write_text(yaml.safe_dump(setting))
    with pytest.raises(ValueError, match=message):  # the config's value reached the command (checked before any work)
        main([command, option, str(config), str(tmp_path / "no-such-run")])
