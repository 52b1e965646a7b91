"""The training CLI: --help, --print_config, fast_dev_run, and a short real run that learns and writes its run dir."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_unlearn.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "mnist_cnn_targeted.yaml")
DEBUG = str(ROOT / "configs" / "debug.yaml")


def test_help_and_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "fit", "--help"])
    assert exit_info.value.code == 0
    assert "--data.poison POISON" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "fit", "-c", CONFIG, "--print_config"])
    printed = capsys.readouterr().out
    assert "target_class: 9" in printed and "architecture: mnist_cnn" in printed


def test_unknown_command_is_clear():
    with pytest.raises(SystemExit, match="one of \\{train"):
        main(["trian"])


def test_train_py_shim_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", "--print_config"], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "poison:" in out.stdout


@pytest.mark.parametrize("config", ["mnist_cnn_targeted", "mnist_cnn_untargeted"])
def test_fast_dev_run(tmp_path, config):
    main(
        [
            "train",
            "fit",
            "-c",
            str(ROOT / "configs" / f"{config}.yaml"),
            "-c",
            DEBUG,
            "--trainer.fast_dev_run",
            "true",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )


def test_short_real_run_learns_and_writes_run_dir(tmp_path, capsys):
    main(
        [
            "train",
            "fit",
            "-c",
            CONFIG,
            "-c",
            DEBUG,
            "--data.train_subset",
            "6000",
            "--data.poison.count",
            "300",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    run_dir = tmp_path / "mnist_cnn_targeted" / "version_0"
    assert "| test " in printed and str(run_dir) in printed

    record = json.loads((run_dir / "poison.json").read_text())
    assert len(record["indices"]) == 300 and set(record["true_labels"]) == {9}
    assert all(t != p for t, p in zip(record["true_labels"], record["poisoned_labels"], strict=True))
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "checkpoints").glob("*.ckpt"))

    metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
    assert metrics["test/acc"] > 80.0  # chance is 10 %: one epoch on 6,000 real images learns
    assert {"test/acc_attacked", "test/acc_other", "forget/acc", "forget_true/acc"} <= set(metrics)

    tags = set()
    for events in run_dir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/acc", "val/acc", "test/acc", "test/acc_attacked", "forget/acc"} <= tags


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "unlearn").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_unlearn_config_resolves(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "-c", str(config), "--model.run", "RUN", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lightning_unlearn.unlearn." in printed and "class_path: lightning_unlearn.selection." in printed


def test_demo_refuses_an_unknown_accelerator_before_training(tmp_path):
    with pytest.raises(ValueError, match="`accelerator` must be one of"):
        main(["demo", "--out", str(tmp_path / "demo"), "--accelerator", "tpuz"])
    assert not (tmp_path / "demo").exists() or not any((tmp_path / "demo").iterdir())  # nothing was trained


def test_the_documented_quick_check_of_random_sample_forgetting_parses(capsys):
    """The quick check ``configs/mnist_cnn_random10.yaml`` and the README print (debug.yaml's ``count`` set back to
    null so that ``fraction`` applies) is a command the CLI accepts, and it configures 10 % with no count."""
    import re
    import shlex

    import yaml

    config = ROOT / "configs" / "mnist_cnn_random10.yaml"
    snippet = re.search(r"Quick check: add `([^`]+)`", config.read_text()).group(1)
    assert f"add `{snippet.split(' ', 2)[-1]}`" in (ROOT / "README.md").read_text()  # the README says the same
    with pytest.raises(SystemExit):
        main(
            [
                "train",
                "fit",
                "-c",
                str(config),
                *shlex.split(snippet.replace("configs/", f"{ROOT}/configs/")),
                "--print_config",
            ]
        )
    poison = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["poison"]
    assert poison["kind"] == "random_sample" and poison["count"] is None and poison["fraction"] == 0.1
