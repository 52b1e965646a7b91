"""Nothing runs from a file, no reference pretends, every chain is recorded (issue 30).

* a pickle payload planted in each loading route (own model with and without its class, reference, the unlearned
  checkpoint writer, a chained checkpoint, a profile, a poison record, ``history``, the command line) runs nothing;
* a checkpoint's hyper-parameters never choose a module to import (LightningCLI's ``_instantiator`` with a
  callable-typed argument naming a module with import-time side effects);
* a reference that descends from the poisoned model, or trained with the forget set, is refused;
* an unlearned checkpoint carries its whole chain, a repeated forget set needs ``force``, a chained request writes only
  into its own folder;
* a zeroed or scaled profile layer, an all-zero profile, and a forget set that is the validation split are caught.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT
from support.own_model import ForgetData, TinyClassifier
from test_bad_inputs import FAST_REQUEST, SA_CONFIG
from torch.utils.data import Subset, TensorDataset

from lightning_unlearn.__main__ import main, run
from lightning_unlearn.checkpoints import load_lightning_module, read_checkpoint
from lightning_unlearn.cli import unlearn_main
from lightning_unlearn.data import UnlearnData
from lightning_unlearn.evaluation.suite import ACCURACY_ONLY
from lightning_unlearn.ledger import history_of
from lightning_unlearn.models.classifier import ClassifierModule
from lightning_unlearn.pipeline import UNLEARNED_FILENAME, run_unlearning
from lightning_unlearn.reference import evaluate_reference
from lightning_unlearn.run import TrainingRun
from lightning_unlearn.selection import LastLayer, SmallestLayer
from lightning_unlearn.unlearn import FirstOrder, UnlearnModule
from lightning_unlearn.unlearn.adapters.source import own_unlearned_checkpoint
from lightning_unlearn.unlearn.module import SplitOverlapWarning, unlearn_trainer

FIXED = FirstOrder(steps=[1e-2], criterion="fixed")


@pytest.fixture(autouse=True)
def _command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["unlearn.py"])


class Payload:
    """Unpickling it writes ``marker`` (what a malicious checkpoint would do with any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "the payload ran"))


def own_checkpoint(path: Path, labels: str = "poisoned", seed: int = 0) -> Path:
    """A TinyClassifier trained on :class:`ForgetData` (poisoned labels, or retrained on the retain set)."""
    import lightning.pytorch as pl

    data = ForgetData()
    torch.manual_seed(seed)
    model = TinyClassifier(num_classes=3, in_channels=4, lr=0.3)
    x, y = (data.x, data.poisoned) if labels == "poisoned" else (data.x[data.keep], data.y[data.keep])
    trainer = pl.Trainer(max_epochs=20, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def own_models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("own")
    return {
        "poisoned": own_checkpoint(folder / "poisoned.ckpt"),
        "retrained": own_checkpoint(folder / "retrained.ckpt", labels="retrained", seed=1),
    }


def plant(source: Path, target: Path, marker: Path, where: str = "hyper_parameters") -> Path:
    """``source``'s checkpoint with a payload inside ``state[where]`` (a dict) written to ``target``."""
    state = torch.load(source, weights_only=True)
    state.setdefault(where, {})
    state[where]["payload"] = Payload(marker)
    torch.save(state, target)
    return target


# ------------------------------------------------------------------------------------ 1. nothing runs from a file
def test_the_payload_itself_runs_when_unpickled(tmp_path):
    """The test's payload is live: an unrestricted load runs it (so its absence below means something)."""
    path = plant(own_checkpoint(tmp_path / "m.ckpt"), tmp_path / "evil.ckpt", tmp_path / "marker")
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").read_text() == "the payload ran"


@pytest.mark.parametrize("with_class", [True, False])
def test_an_own_model_checkpoint_with_a_payload_runs_nothing(own_models, tmp_path, with_class):
    marker = tmp_path / "marker"
    evil = plant(own_models["poisoned"], tmp_path / "evil.ckpt", marker)
    kwargs = {"model_class": TinyClassifier} if with_class else {}
    with pytest.raises(ValueError, match="holds pickled Python objects"):
        UnlearnModule(model=str(evil), data=ForgetData(), method=FIXED, selection=LastLayer(), **kwargs)
    assert not marker.exists()


def test_a_reference_checkpoint_with_a_payload_runs_nothing(own_models, tmp_path):
    marker = tmp_path / "marker"
    evil = plant(own_models["retrained"], tmp_path / "evil.ckpt", marker)
    module = UnlearnModule(
        model=str(own_models["poisoned"]), model_class=TinyClassifier, data=ForgetData(), method=FIXED,
        selection=LastLayer(),
    )  # fmt: skip
    with pytest.raises(ValueError, match="holds pickled Python objects"):
        evaluate_reference(evil, module.datamodule, ACCURACY_ONLY, poisoned=module.source)
    assert not marker.exists()


def test_the_unlearned_checkpoint_writer_rereads_its_source_weights_only(own_models, tmp_path):
    """The writer reopens the given checkpoint to keep its layout: a file swapped in meanwhile runs nothing."""
    marker = tmp_path / "marker"
    given = tmp_path / "given.ckpt"
    shutil.copy(own_models["poisoned"], given)
    module = UnlearnModule(model=str(given), model_class=TinyClassifier, data=ForgetData(), method=FIXED)
    plant(own_models["poisoned"], given, marker)
    with pytest.raises(ValueError, match="holds pickled Python objects"):
        own_unlearned_checkpoint(module)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["hyper_parameters", "datamodule_hyper_parameters", "PoisonedDataModule"])
def test_a_chained_checkpoint_or_record_with_a_payload_runs_nothing(poisoned_run, tmp_path, where):
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(poisoned_run / "poison.json", run / "poison.json")
    checkpoint = TrainingRun.from_path(poisoned_run).checkpoint
    plant(checkpoint, run / "checkpoints" / "last.ckpt", marker, where)
    with pytest.raises(ValueError, match="holds pickled Python objects"):
        UnlearnModule(str(run), FIXED, LastLayer())
    with pytest.raises(ValueError, match="holds pickled Python objects"):
        TrainingRun.from_path(run).load_record()
    assert not marker.exists()


def test_a_profile_and_the_history_command_with_a_payload_run_nothing(own_models, poisoned_run, tmp_path, capsys):
    marker = tmp_path / "marker"
    profile = tmp_path / "profile.pt"
    state = torch.load(poisoned_run / "sharpness_profile.pt", weights_only=True)
    state["metadata"] = {"payload": Payload(marker)}
    torch.save(state, profile)
    with pytest.raises(ValueError):
        UnlearnModule(str(poisoned_run), FIXED, LastLayer(), profile=str(profile)).prepare()
    evil = plant(own_models["poisoned"], tmp_path / "evil.ckpt", marker)
    with pytest.raises(ValueError, match="holds pickled Python objects"):
        main(["history", str(evil)])
    assert not marker.exists()


def test_the_command_line_with_a_payload_checkpoint_runs_nothing(own_models, tmp_path):
    marker = tmp_path / "marker"
    evil = plant(own_models["poisoned"], tmp_path / "evil.ckpt", marker)
    for extra in (["--model.model_class", "support.own_model.TinyClassifier"], []):
        args = ["-c", SA_CONFIG, "--model.model", str(evil), "--model.data", "support.own_model.ForgetData", *extra]
        with pytest.raises((ValueError, SystemExit)):
            unlearn_main([*args, "--model.selection", "LastLayer", "--evaluation.mia", "false"])
    assert not marker.exists()


# ----------------------------------------------------------- 3. hyper-parameters in a file never pick an import
def _side_effect_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A module on ``sys.path`` that writes a marker when imported; its (unique) name and the marker."""
    name = f"sideeffect_{tmp_path.name.replace('-', '_')}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\nattr = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, marker


def test_a_checkpoints_hyper_parameters_never_import_a_module(tmp_path, monkeypatch):
    """LightningCLI's allow-listed ``_instantiator`` and ``optimizer: "<module>.attr"`` made jsonargparse import the
    module; no loading route uses the instantiator now, with or without a class named by the user."""
    name, marker = _side_effect_module(tmp_path, monkeypatch)
    state = {
        "state_dict": ClassifierModule().state_dict(),
        "hyper_parameters": {
            "_instantiator": "lightning.pytorch.cli.instantiate_module",
            "_class_path": "lightning_unlearn.models.classifier.ClassifierModule",
            "architecture": "mnist_cnn",
            "optimizer": f"{name}.attr",
        },
        "pytorch-lightning_version": "2.6.6",
    }
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    torch.save(state, path)
    model = load_lightning_module(path)  # the recorded class is the library's: allowed, never imported
    assert type(model) is ClassifierModule
    load_lightning_module(path, ClassifierModule)
    TrainingRun.from_path(path).load_classifier()
    assert not marker.exists() and name not in sys.modules


def test_a_nested_class_path_is_built_only_from_trusted_classes(own_models, tmp_path, monkeypatch):
    name, marker = _side_effect_module(tmp_path, monkeypatch)
    state = torch.load(own_models["poisoned"], weights_only=True)
    state["hyper_parameters"]["lr"] = {"class_path": f"{name}.Thing", "init_args": {}}
    torch.save(state, tmp_path / "nested.ckpt")
    with pytest.raises(ValueError, match=rf"names the class '{name}.Thing'.*trusted_classes"):
        load_lightning_module(tmp_path / "nested.ckpt", TinyClassifier)
    assert not marker.exists() and name not in sys.modules
    state["hyper_parameters"]["lr"] = {"class_path": "fractions.Fraction", "init_args": {"numerator": 1}}
    torch.save(state, tmp_path / "trusted.ckpt")
    model = load_lightning_module(tmp_path / "trusted.ckpt", TinyClassifier, trusted_classes=["fractions.Fraction"])
    assert model.hparams.lr == 1


def test_a_checkpoint_naming_no_trusted_class_says_which_class_to_pass(own_models, tmp_path):
    state = torch.load(own_models["poisoned"], weights_only=True)
    state["hyper_parameters"]["_class_path"] = "support.own_model.TinyClassifier"
    torch.save(state, tmp_path / "cli.ckpt")
    with pytest.raises(ValueError, match="records 'support.own_model.TinyClassifier'.*Pass `model_class`"):
        load_lightning_module(tmp_path / "cli.ckpt")
    model = load_lightning_module(tmp_path / "cli.ckpt", trusted_classes=["support.own_model.TinyClassifier"])
    assert type(model) is TinyClassifier


# --------------------------------------------------------------------------------- 4. references are retrained
def request_args(run: Path | str, *extra: str) -> list[str]:
    return ["-c", SA_CONFIG, "--model.run", str(run), *FAST_REQUEST, *extra]


@pytest.mark.timeout(900)
def test_a_chained_request_is_recorded_refuses_its_ancestor_and_writes_beside_the_earlier_one(poisoned_run, tmp_path):
    """A chained request (the first request's unlearned checkpoint as its run): the poisoned ancestor or an unlearned
    model is refused as reference, the repeat needs ``--force``, the request's outputs (profile included) go into a
    folder of its own beside the earlier one, which stays as it was and can still be overwritten."""
    run = tmp_path / "run"
    shutil.copytree(poisoned_run, run, ignore=shutil.ignore_patterns("unlearn", "sweep_*"))
    first = unlearn_main(request_args(run))
    earlier = Path(first["output_dir"])
    once = earlier / UNLEARNED_FILENAME
    listing = sorted(p.name for p in earlier.iterdir())
    sibling = tmp_path / "sibling"  # another model trained with the poison: other weights, the same record
    shutil.copytree(run, sibling, ignore=shutil.ignore_patterns("unlearn"))
    state = torch.load(sibling / "checkpoints" / "last.ckpt", weights_only=True)
    state["state_dict"]["net.fc2.bias"] += 0.01
    torch.save(state, sibling / "checkpoints" / "last.ckpt")
    for reference, message in (
        (run, "holds the weights of the original model"),
        (sibling, "trained with 200 of the 200 forget samples in its training set"),
        (once, "is the poisoned model itself"),
    ):
        with pytest.raises(ValueError, match=message):
            unlearn_main(request_args(once, "--reference", str(reference), "--force"))
    with pytest.raises(ValueError, match="already unlearned by step 1"):
        unlearn_main(request_args(once))
    second = unlearn_main(request_args(once, "--force"))
    later = Path(second["output_dir"])
    assert later.parent == earlier.parent and later != earlier  # beside it, not inside it
    assert sorted(p.name for p in earlier.iterdir()) == listing  # the earlier folder is untouched
    assert (later / "sharpness_profile.pt").is_file()
    twice = later / UNLEARNED_FILENAME
    history = history_of(read_checkpoint(twice))
    assert [e["step"] for e in history] == [1, 2] and history[1]["forced"] is True
    assert history[0]["forget"]["sha256"] == history[1]["forget"]["sha256"]
    assert history[1]["parent"]["weights"] == history[0]["weights"]
    with pytest.raises(ValueError, match="is an unlearned model"):
        unlearn_main(request_args(run, "--reference", str(twice)))
    version = earlier.name.removeprefix("version_")
    again = unlearn_main(request_args(run, "--trainer.logger.init_args.version", version, "--overwrite"))
    assert Path(again["output_dir"]) == earlier  # not refused as holding a foreign folder


def _own_request(model: Path, forget: list[int], out: Path, force: bool = False, **kwargs: Any) -> dict[str, Any]:
    data = ForgetData()
    dataset = TensorDataset(data.x, data.poisoned)
    keep = [i for i in range(data.n) if i not in set(forget)]
    unlearn_data = UnlearnData(
        forget=Subset(dataset, forget), retain=Subset(dataset, keep), val=data.val_dataloader(),
        corrected_labels=data.y[forget], test=data.test_dataloader(), attacked_class=0,
    )  # fmt: skip
    module = UnlearnModule(model=str(model), model_class=TinyClassifier, data=unlearn_data, method=FIXED, **kwargs)
    return run_unlearning(unlearn_trainer(), module, out_dir=out, evaluation=ACCURACY_ONLY, force=force)


def test_a_three_step_chain_is_printed_with_its_forget_sets_and_a_repeat_needs_force(own_models, tmp_path, capsys):
    data = ForgetData()
    positions = data.positions.tolist()
    first, second = positions[:15], positions[15:]
    other = int(torch.nonzero(data.keep).flatten()[0])  # a sample never forgotten so far
    _own_request(own_models["poisoned"], first, tmp_path / "a")
    _own_request(tmp_path / "a" / UNLEARNED_FILENAME, second, tmp_path / "b")  # another forget set: no force needed
    with pytest.warns(UserWarning, match="5 of the 6 forget samples were already unlearned by step 1"):
        _own_request(tmp_path / "b" / UNLEARNED_FILENAME, [*first[:5], other], tmp_path / "c")  # partly new: allowed
    chain = tmp_path / "c" / UNLEARNED_FILENAME
    for repeated in (first, positions):  # one earlier step, or two together, removed all of them
        with pytest.raises(ValueError, match="was already unlearned by earlier requests"):
            _own_request(chain, repeated, tmp_path / "d")
        assert not (tmp_path / "d").exists()  # refused before any output
    history = run(["history", str(chain)])
    printed = capsys.readouterr().out
    assert [e["step"] for e in history] == [1, 2, 3] and [e["forget"]["count"] for e in history] == [15, 15, 6]
    for entry in history:
        assert entry["forget"]["sha256"][:16] in printed and entry["weights"][:16] in printed
    assert len({e["forget"]["sha256"] for e in history}) == 3
    assert history[2]["parent"]["checkpoint"] == str(tmp_path / "b" / UNLEARNED_FILENAME)
    assert history[1]["parent"]["weights"] == history[0]["weights"]
    assert TinyClassifier.load_from_checkpoint(chain, weights_only=True) is not None  # the ledger is plain data
    report = _own_request(chain, positions, tmp_path / "d", force=True)
    assert report["history"]["step"] == 4 and report["history"]["notes"][-1].endswith("repeated with force.")
    assert history_of(read_checkpoint(tmp_path / "d" / UNLEARNED_FILENAME))[-1]["forced"] is True


def test_an_own_reference_with_the_poisoned_weights_or_from_the_chain_is_refused(own_models, tmp_path):
    copy = tmp_path / "copy.ckpt"
    shutil.copy(own_models["poisoned"], copy)  # another file, the very same weights
    module = UnlearnModule(model=str(own_models["poisoned"]), model_class=TinyClassifier, data=ForgetData())
    with pytest.raises(ValueError, match="holds the weights of the model to unlearn"):
        evaluate_reference(copy, module.datamodule, ACCURACY_ONLY, poisoned=module.source)
    _own_request(own_models["poisoned"], ForgetData().positions.tolist()[:10], tmp_path / "a")
    unlearned = tmp_path / "a" / UNLEARNED_FILENAME
    chained = UnlearnModule(model=str(unlearned), model_class=TinyClassifier, data=ForgetData())
    with pytest.raises(ValueError, match="holds the weights of the original model"):
        evaluate_reference(copy, chained.datamodule, ACCURACY_ONLY, poisoned=chained.source)
    with pytest.raises(ValueError, match="is an unlearned model"):
        evaluate_reference(unlearned, module.datamodule, ACCURACY_ONLY, poisoned=module.source)
    evaluate_reference(own_models["retrained"], module.datamodule, ACCURACY_ONLY, poisoned=module.source)  # accepted


# ---------------------------------------------------------------------------------- 6. silent acceptances
def _edited_profile(run: Path, tmp_path: Path, edit: str) -> Path:
    state = torch.load(run / "sharpness_profile.pt", weights_only=True)
    diagonals = state["diagonals"]
    for name in diagonals:
        if edit == "all zero" or (name.startswith("net.conv1") and edit == "zero layer"):
            diagonals[name] = torch.zeros_like(diagonals[name])
        if name.startswith("net.fc2") and edit == "scaled layer":
            diagonals[name] = diagonals[name] * 1e6
    path = tmp_path / f"{edit.replace(' ', '_')}.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("zero layer", r"zero diagonal everywhere in layer\(s\) \['net.conv1'\]"),
        ("all zero", "is zero everywhere"),
        ("scaled layer", "more than 1000x apart"),
    ],
)
def test_an_edited_profile_with_its_fingerprints_kept_is_refused(poisoned_run, tmp_path, edit, message):
    """A zeroed layer passed every check and the smallest-layer selection picked it; an all-zero "exact" profile
    passed too. The fingerprints are kept, so only the values can tell."""
    path = _edited_profile(poisoned_run, tmp_path, edit)
    module = UnlearnModule(str(poisoned_run), FIXED, SmallestLayer(), profile=str(path))
    with pytest.raises(ValueError, match=message):
        module.prepare()
    UnlearnModule(str(poisoned_run), FIXED, SmallestLayer()).prepare()  # the run's own profile passes


def test_a_forget_set_that_is_the_validation_split_is_warned_about(own_models):
    data = ForgetData()
    val = data.val_dataloader().dataset
    retain = TensorDataset(data.x, data.y)
    unlearn_data = UnlearnData(forget=val, retain=retain, val=val, corrected_labels=val.tensors[1])
    module = UnlearnModule(model=str(own_models["poisoned"]), model_class=TinyClassifier, data=unlearn_data)
    with pytest.warns(SplitOverlapWarning, match="96 of the 96 forget samples are also in the validation split"):
        module.prepare()
    disjoint = UnlearnModule(model=str(own_models["poisoned"]), model_class=TinyClassifier, data=ForgetData())
    with warnings.catch_warnings():
        warnings.simplefilter("error", SplitOverlapWarning)
        disjoint.prepare()


def test_the_library_never_loads_with_weights_only_false():
    """No source file of the package loads a pickle unrestricted."""
    sources = [p for p in (ROOT / "lightning_unlearn").rglob("*.py")]
    offenders = [str(p) for p in sources if "weights_only=False" in p.read_text()]
    assert offenders == []
