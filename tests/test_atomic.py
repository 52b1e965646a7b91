"""Nothing lost: a writer killed with SIGKILL mid-write leaves every previous artifact intact, bit for bit, and only its
``.<name>.*.tmp`` temporary file; the next write of that artifact removes the leftover with a warning naming it."""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_unlearn.curvature.profile import SharpnessProfile
from lightning_unlearn.utils import (
    InterruptedWriteWarning,
    atomic_write,
    atomic_write_text,
    clean_stale_temp_files,
    stale_temp_files,
)

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="the writer processes are forked (POSIX only)"
)

PROFILE, CHECKPOINT, REPORT = "sharpness_profile.pt", "unlearned.ckpt", "report.json"
ARTIFACTS = (PROFILE, CHECKPOINT, REPORT)
#: Large random payloads, made once in this process: forked writers only add a small per-version part (no parallel
#: tensor kernels after fork).
_BIG = torch.randn(3 * 2**18, generator=torch.Generator().manual_seed(0))  # 3 MiB of float32
_WEIGHT = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1))  # 2 MiB
_CONTEXT = multiprocessing.get_context("fork")


# --------------------------------------------------------------------------------------------------- the artifacts
def profile_of(version: int) -> SharpnessProfile:
    """A ~3 MiB curvature profile whose contents depend on ``version``."""
    return SharpnessProfile(
        diagonals={"net.fc.weight": _BIG.view(768, 1024), "net.fc.bias": torch.full((768,), float(version))},
        estimator="exact",
        num_samples=1000 + version,
        dataset="toy",
        architecture="arch",
        weights=f"weights-{version}",
        layer_types={"net.fc": "Linear"},
        metadata={"version": version},
    )


def checkpoint_of(version: int) -> dict[str, Any]:
    """A ~2 MiB checkpoint-like state (as :func:`lightning_unlearn.pipeline.save_unlearned` writes)."""
    return {
        "state_dict": {"net.fc.weight": _WEIGHT, "net.fc.bias": torch.full((512,), float(version))},
        "version": version,
    }


def report_of(version: int) -> str:
    """A ~1 MiB JSON report."""
    return json.dumps({"version": version, "after": {f"metric/{i}": i * 0.5 + version for i in range(40_000)}})


def write_artifact(folder: Path, name: str, version: int) -> None:
    """Write artifact ``name`` of ``version`` the way the library does (all through ``atomic_write``)."""
    if name == PROFILE:
        profile_of(version).save(folder / name)
    elif name == CHECKPOINT:
        state = checkpoint_of(version)
        atomic_write(folder / name, lambda handle: torch.save(state, handle))
    else:
        atomic_write_text(folder / name, report_of(version))


def expected_bytes(name: str, version: int) -> bytes:
    """The exact bytes a complete write of ``name`` at ``version`` produces."""
    if name == REPORT:
        return report_of(version).encode("utf-8")
    buffer = io.BytesIO()
    torch.save(profile_of(version).state_dict() if name == PROFILE else checkpoint_of(version), buffer)
    return buffer.getvalue()


def load_version(folder: Path, name: str) -> int:
    """Load artifact ``name`` with the library's own loader (or ``torch.load`` / ``json``) and return its version."""
    path = folder / name
    if name == PROFILE:
        profile = SharpnessProfile.load(path)
        assert torch.equal(profile.diagonals["net.fc.weight"], _BIG.view(768, 1024))
        return int(profile.metadata["version"])
    if name == CHECKPOINT:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert torch.equal(state["state_dict"]["net.fc.weight"], _WEIGHT)
        return int(state["version"])
    return int(json.loads(path.read_text())["version"])


@contextlib.contextmanager
def no_interrupted_write_warning() -> Iterator[None]:
    """Fail if an :class:`InterruptedWriteWarning` is emitted inside."""
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        yield
    assert not [w for w in records if issubclass(w.category, InterruptedWriteWarning)]


def leftovers(folder: Path) -> list[str]:
    """Names in ``folder`` besides the artifacts; each must be a temporary file ``.<artifact>.*.tmp``."""
    pattern = re.compile(r"^\.(" + "|".join(re.escape(a) for a in ARTIFACTS) + r")\..+\.tmp$")
    others = sorted(p.name for p in folder.iterdir() if p.name not in ARTIFACTS)
    assert all(pattern.match(name) for name in others), others
    return others


# ------------------------------------------------------------------------------------------------ the child processes
class _SlowFile:
    """A file proxy for a child process, like a slow disk: writes go through in chunks of ``chunk`` bytes with a pause
    after each; after ``limit`` bytes (if given) it signals ``stalled`` and sleeps until killed."""

    def __init__(self, handle: Any, chunk: int, pause: float, limit: int | None, stalled: Any) -> None:
        self.handle, self.chunk, self.pause, self.limit, self.stalled = handle, chunk, pause, limit, stalled
        self.written = 0

    def write(self, data: Any) -> int:
        data = bytes(data)
        for start in range(0, len(data), self.chunk):
            piece = data[start : start + self.chunk]
            if self.limit is not None and self.written + len(piece) >= self.limit:
                self.handle.write(piece[: self.limit - self.written])
                self.handle.flush()  # the partial file is visible to the parent
                self.stalled.set()
                time.sleep(600)  # killed here
                raise AssertionError("not killed")
            self.handle.write(piece)
            self.written += len(piece)
            time.sleep(self.pause)
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> _SlowFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def _slow_disk(chunk: int, pause: float, limit: int | None = None, stalled: Any = None) -> None:
    """Make every file this (child) process opens for writing a :class:`_SlowFile`: ``os.fdopen`` as
    ``atomic_write`` uses it, and ``open``, so the tests do not depend on how the library opens its files."""

    def slow(opener: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            handle = opener(file, mode, *args, **kwargs)
            return _SlowFile(handle, chunk, pause, limit, stalled) if set(mode) & set("wax+") else handle

        return wrapped

    os.fdopen, builtins.open = slow(os.fdopen), slow(builtins.open)


def _write_and_stall(folder: Path, name: str, version: int, limit: int, stalled: Any) -> None:
    """Child: start writing ``name`` at ``version``; stall (until killed) after ``limit`` bytes."""
    _slow_disk(1 << 20, 0.0, limit, stalled)
    write_artifact(folder, name, version)


def _rewrite_forever(folder: Path, first: int, started: Any) -> None:
    """Child: on a slow disk (256 KiB per 5 ms), rewrite all three artifacts with versions ``first, first + 1, ...``
    until killed."""
    _slow_disk(1 << 18, 0.005)
    started.set()
    version = first
    while True:
        for name in ARTIFACTS:
            write_artifact(folder, name, version)
        version += 1


def _kill(process: Any) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.join(30)
    assert process.exitcode == -signal.SIGKILL


# ---------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", ARTIFACTS)
def test_kill_mid_write_keeps_the_previous_artifact_and_next_write_reports_the_leftover(tmp_path, name):
    write_artifact(tmp_path, name, 0)
    original = (tmp_path / name).read_bytes()
    size = len(expected_bytes(name, 1))
    stalled = _CONTEXT.Event()
    child = _CONTEXT.Process(target=_write_and_stall, args=(tmp_path, name, 1, size // 2, stalled), daemon=True)
    child.start()
    try:
        assert stalled.wait(60), "the writer never started writing"
        assert (tmp_path / name).read_bytes() == original  # readers see the previous artifact during the write
        (temp,) = [p for p in tmp_path.iterdir() if p.name != name]
        assert re.fullmatch(rf"\.{re.escape(name)}\.{child.pid}\.[a-z0-9_]{{8}}\.lightning-unlearn\.tmp", temp.name)
        assert temp.stat().st_size == size // 2  # really mid-write
        assert stale_temp_files(tmp_path) == []  # its writer is alive: not stale, never removed
        with no_interrupted_write_warning():
            atomic_write_text(tmp_path / "other.json", "{}")  # another artifact in the same folder
        assert temp.exists()
    finally:
        _kill(child)

    assert (tmp_path / name).read_bytes() == original  # bit-identical previous artifact
    assert load_version(tmp_path, name) == 0
    (tmp_path / "other.json").unlink()
    assert leftovers(tmp_path) == [temp.name]  # the killed writer could not clean up
    assert stale_temp_files(tmp_path) == [temp]
    assert stale_temp_files(tmp_path, name) == [temp]
    assert stale_temp_files(tmp_path, "another.json") == []

    with pytest.warns(InterruptedWriteWarning, match=re.escape(temp.name)) as caught:
        write_artifact(tmp_path, name, 2)
    assert "was interrupted" in str(caught[0].message) and "is intact" in str(caught[0].message)
    assert leftovers(tmp_path) == []
    assert load_version(tmp_path, name) == 2
    assert (tmp_path / name).read_bytes() == expected_bytes(name, 2)


def test_repeated_kills_at_random_moments_never_lose_an_artifact(tmp_path):
    """A writer rewriting profile, checkpoint and report in a loop is killed at random moments, several times: each
    artifact is always one complete version (bit-identical to it), never older than before the kill."""
    rng = random.Random(6)
    for name in ARTIFACTS:
        write_artifact(tmp_path, name, 0)
    versions = dict.fromkeys(ARTIFACTS, 0)
    for kill in range(4):
        first = 1000 * (kill + 1)
        started = _CONTEXT.Event()
        child = _CONTEXT.Process(target=_rewrite_forever, args=(tmp_path, first, started), daemon=True)
        child.start()
        try:
            assert started.wait(60)
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            _kill(child)
        for name in ARTIFACTS:
            version = load_version(tmp_path, name)
            assert version == versions[name] or first <= version, (name, version)
            assert (tmp_path / name).read_bytes() == expected_bytes(name, version)
            versions[name] = version
        leftovers(tmp_path)  # only temporary files of the artifacts
    stale = stale_temp_files(tmp_path)
    assert [p.name for p in stale] == leftovers(tmp_path)  # every leftover belongs to a killed writer
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for name in ARTIFACTS:
            write_artifact(tmp_path, name, 1)
    reported = " ".join(str(w.message) for w in records if issubclass(w.category, InterruptedWriteWarning))
    assert all(p.name in reported for p in stale)
    assert leftovers(tmp_path) == []


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped (not running, barring pid reuse within the test)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(dead.stdout)


def test_stale_temp_files_tells_dead_writers_from_live_ones(tmp_path):
    dead_pid = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "own": f".report.json.{os.getpid()}.abc123_x.lightning-unlearn.tmp",  # this process: a write in progress
            "live": f".report.json.{live.pid}.abc123_x.lightning-unlearn.tmp",
            "dead": f".report.json.{dead_pid}.abc123_x.lightning-unlearn.tmp",
            "other": f".report.json.bak.{dead_pid}.abc123_x.lightning-unlearn.tmp",  # artifact "report.json.bak"
            "unrelated": ".hidden.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        (tmp_path / "report.json").write_text("{}")
        paths = {key: tmp_path / name for key, name in names.items()}
        assert stale_temp_files(tmp_path, "report.json") == [paths["dead"]]
        assert stale_temp_files(tmp_path, "report.json.bak") == [paths["other"]]
        assert stale_temp_files(tmp_path) == sorted([paths["dead"], paths["other"]])
        assert stale_temp_files(tmp_path / "missing") == []

        with pytest.warns(InterruptedWriteWarning, match=r"report\.json'.*interrupted") as caught:
            removed = clean_stale_temp_files(tmp_path, "report.json")
        message = str(caught[0].message)
        assert names["dead"] in message and names["live"] not in message
        assert removed == [paths["dead"]]
        remaining = {p.name for p in tmp_path.iterdir()}
        assert remaining == {"report.json", names["own"], names["live"], names["other"], names["unrelated"]}
        with pytest.warns(InterruptedWriteWarning, match="does not exist"):
            clean_stale_temp_files(tmp_path, "report.json.bak")
    finally:
        live.kill()
        live.wait()


def test_the_cleaner_removes_only_the_temporary_files_this_project_writes(tmp_path):
    """Issue 14, case 3: only ``.<artifact>.<dead pid>.<8 random>.lightning-unlearn.tmp`` is ever removed; files of
    other programs (``.thesis.docx.a1b2c3d4.tmp``, any name with a dead pid but without the marker, the name format of
    earlier versions of this project) are left alone, whatever folder or artifact is being written."""
    dead = _dead_pid()
    foreign = [
        ".thesis.docx.a1b2c3d4.tmp",  # the example: deleted by `lightning-unlearn profile dl/model.ckpt`
        f".thesis.docx.{dead}.a1b2c3d4.tmp",  # another program's name with a dead pid in it
        f".last.ckpt.{dead}.a1b2c3d4.tmp",  # an artifact's name, without the marker (not written by this project)
        ".last.ckpt.k2j4_9az.tmp",
        f".last.ckpt.{dead}.a1b2c3d4.lightning-unlearn.tmp.bak",  # not the exact form
        f".last.ckpt.{dead}.a1b2c3d4e5.lightning-unlearn.tmp",  # random part longer than tempfile's 8 characters
        f".last.ckpt.{dead}.A1B2C3D4.lightning-unlearn.tmp",  # upper case: tempfile never writes it
    ]
    ours = f".last.ckpt.{dead}.a1b2c_d4.lightning-unlearn.tmp"
    for name in [*foreign, ours]:
        (tmp_path / name).write_bytes(b"keep me")
    (tmp_path / "model.ckpt").write_bytes(b"a checkpoint")
    assert stale_temp_files(tmp_path) == [tmp_path / ours]
    with pytest.warns(InterruptedWriteWarning, match=re.escape(ours)):
        assert clean_stale_temp_files(tmp_path) == [tmp_path / ours]
    with no_interrupted_write_warning():
        atomic_write_text(tmp_path / "last.ckpt", "new")  # writing the artifact itself touches none of them either
        atomic_write_text(tmp_path / "thesis.docx", "new")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(foreign)
    assert all((tmp_path / name).read_bytes() == b"keep me" for name in foreign)


# ------------------------------------------------------------------------------------- Lightning checkpoints of a run
def _save_checkpoint_and_stall(path: Path, state: dict[str, Any], limit: int, stalled: Any) -> None:
    """Child: save ``state`` the way the training Trainer does (``AtomicCheckpointIO``); stall after ``limit`` bytes."""
    from lightning_unlearn.run import AtomicCheckpointIO

    _slow_disk(1 << 20, 0.0, limit, stalled)
    AtomicCheckpointIO().save_checkpoint(state, path)


def test_training_checkpoints_survive_a_kill_and_the_next_start_says_so(poisoned_run, tmp_path):
    """``train.py`` saves checkpoints through ``AtomicCheckpointIO``: killed mid-save, the run keeps its last checkpoint
    bit for bit, and opening the run next time warns that a write was interrupted (naming the leftover), cleaning up."""
    import shutil

    from conftest import ROOT

    from lightning_unlearn.cli import TrainCLI
    from lightning_unlearn.run import AtomicCheckpointIO, TrainingRun

    configs = ["-c", str(ROOT / "configs" / "mnist_cnn_targeted.yaml"), "-c", str(ROOT / "configs" / "debug.yaml")]
    cli = TrainCLI(args=configs, run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)

    run = tmp_path / "run"
    shutil.copytree(poisoned_run, run)
    checkpoint = TrainingRun.from_path(run).checkpoint
    original = checkpoint.read_bytes()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["epoch"] = 99  # the "next" checkpoint
    stalled = _CONTEXT.Event()
    args = (checkpoint, state, len(original) // 2, stalled)
    child = _CONTEXT.Process(target=_save_checkpoint_and_stall, args=args, daemon=True)
    child.start()
    try:
        assert stalled.wait(60), "the writer never started writing"
    finally:
        _kill(child)
    (temp,) = [p for p in checkpoint.parent.iterdir() if p.name.endswith(".tmp")]
    assert checkpoint.read_bytes() == original

    with pytest.warns(InterruptedWriteWarning, match=re.escape(temp.name)):
        reopened = TrainingRun.from_path(run)
    assert not temp.exists()
    assert reopened.load_classifier() is not None  # the previous checkpoint, complete


# ---------------------------------------------------------------------------------------- output folders, claimed
def _result(folder: Path, version: int) -> dict[str, bytes]:
    """A request-like result: every file says which version it belongs to."""
    files = {"report.json": f'{{"version": {version}}}'.encode(), "config.yaml": f"version: {version}\n".encode()}
    if version % 2:
        files["unlearned.ckpt"] = bytes([version]) * 1000  # odd versions have a file the even ones lack
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_claimed_folder_is_refused_to_a_second_claim_and_replaced_whole(tmp_path):
    from lightning_unlearn.outputs import OutputBusyError, OutputClaim

    folder = tmp_path / "request" / "version_0"
    first = OutputClaim.acquire(folder)
    with pytest.raises(OutputBusyError, match=rf"version_0' is being written by another output \(pid {os.getpid()}\)"):
        OutputClaim.acquire(folder, overwrite=True)  # a lock per folder, whatever the flags
    old = _result(first.staging, 1)
    assert not folder.exists()  # nothing visible until the commit
    assert first.commit() == folder and _contents(folder) == old
    assert _hidden(folder.parent) == []  # no staging folder, no lock file left

    with pytest.raises(FileExistsError, match=r"already holds config\.yaml, report\.json, unlearned\.ckpt; pass"):
        OutputClaim.acquire(folder)
    second = OutputClaim.acquire(folder, overwrite=True)
    new = _result(second.staging, 2)
    assert _contents(folder) == old  # until the commit, the earlier result is untouched
    second.commit()
    assert _contents(folder) == new  # replaced whole: unlearned.ckpt of version 1 is gone
    aborted = OutputClaim.acquire(folder, overwrite=True)
    _result(aborted.staging, 3)
    aborted.abort()
    assert _contents(folder) == new and _hidden(folder.parent) == []


def test_a_folder_holding_foreign_files_is_never_replaced(tmp_path):
    from lightning_unlearn.outputs import OutputClaim

    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "poison.json").write_text("{}")
    everything = lambda f: sorted(p.name + "/" * p.is_dir() for p in f.iterdir())  # noqa: E731
    with pytest.raises(FileExistsError, match=r"holds checkpoints/, poison\.json, which no request writes"):
        OutputClaim.acquire(folder, overwrite=True, foreign=everything, what="request")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a folder"):
        OutputClaim.acquire(tmp_path / "file", overwrite=True)
    (tmp_path / "empty").mkdir()
    with OutputClaim.acquire(tmp_path / "empty") as claim:  # an empty folder is free
        (claim.staging / "report.json").write_text("{}")
    assert os.listdir(tmp_path / "empty") == ["report.json"]


def test_next_versions_skip_folders_being_written(tmp_path):
    from lightning_unlearn.outputs import OutputClaim

    (tmp_path / "version_3").mkdir()
    (tmp_path / "version_3" / "report.json").write_text("{}")
    first = OutputClaim.acquire_version(tmp_path)
    second = OutputClaim.acquire_version(tmp_path)  # version_4 is claimed (not yet created): the next one
    assert (first.final.name, second.final.name) == ("version_4", "version_5")
    second.commit()
    first.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version_3", "version_4", "version_5"]


def _claim_and_stall(folder: Path, version: int, stalled: Any) -> None:
    """Child: claim ``folder`` (overwrite), write a result into the staging folder, stall until killed."""
    from lightning_unlearn.outputs import OutputClaim

    claim = OutputClaim.acquire(folder, overwrite=True)
    _result(claim.staging, version)
    stalled.set()
    time.sleep(600)


def test_a_killed_claim_leaves_the_previous_result_and_the_next_claim_cleans_up(tmp_path):
    """``kill -9`` of a request that is rewriting a folder with ``overwrite``: the folder keeps the earlier result bit
    for bit, the lock dies with the process, and the next claim removes the staging folder it left, with a warning."""
    from lightning_unlearn.outputs import OutputClaim

    folder = tmp_path / "version_0"
    with OutputClaim.acquire(folder) as claim:
        old = _result(claim.staging, 1)
    stalled = _CONTEXT.Event()
    child = _CONTEXT.Process(target=_claim_and_stall, args=(folder, 2, stalled), daemon=True)
    child.start()
    try:
        assert stalled.wait(60), "the child never claimed the folder"
        assert _contents(folder) == old
    finally:
        _kill(child)
    assert _contents(folder) == old  # the earlier result, bit for bit
    (leftover,) = [name for name in _hidden(tmp_path) if name.endswith(".staging")]
    assert re.fullmatch(rf"\.version_0\.{child.pid}\.[a-z0-9_]{{8}}\.lightning-unlearn\.staging", leftover)
    with pytest.warns(InterruptedWriteWarning, match=rf"{re.escape(leftover)}.*holds the last complete result"):
        claim = OutputClaim.acquire(folder, overwrite=True)  # the lock died with its holder
    new = _result(claim.staging, 4)
    claim.commit()
    assert _contents(folder) == new and _hidden(tmp_path) == []


def test_without_an_atomic_swap_a_replacement_interrupted_between_renames_is_undone(tmp_path, monkeypatch):
    """Where ``renameat2(RENAME_EXCHANGE)`` is missing the swap takes three renames; a kill between the first two
    leaves the old result under a ``.previous`` name (marked as the library's own), which the next claim of the folder
    puts back."""
    from lightning_unlearn import outputs
    from lightning_unlearn.outputs import OWNER_FILE, OutputClaim

    monkeypatch.setattr(outputs, "_renameat2_exchange", lambda first, second: False)
    folder = tmp_path / "version_0"
    with OutputClaim.acquire(folder) as claim:
        _result(claim.staging, 1)
    with OutputClaim.acquire(folder, overwrite=True) as claim:  # the fallback swap, completed
        new = _result(claim.staging, 2)
    assert _contents(folder) == new and _hidden(tmp_path) == []
    dead = _dead_pid()
    previous = tmp_path / f".version_0.{dead}.abcd_123.lightning-unlearn.previous"
    folder.rename(previous)  # as left by a writer killed after the first rename, which marked it as its own before
    (previous / OWNER_FILE).write_text(f"lightning-unlearn claim {dead} abcd_123\n")
    with pytest.warns(InterruptedWriteWarning, match="restored its previous contents"):
        OutputClaim.acquire(folder, overwrite=True).abort()
    assert _contents(folder) == new and _hidden(tmp_path) == []
