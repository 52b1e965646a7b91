"""Integrity of every request (issue 14): the forget set is the one the model was trained on, no output is clobbered
or lost, unlearned models reopen everywhere, and random corruptions of the run's files never give a result computed
on something other than what was trained.

Each test names the case of the issue it covers. Trained artifacts come from the session fixture ``poisoned_run``
(4,000 MNIST training images, 200 of class 9 relabelled); anything broken is a copy in ``tmp_path``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, train_debug_run
from test_bad_inputs import FAST_REQUEST, SA_CONFIG, SUBSET

from lightning_unlearn.__main__ import main
from lightning_unlearn.cli import unlearn_main
from lightning_unlearn.curvature import SharpnessProfile
from lightning_unlearn.data.poison import PoisonRecord, PoisonSpec, make_poison
from lightning_unlearn.evaluation.suite import ACCURACY_ONLY
from lightning_unlearn.pipeline import REPORT_FILENAME, UNLEARNED_FILENAME, run_unlearning
from lightning_unlearn.run import DATAMODULE_STATE_KEY, InterruptedTrainingWarning, TrainingRun
from lightning_unlearn.selection import LastLayer, SmallestLayer
from lightning_unlearn.unlearn import FirstOrder, UnlearnModule
from lightning_unlearn.unlearn.module import unlearn_trainer
from lightning_unlearn.utils import InterruptedWriteWarning, atomic_write

FAST = FAST_REQUEST  # a fast request: the last layer, one fixed step, accuracies only


# ----------------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``python unlearn.py ARGS``: LightningCLI reads ``sys.argv`` too (pytest's arguments are not ours)."""
    monkeypatch.setattr(sys, "argv", ["unlearn.py"])


def copy_run(run: Path, tmp_path: Path, name: str = "run") -> Path:
    """A copy of ``run`` (without outputs of earlier requests) to break."""
    target = tmp_path / name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("unlearn", "sweep_*"))
    return target


def request_args(run: Path | str, save_dir: Path, *extra: str) -> list[str]:
    """``unlearn.py`` arguments of a fast request on ``run`` writing under ``save_dir``."""
    return [
        "-c",
        SA_CONFIG,
        "--model.run",
        str(run),
        *FAST,
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        *extra,
    ]


def checkpoint_of(run: Path) -> Path:
    return TrainingRun.from_path(run).checkpoint


def write_records(run: Path, record: dict[str, Any]) -> None:
    """Write ``record`` as the run's ``poison.json`` *and* into its checkpoint (a consistent, edited run)."""
    (run / "poison.json").write_text(json.dumps(record))
    checkpoint = checkpoint_of(run)
    state = torch.load(checkpoint, weights_only=True)
    state[DATAMODULE_STATE_KEY]["poison_record"] = record
    torch.save(state, checkpoint)


def outputs(folder: Path) -> list[str]:
    """Everything under ``folder`` (recursively, hidden entries included), relative; [] if it does not exist."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def fast_module(run: Path | str, **kwargs: Any) -> UnlearnModule:
    return UnlearnModule(str(run), FirstOrder(steps=[1e-4], criterion="fixed"), LastLayer(), **kwargs)


# ------------------------------------------------------------------------------- case 1: the forget set is verified
def _never_poisoned(record: dict[str, Any], labels: torch.Tensor) -> dict[str, Any]:
    """Half of the recorded samples replaced by samples of the same class that were never poisoned (true labels
    right, so the record still fits the dataset: only the checkpoint can tell)."""
    poisoned = set(record["indices"])
    clean = [i for i in torch.nonzero(labels == 9).flatten().tolist() if i not in poisoned][:100]
    kept = list(zip(record["indices"], record["poisoned_labels"], strict=True))[100:]
    entries = sorted([*kept, *((i, 3) for i in clean)])
    return {
        **record,
        "indices": [i for i, _ in entries],
        "true_labels": [9] * len(entries),
        "poisoned_labels": [p for _, p in entries],
    }


def _listed_twice(record: dict[str, Any], first: int, count: int, other_label: bool) -> dict[str, Any]:
    entries = list(zip(record["indices"], record["true_labels"], record["poisoned_labels"], strict=True))
    extra = [(i, t, (p + 1) % 10 if (p + 1) % 10 != t else (p + 2) % 10) if other_label else (i, t, p)
             for i, t, p in entries[first : first + count]]  # fmt: skip
    entries = sorted([*entries, *extra])
    columns = [list(column) for column in zip(*entries, strict=True)]
    return {**record, **dict(zip(("indices", "true_labels", "poisoned_labels"), columns, strict=True))}


POISON_EDITS: dict[str, tuple[Callable[[dict, torch.Tensor], Any], str]] = {
    "never-poisoned": (
        _never_poisoned,
        r"poison\.json' is not the one the model was trained with \(the record in checkpoint '.*last\.ckpt'\): they "
        r"differ in indices \(200 vs 200 samples, 100 in common\)",
    ),
    "ten-listed-twice": (
        lambda r, _: _listed_twice(r, 0, 10, other_label=False),
        r"not a valid poison record: `indices` must be unique: sample \d+ is listed 2 times",
    ),
    "one-index-two-labels": (
        lambda r, _: _listed_twice(r, 5, 1, other_label=True),
        r"not a valid poison record: `indices` must be unique: sample \d+ is listed 2 times",
    ),
    "label-minus-100": (
        lambda r, _: {**r, "poisoned_labels": [-100] * len(r["indices"])},
        r"not a valid poison record: `poisoned_labels` must lie in \[0, 10\) \(`num_classes`\), got -100 for sample",
    ),
    "label-99": (
        lambda r, _: {**r, "poisoned_labels": [99, *r["poisoned_labels"][1:]]},
        r"not a valid poison record: `poisoned_labels` must lie in \[0, 10\) \(`num_classes`\), got 99 for sample",
    ),
    "nested": (lambda r, _: "[" * 100_000 + "]" * 100_000, r"not a valid poison record: nested too deeply"),
}


@pytest.mark.parametrize("edit", POISON_EDITS)
def test_poison_json_is_verified_against_the_checkpoints_record(poisoned_run, mnist, tmp_path, edit):
    """Case 1: a ``poison.json`` listing samples that were never poisoned, indices listed twice (with one label or
    two), poisoned labels of -100 (ignored by cross-entropy) or 99 (an ``IndexError`` deep inside), a deeply nested
    JSON (a ``RecursionError``): every one is refused, naming the file, before any output exists."""
    change, message = POISON_EDITS[edit]
    run = copy_run(poisoned_run, tmp_path)
    changed = change(json.loads((run / "poison.json").read_text()), mnist.train.labels[:SUBSET])
    (run / "poison.json").write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(ValueError, match=message):
        TrainingRun.from_path(run).load_record()
    with pytest.raises(ValueError, match=message):
        UnlearnModule(str(run))
    with pytest.raises(ValueError, match=message):
        unlearn_main(request_args(run, tmp_path / "out"))
    assert outputs(tmp_path / "out") == []


def test_records_labels_follow_their_spec_and_the_datasets_classes(mnist):
    """Case 1: labels are checked against the record's and the dataset's number of classes, and against what the
    spec gives: a backdoor's poisoned label is the target class for every entry, a label flip goes source -> target."""
    labels = mnist.train.labels[:SUBSET]
    backdoor = make_poison(labels, 10, PoisonSpec("backdoor", count=50, target_class=0), "mnist").to_dict()
    flip_spec = PoisonSpec("label_flip", count=50, source_class=9, target_class=4)
    flip = make_poison(labels, 10, flip_spec, "mnist").to_dict()
    other = 3 if backdoor["true_labels"][0] != 3 else 5  # neither the target nor the sample's true label
    cases = [
        ({**backdoor, "poisoned_labels": [other, *backdoor["poisoned_labels"][1:]]},
         rf"`poisoned_labels` do not follow the spec \(kind 'backdoor'\): sample \d+ has {other}, the spec gives 0"),
        ({**flip, "poisoned_labels": [7, *flip["poisoned_labels"][1:]]},
         r"`poisoned_labels` do not follow the spec \(kind 'label_flip'\): sample \d+ has 7, the spec gives 4"),
        ({**flip, "spec": {**flip["spec"], "count": 60}}, r"the spec's `count` is 60 but the record lists 50 samples"),
        ({**flip, "num_classes": 12, "poisoned_labels": [11] * 50}, r"made for 12 classes, but .* 'mnist' has 10"),
        ({**flip, "poisoned_labels": [10] * 50}, r"`poisoned_labels` must lie in \[0, 10\) \(`num_classes`\), got 10"),
    ]  # fmt: skip
    for record, message in cases:
        with pytest.raises(ValueError, match=message):
            PoisonRecord.from_dict(record).validate(labels, dataset="mnist", num_classes=10)
    for good in (backdoor, flip):
        PoisonRecord.from_dict(good).validate(labels, dataset="mnist", num_classes=10)


@pytest.mark.parametrize("which", ["empty", "whole-split"])
def test_an_empty_or_whole_forget_set_is_refused_naming_the_record(poisoned_run, mnist, tmp_path, which):
    """Case 1: a record (in ``poison.json`` and the checkpoint alike) with no poisoned sample, or with every sample of
    the training split, is refused before any work, with a message naming the record; no output folder is left."""
    run = copy_run(poisoned_run, tmp_path)
    labels = mnist.train.labels[:SUBSET]
    spec = PoisonSpec(kind="none") if which == "empty" else PoisonSpec("untargeted", fraction=1.0)
    write_records(run, make_poison(labels, 10, spec, "mnist").to_dict())
    message = {
        "empty": r"Nothing to unlearn: the poison record '.*poison\.json' lists no poisoned sample \(kind 'none'\)",
        "whole-split": rf"The poison record '.*poison\.json' lists all {SUBSET} samples of the training split",
    }[which]
    with pytest.raises(ValueError, match=message):
        unlearn_main(request_args(run, tmp_path / "out"))
    assert outputs(tmp_path / "out") == [] and outputs(run / "unlearn") == []
    module = fast_module(run)
    with pytest.raises(ValueError, match=message):
        run_unlearning(unlearn_trainer(accelerator="cpu"), module, out_dir=tmp_path / "py", evaluation=ACCURACY_ONLY)
    assert module.guard is None and outputs(tmp_path / "py") == []


def test_a_resume_that_would_change_the_poison_is_refused(tmp_path):
    """Case 1: ``train.py fit --ckpt_path last.ckpt --data.poison.seed 1`` would continue on another poison (and
    write its record as the run's ``poison.json``): refused, with no record written; the same poison resumes."""
    runs = tmp_path / "runs"
    first = train_debug_run(runs)
    original = json.loads((first / "poison.json").read_text())
    checkpoint = str(first / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match=r"Refusing to resume: the checkpoint was trained on another poison .*differ "
                       r"in indices \(100 vs 100 samples, \d+ in common\); spec \(seed: 0 vs 1\)"):  # fmt: skip
        train_debug_run(runs, "--ckpt_path", checkpoint, "--data.poison.seed", "1", "--trainer.max_epochs", "2")
    refused = runs / "mnist_cnn_targeted" / "version_1"
    assert not (refused / "poison.json").exists()
    resumed = train_debug_run(runs, "--ckpt_path", checkpoint, "--trainer.max_epochs", "2")
    assert json.loads((resumed / "poison.json").read_text()) == original
    assert TrainingRun.from_path(resumed).load_record().to_dict() == original


# ------------------------------------------------------------------------- case 2: two requests at the same time
def _start_request(run: Path, save_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "unlearn.py"), *request_args(run, save_dir, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished_request(folder: Path) -> dict[str, Any]:
    """The report of a complete request folder, checked whole: report, checkpoint, config, events, nothing else."""
    names = sorted(p.name for p in folder.iterdir())
    assert {REPORT_FILENAME, UNLEARNED_FILENAME, "config.yaml", "hparams.yaml"} <= set(names), names
    assert all(n in (REPORT_FILENAME, UNLEARNED_FILENAME, "config.yaml", "hparams.yaml") or
               n.startswith("events.out.tfevents.") for n in names), names  # fmt: skip
    report = json.loads((folder / REPORT_FILENAME).read_text())
    assert report["output_dir"] == str(folder)
    assert TrainingRun.from_path(folder / UNLEARNED_FILENAME).load_classifier() is not None
    return report


@pytest.mark.timeout(900)
def test_two_requests_at_once_give_two_results_or_one_clear_refusal(poisoned_run, tmp_path):
    """Case 2, with real processes: two requests with the same ``--name`` get distinct versions and two complete
    results; two requests for the same explicit version give one complete result and one clear refusal."""
    auto = [_start_request(poisoned_run, tmp_path, "--name", "same") for _ in range(2)]
    fixed = [
        _start_request(poisoned_run, tmp_path, "--name", "fixed", "--trainer.logger.init_args.version", "0")
        for _ in range(2)
    ]
    done = []
    for process in auto + fixed:
        out, err = process.communicate(timeout=800)
        done.append((process.returncode, out, err))

    for code, _, err in done[:2]:
        assert code == 0, err[-3000:]
    lines = [line for _, out, _ in done[:2] for line in out.splitlines()]
    printed = {line.split("report: ", 1)[1] for line in lines if line.startswith("report: ")}
    folders = sorted((tmp_path / "same").iterdir())
    assert [f.name for f in folders] == ["version_0", "version_1"]
    assert printed == {str(f / REPORT_FILENAME) for f in folders}
    for folder in folders:
        _finished_request(folder)

    codes = sorted(code for code, _, _ in done[2:])
    assert codes[0] == 0 and codes[1] != 0, [err[-2000:] for _, _, err in done[2:]]
    refusal = next(err for code, _, err in done[2:] if code != 0)
    busy = "OutputBusyError: The output folder" in refusal and "being written by another unlearning request" in refusal
    done_first = "FileExistsError: The output folder" in refusal and "already holds report.json" in refusal
    assert busy or done_first, refusal[-2000:]  # OutputBusyError is a FileExistsError
    assert [f.name for f in (tmp_path / "fixed").iterdir()] == ["version_0"]
    _finished_request(tmp_path / "fixed" / "version_0")


# ----------------------------------------------------------------- case 3: the cleaner touches only its own files
def test_opening_a_checkpoint_leaves_other_programs_files_alone(poisoned_run, tmp_path):
    """Case 3: ``lightning-unlearn profile dl/model.ckpt`` deleted ``dl/.thesis.docx.a1b2c3d4.tmp``."""
    folder = tmp_path / "dl"
    folder.mkdir()
    shutil.copy(checkpoint_of(poisoned_run), folder / "model.ckpt")
    shutil.copy(poisoned_run / "poison.json", folder / "poison.json")
    theirs = [".thesis.docx.a1b2c3d4.tmp", ".thesis.docx.999999.a1b2c3d4.tmp", ".model.ckpt.999999.a1b2c3d4.tmp"]
    for name in theirs:
        (folder / name).write_text("a thesis")
    main(["profile", str(folder / "model.ckpt"), "--max_samples", "64", "--output", str(tmp_path / "p.pt")])
    assert all((folder / name).read_text() == "a thesis" for name in theirs)


# ------------------------------------------------------------------------ case 4: unlearned checkpoints reopen
@pytest.mark.timeout(900)
def test_unlearned_checkpoints_reopen_everywhere_so_requests_chain(poisoned_run, tmp_path):
    """Case 4: unlearn, unlearn the result again (``unlearn.py --model.run …/unlearned.ckpt``), then profile it
    (``lightning-unlearn profile``), sweep it and open it in Python: it carries the run's data settings and poison
    record, so the chain works on exactly the original forget set."""
    from lightning_unlearn.sweep import layer_sweep

    first = unlearn_main(request_args(poisoned_run, tmp_path / "first"))
    once = Path(first["output_dir"]) / UNLEARNED_FILENAME
    second = unlearn_main(request_args(once, tmp_path / "second", "--force"))  # the same forget set again
    twice = Path(second["output_dir"]) / UNLEARNED_FILENAME
    assert second["before"] == first["after"]  # the second request starts where the first ended
    assert second["forget_samples"] == first["forget_samples"] == 200
    assert second["checkpoint"] == str(once)

    main(["profile", str(twice), "--max_samples", "500", "--output", str(tmp_path / "twice.pt")])
    profile = SharpnessProfile.load(tmp_path / "twice.pt")
    assert profile.num_samples == 500 and profile.metadata["checkpoint"] == str(twice)

    reopened = TrainingRun.from_path(twice)
    original = TrainingRun.from_path(poisoned_run).load_record()
    assert reopened.load_record().to_dict() == original.to_dict()
    datamodule = reopened.datamodule()
    datamodule.setup("fit")
    assert datamodule.poisoned_positions.tolist() == original.indices
    state = torch.load(twice, weights_only=True)
    assert state["unlearned_from"]["checkpoint"] == str(once)
    assert state["datamodule_hyper_parameters"]["train_subset"] == SUBSET  # the data's, not the request's
    assert "run" not in state["datamodule_hyper_parameters"]

    with pytest.raises(ValueError, match="already unlearned"):
        layer_sweep(str(twice), out=str(tmp_path / "sweep"), accelerator="cpu")
    sweep = layer_sweep(str(twice), out=str(tmp_path / "sweep"), accelerator="cpu", force=True)
    assert [row["layer"] for row in sweep["layers"]] == ["net.conv1", "net.conv2", "net.fc1", "net.fc2"]


# ------------------------------------------------------------------------- case 5: no output replaced unguarded
def test_profile_never_replaces_a_checkpoint_and_a_profile_only_with_overwrite(poisoned_run, tmp_path):
    """Case 5: ``profile --output RUN/checkpoints/last.ckpt`` replaced the weights; ``profile --max_samples 1`` the
    run's full profile, which later requests then used."""
    run = copy_run(poisoned_run, tmp_path)
    checkpoint = checkpoint_of(run)
    weights, full = checkpoint.read_bytes(), (run / "sharpness_profile.pt").read_bytes()
    for extra in ([], ["--overwrite", "true"]):
        with pytest.raises(FileExistsError, match=r"last\.ckpt' is the run's checkpoint: it is never replaced"):
            main(["profile", str(run), "--max_samples", "1", "--output", str(checkpoint), *extra])
    other = tmp_path / "notes.txt"
    other.write_text("notes")
    with pytest.raises(FileExistsError, match=r"notes\.txt' exists and is not a sharpness profile: it is not replaced"):
        main(["profile", str(run), "--max_samples", "1", "--output", str(other), "--overwrite", "true"])
    with pytest.raises(FileExistsError, match=rf"already holds a sharpness profile \(exact, {SUBSET:,} samples\) that"):
        main(["profile", str(run), "--max_samples", "1"])
    assert checkpoint.read_bytes() == weights and (run / "sharpness_profile.pt").read_bytes() == full
    assert other.read_text() == "notes"
    main(["profile", str(run), "--max_samples", "1", "--overwrite", "true"])
    assert SharpnessProfile.load(run / "sharpness_profile.pt").num_samples == 1


def test_a_request_pointed_at_the_training_run_never_replaces_it(poisoned_run, tmp_path):
    """Case 5: an unlearning request whose logger points at the training run directory replaced its
    ``config.yaml``; with ``--overwrite`` it would now be swapped away whole, so it is refused either way."""
    run = copy_run(poisoned_run, tmp_path / "runs" / "mnist", "version_0")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    logger = ["--trainer.logger.init_args.name", "mnist", "--trainer.logger.init_args.version", "0"]
    with pytest.raises(FileExistsError, match=r"version_0' already holds .*config\.yaml.*not a finished request"):
        unlearn_main(request_args(run, tmp_path / "runs", *logger))
    with pytest.raises(FileExistsError, match=r"holds checkpoints/, .*poison\.json.* which no unlearning request "
                       r"writes: it is not replaced, even with overwrite"):  # fmt: skip
        unlearn_main(request_args(run, tmp_path / "runs", *logger, "--overwrite"))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert [p.name for p in (tmp_path / "runs" / "mnist").iterdir()] == ["version_0"]


def test_sweep_and_demo_outputs_are_guarded(poisoned_run, tmp_path):
    """Case 5: ``sweep --out`` clobbered an earlier ``sweep.json`` (and could point at a run); ``demo --out``
    overwrote its table and reports. Both are refused before any work."""
    from lightning_unlearn.demo import main as demo
    from lightning_unlearn.sweep import layer_sweep

    earlier = tmp_path / "sweep"
    earlier.mkdir()
    (earlier / "sweep.json").write_text('{"earlier": true}')
    with pytest.raises(FileExistsError, match=r"sweep' already holds .*sweep\.json from an earlier sweep"):
        layer_sweep(str(poisoned_run), out=str(earlier), accelerator="cpu")
    run = copy_run(poisoned_run, tmp_path)
    with pytest.raises(FileExistsError, match=r"holds checkpoints/.*which no sweep writes"):
        layer_sweep(str(run), out=str(run), accelerator="cpu", overwrite=True)
    assert (earlier / "sweep.json").read_text() == '{"earlier": true}' and (run / "poison.json").is_file()

    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo_table.md").write_text("the earlier table")
    with pytest.raises(SystemExit, match=r"already holds demo_table\.md of an earlier demo; pass `--overwrite`"):
        demo(["--out", str(out)])
    assert os.listdir(out) == ["demo_table.md"] and (out / "demo_table.md").read_text() == "the earlier table"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "../../../../x"], r"`--name` must be a single folder name .*got '\.\./\.\./\.\./\.\./x'"),
        (["--name", "a/b"], r"`--name` must be a single folder name"),
        (["--trainer.logger.init_args.name", "../../x"], r"`--trainer\.logger\.init_args\.name` must be a relative"),
        (["--trainer.logger.init_args.version", "../x"], r"`--trainer\.logger\.init_args\.version` must be a single"),
    ],
    ids=["name-traversal", "name-nested", "logger-name", "logger-version"],
)
def test_output_paths_stay_inside_their_folder(poisoned_run, tmp_path, capsys, monkeypatch, args, message):
    """Case 5: ``--name ../../../../x`` wrote outside the run."""
    monkeypatch.chdir(tmp_path)
    run = copy_run(poisoned_run, tmp_path / "deep" / "er")
    with pytest.raises(SystemExit) as exit_info:
        unlearn_main(["-c", SA_CONFIG, "--model.run", str(run), *FAST, *args])
    assert exit_info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep"] and not (run / "unlearn").exists()


_STALL = """
import sys, time
from lightning_unlearn import pipeline
from lightning_unlearn.cli import unlearn_main

write = pipeline.atomic_write_text
def stall(path, text, **kwargs):
    if path.name == "report.json":
        print("STALLED", flush=True)
        time.sleep(600)
    return write(path, text, **kwargs)
pipeline.atomic_write_text = stall
unlearn_main(sys.argv[1:])
"""


@pytest.mark.timeout(600)
def test_an_interrupted_overwrite_leaves_the_earlier_result_whole(poisoned_run, tmp_path):
    """Case 5: an ``--overwrite`` request killed midway left a ``config.yaml`` that did not describe the
    ``report.json`` beside it. Now the earlier result stays whole until the new one replaces it whole."""
    logger = ["--name", "req", "--trainer.logger.init_args.version", "0"]
    unlearn_main(request_args(poisoned_run, tmp_path, *logger))
    folder = tmp_path / "req" / "version_0"
    earlier = {p.name: p.read_bytes() for p in folder.iterdir()}
    step = ["--model.method.init_args.steps", "[0.001]", "--overwrite"]
    command = [sys.executable, "-c", _STALL, *request_args(poisoned_run, tmp_path, *logger, *step)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        while line and "STALLED" not in line:
            line = child.stdout.readline()
        assert "STALLED" in line, child.stderr.read()[-3000:]
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == earlier
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == earlier  # config.yaml and report.json agree
    (leftover,) = [p for p in (tmp_path / "req").iterdir() if p.name.endswith(".staging")]
    assert (leftover / "config.yaml").is_file()  # the killed request's config was written there
    with pytest.warns(InterruptedWriteWarning, match=rf"{leftover.name}.*holds the last complete result"):
        report = unlearn_main(request_args(poisoned_run, tmp_path, *logger, *step))
    assert report["method"]["step"] == 1e-3 and [p.name for p in (tmp_path / "req").iterdir()] == ["version_0"]
    assert "- 0.001" in (folder / "config.yaml").read_text()
    assert json.loads((folder / REPORT_FILENAME).read_text())["method"]["step"] == 1e-3


# ----------------------------------------------------------------------------------------- case 6: smaller cases
def test_trainer_max_epochs_is_refused_not_ignored(poisoned_run, tmp_path, capsys):
    """Case 6: ``--trainer.max_epochs 0`` was silently ignored by the iterative methods."""
    with pytest.raises(SystemExit) as exit_info:
        unlearn_main(request_args(poisoned_run, tmp_path, "--trainer.max_epochs", "0"))
    assert exit_info.value.code == 2
    assert "`--trainer.max_epochs` (0) is not used by unlearning requests" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"The Trainer's `max_epochs`=0 is not used by unlearning"):
        run_unlearning(unlearn_trainer(max_epochs=0), fast_module(poisoned_run), out_dir=tmp_path / "out")
    assert outputs(tmp_path) == []


@pytest.mark.parametrize("value", ["0", "-5"])
def test_profile_batch_size_must_be_positive(poisoned_run, tmp_path, value):
    """Case 6: ``profile --batch_size 0`` ran with 1000, ``--batch_size -5`` gave a torch traceback."""
    with pytest.raises(ValueError, match=rf"`batch_size` must be an integer >= 1, got {value}\."):
        main(["profile", str(poisoned_run), "--batch_size", value, "--output", str(tmp_path / "p.pt")])
    with pytest.raises(ValueError, match=r"`max_samples` must be an integer >= 1 or None, got 0\."):
        main(["profile", str(poisoned_run), "--max_samples", "0", "--output", str(tmp_path / "p.pt")])
    assert outputs(tmp_path) == []


class _FullDisk:
    """A file whose writes fail with "no space left on device" after ``limit`` bytes."""

    def __init__(self, handle: Any, limit: int) -> None:
        self.handle, self.limit, self.written = handle, limit, 0

    def write(self, data: Any) -> int:
        if self.written + len(data) > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += len(data)
        return self.handle.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def test_a_full_disk_is_reported_in_plain_words(poisoned_run, tmp_path, monkeypatch):
    """Case 6: a full disk reported ``unexpected pos`` (``torch.save``) or "you tried to log 78.35 which is currently
    not supported" (the TensorBoard logger)."""
    path = tmp_path / "unlearned.ckpt"
    path.write_bytes(b"the previous version")
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: _FullDisk(fdopen(*a, **k), 1000))
    with pytest.raises(OSError, match=r"unlearned\.ckpt': no space left on the device\. Its previous version .* is "
                       r"intact\. Free some space") as caught:  # fmt: skip
        atomic_write(path, lambda handle: torch.save({"w": torch.zeros(10_000)}, handle))
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"the previous version" and os.listdir(tmp_path) == ["unlearned.ckpt"]
    monkeypatch.undo()

    from lightning.pytorch.loggers import TensorBoardLogger

    writer = type(TensorBoardLogger(str(tmp_path / "probe")).experiment)

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "add_scalar", full)
    with pytest.raises(OSError, match=r"no space left on the device\. Nothing of this request was committed"):
        unlearn_main(request_args(poisoned_run, tmp_path / "out"))
    assert [p for p in outputs(tmp_path / "out") if "version_" in p] == []  # no partial result, no staging folder


def test_a_profile_elsewhere_serves_a_read_only_run(poisoned_run, tmp_path, monkeypatch):
    """Case 6: a read-only run without a profile could not be unlearned, and ``--model.profile PATH`` could not
    point the profile elsewhere: a missing ``PATH`` is now computed there, and the run directory is not touched."""
    run = copy_run(poisoned_run, tmp_path)
    (run / "sharpness_profile.pt").unlink()
    before = sorted(p.name for p in run.rglob("*"))
    elsewhere = tmp_path / "profiles" / "run.pt"
    report = unlearn_main(request_args(run, tmp_path / "out", "--model.profile", str(elsewhere)))
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written into the run
    assert SharpnessProfile.load(elsewhere).num_samples == SUBSET and report["profile"]["num_samples"] == SUBSET
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == run else real_access(p, mode))
    with pytest.raises(PermissionError, match=r"run' holds no sharpness profile and is not writable: pass "
                       r"`--model\.profile PATH`"):  # fmt: skip
        # a selection that reads curvature (one that reads none, like the last layer, needs no profile at all)
        module = UnlearnModule(str(run), FirstOrder(steps=[1e-4], criterion="fixed"), SmallestLayer())
        run_unlearning(unlearn_trainer(accelerator="cpu"), module, out_dir=tmp_path / "ro")
    assert outputs(tmp_path / "ro") == []


@pytest.mark.parametrize("edit", ["layer-removed", "layer-retyped"])
def test_a_profile_with_a_layer_removed_or_retyped_is_refused(poisoned_run, tmp_path, edit):
    """Case 6: a profile with a layer removed (fingerprints kept) changed the selection unnoticed."""
    profile = SharpnessProfile.load(poisoned_run / "sharpness_profile.pt")
    if edit == "layer-removed":
        del profile.diagonals["net.fc2.weight"], profile.diagonals["net.fc2.bias"]
        message = r"it has no diagonal for \['net\.fc2\.weight', 'net\.fc2\.bias'\]"
    else:
        profile.layer_types["net.fc1"] = "Conv2d"
        message = r"it types layer net\.fc1 as 'Conv2d', the model's is 'Linear'"
    profile.save(tmp_path / "edited.pt")
    module = fast_module(poisoned_run, profile=str(tmp_path / "edited.pt"))
    with pytest.raises(ValueError, match=rf"The profile '.*edited\.pt' does not fit the checkpoint: {message}"):
        run_unlearning(unlearn_trainer(accelerator="cpu"), module, out_dir=tmp_path / "out", evaluation=ACCURACY_ONLY)
    assert outputs(tmp_path / "out") == []


def test_a_request_on_an_interrupted_training_run_says_so(poisoned_run, tmp_path):
    """Case 6: a request on a training run that was interrupted said nothing about it."""
    run = copy_run(poisoned_run, tmp_path)
    (run / "results.json").unlink()  # written after fit and test: an interrupted run has none
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("max_epochs: 2", "max_epochs: 5"))
    with pytest.warns(InterruptedTrainingWarning, match=r"looks interrupted: its checkpoint is from epoch 2 of 5"):
        report = unlearn_main(request_args(run, tmp_path / "out"))
    assert report["training"] == {"complete": False, "epoch": 1, "max_epochs": 5}
    with warnings.catch_warnings():
        warnings.simplefilter("error", InterruptedTrainingWarning)
        complete = unlearn_main(request_args(poisoned_run, tmp_path / "out2"))
    assert complete["training"]["complete"] is True


def test_the_poisoned_run_is_refused_as_its_own_reference(poisoned_run, tmp_path):
    """Case 6: ``--reference`` equal to the poisoned run itself was accepted (its own checkpoint, or a copy)."""
    copy = copy_run(poisoned_run, tmp_path, "copy")
    for reference in (poisoned_run, checkpoint_of(poisoned_run), copy):
        with pytest.raises(ValueError, match=r"`reference` '.*last\.ckpt' is the poisoned model itself"):
            unlearn_main(request_args(poisoned_run, tmp_path / "out", "--reference", str(reference)))
    assert outputs(tmp_path / "out") == []


# ------------------------------------------------------------------------------------- property: random damage
def _flip_bit(data: bytes, rng: random.Random) -> bytes:
    damaged = bytearray(data)
    position = rng.randrange(len(damaged))
    damaged[position] ^= 1 << rng.randrange(8)
    return bytes(damaged)


def _nearby_sample(record: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The first recorded sample replaced by another sample (often not poisoned, sometimes of the same class)."""
    return {**record, "indices": [record["indices"][0] + rng.randrange(1, 30), *record["indices"][1:]]}


#: Field edits of a ``poison.json`` (each returns the new record, or the file's text); harmless ones included.
RECORD_EDITS: list[Callable[[dict[str, Any], random.Random], Any]] = [
    _nearby_sample,
    lambda r, rng: {**r, "true_labels": [(r["true_labels"][0] + 1) % 10, *r["true_labels"][1:]]},
    lambda r, rng: {**r, "poisoned_labels": [rng.choice([-1, 10, -100]), *r["poisoned_labels"][1:]]},
    lambda r, rng: {**r, "poisoned_labels": [(r["poisoned_labels"][0] + 1) % 9, *r["poisoned_labels"][1:]]},
    lambda r, rng: {**r, "spec": {**r["spec"], rng.choice(["seed", "count"]): rng.randrange(1, 9)}},
    lambda r, rng: {**r, "spec": {**r["spec"], "target_class": rng.randrange(9)}},
    lambda r, rng: {**r, "spec": {**r["spec"], "kind": rng.choice(["untargeted", "pairflip", "label_flip"])}},
    lambda r, rng: {**r, rng.choice(["dataset_size", "num_classes", "version"]): rng.randrange(1, 5000)},
    lambda r, rng: {**r, "dataset": "fashion_mnist"},
    lambda r, rng: {k: v for k, v in r.items() if k != rng.choice(list(r))},
    lambda r, rng: {**r, "extra": 1},
    lambda r, rng: {**r, **{k: v[:-1] for k, v in r.items() if k in ("indices", "true_labels", "poisoned_labels")}},
    lambda r, rng: {**r, **{k: v[::-1] for k, v in r.items() if k in ("indices", "true_labels", "poisoned_labels")}},
    lambda r, rng: json.dumps(dict(reversed(list(r.items()))), indent=rng.randrange(4)),  # harmless
]


def _any_diagonal(state: dict[str, Any], rng: random.Random) -> str:
    return rng.choice(sorted(state["diagonals"]))


#: Field edits of a profile's saved state (in place; not its curvature values: see the README).
PROFILE_EDITS: list[Callable[[dict[str, Any], random.Random], Any]] = [
    lambda s, rng: s["diagonals"].pop(_any_diagonal(s, rng)),
    lambda s, rng: s["diagonals"].__setitem__("net.fc3.weight", s["diagonals"].pop("net.fc2.weight")),
    lambda s, rng: s["diagonals"].__setitem__("net.fc1.bias", s["diagonals"]["net.fc1.bias"][:-1]),
    lambda s, rng: s["diagonals"].__setitem__("net.conv2.bias", s["diagonals"]["net.conv2.bias"].long()),
    lambda s, rng: s["diagonals"][_any_diagonal(s, rng)].view(-1).__setitem__(0, float(rng.choice(["nan", "inf"]))),
    lambda s, rng: s["diagonals"][_any_diagonal(s, rng)].view(-1).__setitem__(0, -1.0),
    lambda s, rng: s.__setitem__("estimator", rng.choice(["lanczos", 3])),
    lambda s, rng: s.__setitem__("num_samples", rng.choice([0, -1, "many"])),
    lambda s, rng: s.__setitem__(rng.choice(["architecture", "weights"]), "0123456789abcdef"),
    lambda s, rng: s["layer_types"].__setitem__(rng.choice(sorted(s["layer_types"])), "LSTM"),
    lambda s, rng: s["layer_types"].pop(rng.choice(sorted(s["layer_types"]))),
    lambda s, rng: s.__setitem__("format_version", 2),
    lambda s, rng: s["metadata"].__setitem__("note", "harmless"),  # harmless
    lambda s, rng: s.__setitem__("estimator", "mc"),  # harmless: a name in the report
]


def _any_weight(state: dict[str, Any], rng: random.Random) -> str:
    return rng.choice(sorted(state["state_dict"]))


#: Field edits of a checkpoint's saved state (in place; not its weight values: another model is another run).
CHECKPOINT_EDITS: list[Callable[[dict[str, Any], random.Random], Any]] = [
    lambda s, rng: s["state_dict"].pop(_any_weight(s, rng)),
    lambda s, rng: s["state_dict"].__setitem__("net.fc2.bias", s["state_dict"]["net.fc2.bias"][:-1]),
    lambda s, rng: s["state_dict"].__setitem__("net.extra", torch.zeros(3)),
    lambda s, rng: s["hyper_parameters"].__setitem__(rng.choice(["num_classes", "in_channels", "image_size"]), 3),
    lambda s, rng: s["hyper_parameters"].__setitem__("architecture", rng.choice(["resnet18", "lenet"])),
    lambda s, rng: s["datamodule_hyper_parameters"].__setitem__("train_subset", 3000),
    lambda s, rng: s["datamodule_hyper_parameters"].__setitem__(rng.choice(["pad_to", "repeat_channels"]), 32),
    lambda s, rng: s["datamodule_hyper_parameters"].__setitem__("dataset", "fashion_mnist"),
    lambda s, rng: s["datamodule_hyper_parameters"].__setitem__("drop_poisoned", True),
    lambda s, rng: s["datamodule_hyper_parameters"].__setitem__("run", "a request's argument"),
    lambda s, rng: s[DATAMODULE_STATE_KEY]["poison_record"]["spec"].__setitem__("seed", 7),
    lambda s, rng: s[DATAMODULE_STATE_KEY]["poison_record"].__setitem__("indices", [0]),
    lambda s, rng: s.pop(DATAMODULE_STATE_KEY),  # harmless: no record to check poison.json against (a warning)
    lambda s, rng: s["datamodule_hyper_parameters"].__setitem__("batch_size", 7),  # harmless: not used by requests
    lambda s, rng: s.__setitem__("epoch", 1),  # harmless
]

EDITS = {"poison.json": RECORD_EDITS, "sharpness_profile.pt": PROFILE_EDITS, "checkpoint": CHECKPOINT_EDITS}


def _corrupt(run: Path, target: str, how: str, index: int, rng: random.Random) -> str:
    """Damage one of the run's files: truncate it or flip one bit (at a position drawn from ``rng``), or apply field
    edit number ``index``; describe what was done."""
    path = checkpoint_of(run) if target == "checkpoint" else run / target
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: rng.randrange(len(data))])
    elif how == "bitflip":
        path.write_bytes(_flip_bit(data, rng))
    elif target == "poison.json":
        edited = RECORD_EDITS[index](json.loads(data), rng)
        path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    else:
        state = torch.load(path, weights_only=True)
        EDITS[target][index](state, rng)
        torch.save(state, path)
    return f"{how}{f' #{index}' if how == 'edit' else ''} of {target}"


def _result(report: dict[str, Any], folder: Path) -> dict[str, Any]:
    """What a request computed: its forget set, selection, step, metrics and the unlearned weights."""
    weights = torch.load(folder / UNLEARNED_FILENAME, weights_only=True)["state_dict"]
    return {
        "forget_samples": report["method"]["forget_samples"],
        "selection": report["selection"],
        "step": report["method"]["step"],
        "before": report["before"],
        "after": report["after"],
        "weights": {k: (v.view(torch.uint8) if v.is_floating_point() else v).tolist() for k, v in weights.items()},
    }


#: The property's request selects by the profile's values (the flattest layer), so damaged curvature could matter.
BY_PROFILE = ["--model.selection", "SmallestLayer"]


@pytest.fixture(scope="module")
def clean_result(poisoned_run, tmp_path_factory) -> dict[str, Any]:
    """The property's request on an undamaged copy of the run."""
    tmp = tmp_path_factory.mktemp("clean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = unlearn_main(request_args(copy_run(poisoned_run, tmp), tmp / "out", *BY_PROFILE))
    return _result(report, Path(report["output_dir"]))


#: Errors a damaged run may end with: each a clear message naming the file (DatasetError is a RuntimeError).
CLEAR_ERRORS = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)


def check_corruption(poisoned_run: Path, tmp_path: Path, clean: dict[str, Any], target: str, how: str, index: int):
    """Damage a copy of the run (:func:`_corrupt`) and run the request on it: either it fails with a clear error and
    commits nothing, or (the damage did not change what the request reads) its result is bit for bit the undamaged
    run's."""
    run = copy_run(poisoned_run, tmp_path)
    what = _corrupt(run, target, how, index, random.Random(f"{target} {how} {index}"))
    out = tmp_path / "out"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = unlearn_main(request_args(run, out, *BY_PROFILE))
    except SystemExit as err:  # a usage error would be exit code 2: never 0
        assert err.code not in (0, None), what
        return f"{what}: exit {err.code}"
    except CLEAR_ERRORS as err:
        assert str(err), what
        assert [p for p in outputs(out) if "version_" in p] == [], (what, outputs(out))
        return f"{what}: {type(err).__name__}"
    assert _result(report, Path(report["output_dir"])) == clean, f"{what} exited 0 with another result"
    return f"{what}: same result"


#: Every field edit once, and flipped bits and truncations at positions drawn from a seeded generator.
CASES = [(target, "edit", i) for target, edits in EDITS.items() for i in range(len(edits))]
CASES += [(target, how, seed) for target in EDITS for how, n in (("bitflip", 3), ("truncate", 1)) for seed in range(n)]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("target", "how", "index"), CASES, ids=[f"{t}-{h}-{i}" for t, h, i in CASES])
def test_random_corruptions_never_give_a_result_on_something_else(
    poisoned_run, tmp_path, clean_result, target, how, index
):
    """Property: a truncated, bit-flipped or field-edited ``poison.json``, profile or checkpoint never lets a request
    exit 0 with a result computed on something other than what was trained (here every field edit once and a few
    random flips and cuts; ``-m slow`` draws 200 more at random)."""
    check_corruption(poisoned_run, tmp_path, clean_result, target, how, index)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_random_corruptions_many(poisoned_run, tmp_path, clean_result):
    rng = random.Random(14)
    for case in range(200):
        target = rng.choice(sorted(EDITS))
        how = rng.choice(["truncate", "bitflip", "edit"])
        index = rng.randrange(len(EDITS[target])) if how == "edit" else 100 + case
        check_corruption(poisoned_run, tmp_path / str(case), clean_result, target, how, index)
