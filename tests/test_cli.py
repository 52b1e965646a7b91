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
    """The quick check ``configs/mnist_cnn_random10.yaml`` and the getting-started page print (debug.yaml's ``count``
    set back to null so that ``fraction`` applies) is a command the CLI accepts, and it sets 10 % with no count."""
    import re
    import shlex

    import yaml

    config = ROOT / "configs" / "mnist_cnn_random10.yaml"
    snippet = re.search(r"Quick check: add `([^`]+)`", config.read_text()).group(1)
    assert f"add `{snippet.split(' ', 2)[-1]}`" in (ROOT / "docs" / "getting-started.md").read_text()  # the docs say so
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


def test_the_demo_figure_shows_every_request_between_the_poisoned_and_retrained_levels(tmp_path):
    """``make demo`` writes demo.png beside its table: one bar per request (class-9 accuracy after), lines at the
    poisoned and the retrained model's accuracy, each bar labelled with its ToW; the first request on top."""
    from lightning_unlearn.demo import demo_figure

    rows = [{"model": "poisoned (before)", "class 9 %": 0.3}, {"model": "retrained (reference)", "class 9 %": 91.2},
            {"model": "Auto (the default request)", "class 9 %": 96.8, "ToW": "0.9730"},
            {"model": "SA first-order (smallest layer)", "class 9 %": 1.1, "ToW": "0.0755"}]  # fmt: skip
    ax = demo_figure(rows).axes[0]
    assert [p.get_width() for p in ax.patches] == [1.1, 96.8]  # bottom to top: the first request on top
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["SA first-order (smallest layer)", "Auto (the default request)"]
    assert sorted(line.get_xdata()[0] for line in ax.get_lines()) == [0.3, 91.2]
    assert [t.get_text() for t in ax.texts] == ["ToW 0.0755", "ToW 0.9730"]
    path = tmp_path / "demo.png"
    demo_figure(rows).savefig(path, format="png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
