"""Nothing escapes a folder (issue 30): what is planted beside an output folder is refused or left alone, never
followed, truncated, restored or removed; a claim whose folder vanished commits nothing; a folder that stops being
writable is reported as such. Every test plants the attack with real file-system operations and would fail on the
code before the fix (which truncated the victim, created files outside, restored planted folders, re-created
vanished parents, and blamed the lock file)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lightning_unlearn import outputs
from lightning_unlearn.outputs import (
    OWNER_FILE,
    ForeignEntryWarning,
    OutputClaim,
    UnsafeOutputError,
)
from lightning_unlearn.utils import FolderGoneError, InterruptedWriteWarning, atomic_write_text

pytestmark = pytest.mark.skipif(
    os.name != "posix" or "fork" not in multiprocessing.get_all_start_methods(),
    reason="symbolic links, FIFOs, file modes and forked writers (POSIX only)",
)

LOCK = ".version_0.lightning-unlearn.lock"
VICTIM = b"precious data that must stay as it is\n"
_CONTEXT = multiprocessing.get_context("fork")


# --------------------------------------------------------------------------------------------------------- helpers
def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped (not running, barring pid reuse within the test)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(dead.stdout)


def _victim(tmp_path: Path) -> Path:
    """A file outside the output parent that an attack would overwrite."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    return victim


def _outside(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A folder outside the output parent, with a file, that an attack would make the claim write into or delete."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "keep.txt").write_bytes(VICTIM)
    return folder, _contents(folder)


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _result(folder: Path, version: int) -> dict[str, bytes]:
    """A request-like result whose files say which version they belong to."""
    files = {"report.json": f'{{"version": {version}}}'.encode(), "config.yaml": f"version: {version}\n".encode()}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def _foreign_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ForeignEntryWarning)]


# ------------------------------------------------------------------------------------- attack 1: the lock file link
def test_a_lock_symlink_to_a_file_outside_is_refused_and_the_file_untouched(tmp_path):
    """A planted ``.version_0.lightning-unlearn.lock -> victim.txt`` truncated the victim and wrote the request's pid
    into it. Now the claim is refused with an error naming the link, and the victim keeps every byte."""
    victim = _victim(tmp_path)
    parent = tmp_path / "runs"
    parent.mkdir()
    (parent / LOCK).symlink_to(victim)
    with pytest.raises(UnsafeOutputError, match=rf"lock file '.*{re.escape(LOCK)}' is a symbolic link .*Remove it"):
        OutputClaim.acquire(parent / "version_0")
    assert victim.read_bytes() == VICTIM
    assert _names(parent) == [LOCK]  # no staging folder either

    # the next version is taken instead, with one warning naming the link; the victim is never touched
    with pytest.warns(ForeignEntryWarning, match=rf"{re.escape(LOCK)}' is a symbolic link"):
        claim = OutputClaim.acquire_version(parent)
    assert claim.final.name == "version_1"
    _result(claim.staging, 1)
    claim.commit()
    assert victim.read_bytes() == VICTIM
    assert _names(parent) == [LOCK, "version_1"]


def test_a_dangling_lock_symlink_creates_nothing_outside(tmp_path):
    """A dangling lock link made the claim create its target, a file outside the output parent."""
    parent = tmp_path / "runs"
    parent.mkdir()
    target = tmp_path / "elsewhere" / "created.txt"
    target.parent.mkdir()
    (parent / LOCK).symlink_to(target)
    with pytest.raises(UnsafeOutputError, match=rf"{re.escape(LOCK)}' is a symbolic link"):
        OutputClaim.acquire(parent / "version_0", overwrite=True)
    assert not target.exists() and _names(target.parent) == []


def test_a_hard_linked_lock_file_is_refused_and_its_other_name_untouched(tmp_path):
    victim = _victim(tmp_path)
    parent = tmp_path / "runs"
    parent.mkdir()
    os.link(victim, parent / LOCK)
    with pytest.raises(UnsafeOutputError, match=r"is a file with 2 hard links .*Remove it"):
        OutputClaim.acquire(parent / "version_0")
    assert victim.read_bytes() == VICTIM


@pytest.mark.timeout(60)
def test_a_fifo_as_lock_file_is_refused_without_blocking(tmp_path):
    parent = tmp_path / "runs"
    parent.mkdir()
    os.mkfifo(parent / LOCK)
    with pytest.raises(UnsafeOutputError, match=r"is not a regular file .*Remove it"):
        OutputClaim.acquire(parent / "version_0")


def test_a_leftover_lock_file_is_replaced_never_truncated(tmp_path):
    """A lock file of ours left by a holder that could not remove it is used, but through a new file: the old one is
    never truncated (whoever else has it open sees it unchanged)."""
    parent = tmp_path / "runs"
    parent.mkdir()
    (parent / LOCK).write_bytes(b"4242\n")
    old = os.open(parent / LOCK, os.O_RDONLY)
    try:
        claim = OutputClaim.acquire(parent / "version_0")
        assert os.pread(old, 64, 0) == b"4242\n"  # the file as it was
        assert (parent / LOCK).read_text() == f"{os.getpid()}\n"  # the lock taken on a file of its own
        claim.commit()
    finally:
        os.close(old)
    assert _names(parent) == ["version_0"]


# -------------------------------------------------------------------------------- links in the output folder's place
def test_a_symlink_in_the_output_folders_place_is_refused(tmp_path):
    outside, before = _outside(tmp_path)
    parent = tmp_path / "runs"
    parent.mkdir()
    (parent / "version_0").symlink_to(outside)
    with pytest.raises(UnsafeOutputError, match=r"output folder '.*version_0' is a symbolic link .*Remove the link"):
        OutputClaim.acquire(parent / "version_0", overwrite=True)

    # planted after the claim, before the commit: nothing is committed through it
    claim = OutputClaim.acquire(parent / "version_1")
    _result(claim.staging, 1)
    (parent / "version_1").symlink_to(outside)
    with pytest.raises(UnsafeOutputError, match=r"version_1' became a symbolic link .*nothing was committed"):
        claim.commit()
    assert _contents(outside) == before and _names(outside) == ["keep.txt"]
    assert _names(parent) == ["version_0", "version_1"]  # the two links, no staging folder, no lock


def test_a_planted_previous_name_is_refused_when_the_swap_needs_it(tmp_path, monkeypatch):
    """Where the kernel cannot swap two folders, an earlier result is moved aside to a ``.previous`` name: a link
    planted at that name is never replaced or followed; the earlier result stays whole."""
    monkeypatch.setattr(outputs, "_renameat2_exchange", lambda first, second: False)
    outside, before = _outside(tmp_path)
    folder = tmp_path / "runs" / "version_0"
    with OutputClaim.acquire(folder) as claim:
        old = _result(claim.staging, 1)
    claim = OutputClaim.acquire(folder, overwrite=True)
    _result(claim.staging, 2)
    aside = folder.parent / claim.staging.name.replace(".staging", ".previous")
    aside.symlink_to(outside)
    with pytest.raises(UnsafeOutputError, match=rf"{re.escape(aside.name)}' exists .*nothing was committed"):
        claim.commit()
    assert _contents(folder) == old and OWNER_FILE not in _names(folder)
    assert _contents(outside) == before and aside.is_symlink()


# ------------------------------------------------------------------------- attack 2: planted leftovers, not restored
def test_a_planted_previous_folder_is_not_restored_and_the_next_version_is_taken(tmp_path):
    """A ``.previous`` folder without the library's marker was "restored" into ``version_0``, and the request then
    failed on the folder it had just filled. Now it is left as it is, reported once, and ``version_1`` is taken."""
    parent = tmp_path / "runs"
    planted = parent / f".version_0.{_dead_pid()}.abcd_123.lightning-unlearn.previous"
    planted.mkdir(parents=True)
    (planted / "report.json").write_text('{"planted": true}')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        claim = OutputClaim.acquire_version(parent)
    (message,) = _foreign_warnings(caught)
    assert planted.name in message and "Left as they are" in message
    assert claim.final.name == "version_1"
    claim.commit()
    assert _names(parent) == [planted.name, "version_1"]  # no version_0: nothing was restored
    assert _contents(planted) == {"report.json": b'{"planted": true}'}

    with warnings.catch_warnings(record=True) as caught:  # reported once: the next request is not warned again
        warnings.simplefilter("always")
        assert OutputClaim.acquire_version(parent).final.name == "version_2"
    assert _foreign_warnings(caught) == []


def test_a_planted_previous_symlink_is_never_renamed_into_place(tmp_path):
    outside, before = _outside(tmp_path)
    parent = tmp_path / "runs"
    parent.mkdir()
    planted = parent / f".version_0.{_dead_pid()}.abcd_123.lightning-unlearn.previous"
    planted.symlink_to(outside)
    with pytest.warns(ForeignEntryWarning, match=re.escape(planted.name)):
        claim = OutputClaim.acquire_version(parent)
    assert claim.final.name == "version_1"
    claim.abort()
    assert not os.path.lexists(parent / "version_0") and planted.is_symlink()
    assert _contents(outside) == before


def test_staging_names_without_the_marker_are_left_alone(tmp_path):
    """Entries named like a killed claim's staging folder but not provably the library's (a folder without the
    marker, a link to a folder outside) were deleted; now they are left, with a warning."""
    outside, before = _outside(tmp_path)
    parent = tmp_path / "runs"
    dead = _dead_pid()
    unmarked = parent / f".version_0.{dead}.abcd_123.lightning-unlearn.staging"
    unmarked.mkdir(parents=True)
    (unmarked / "notes.txt").write_bytes(VICTIM)
    link = parent / f".version_0.{dead}.efgh_456.lightning-unlearn.staging"
    link.symlink_to(outside)
    with pytest.warns(ForeignEntryWarning, match=rf"{re.escape(unmarked.name)}/, {re.escape(link.name)} beside"):
        OutputClaim.acquire(parent / "version_0").commit()
    assert _contents(unmarked) == {"notes.txt": VICTIM} and link.is_symlink() and _contents(outside) == before
    assert _names(parent) == sorted([unmarked.name, link.name, "version_0"])


def _commit_killed_between_renames(folder: Path) -> None:
    """Child: replace ``folder`` without the atomic swap, and die (as with ``kill -9``) between the renames."""
    outputs._renameat2_exchange = lambda first, second: False
    rename = os.rename

    def dying_rename(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        if str(source).endswith(".staging") and Path(target) == folder:
            os._exit(9)  # no handler runs: the earlier result is aside, the new one still in staging
        rename(source, target, *args, **kwargs)

    os.rename = dying_rename
    claim = OutputClaim.acquire(folder, overwrite=True)
    _result(claim.staging, 2)
    claim.commit()


def test_the_librarys_own_previous_folder_is_still_restored_and_the_next_version_taken(tmp_path):
    """The counterpart: a replacement really killed between its renames leaves the earlier result aside, marked; the
    next request restores it into ``version_0`` and takes ``version_1`` instead of failing on it."""
    parent = tmp_path / "runs"
    folder = parent / "version_0"
    with OutputClaim.acquire(folder) as claim:
        old = _result(claim.staging, 1)
    child = _CONTEXT.Process(target=_commit_killed_between_renames, args=(folder,), daemon=True)
    child.start()
    child.join(60)
    assert child.exitcode == 9
    assert not folder.exists()
    assert sorted(re.sub(r"\.\d+\.[a-z0-9_]{8}\.", ".*.", n) for n in _names(parent)) == [
        ".version_0.*.lightning-unlearn.previous",  # the earlier result, aside
        ".version_0.*.lightning-unlearn.staging",  # the new one, never put in place
        LOCK,  # unlocked by the kernel as the child died
    ]
    with pytest.warns(InterruptedWriteWarning, match="restored its previous contents"):
        claim = OutputClaim.acquire_version(parent)
    assert claim.final.name == "version_1" and _contents(folder) == old  # no marker left in the restored result
    claim.abort()
    assert _names(parent) == ["version_0"]  # the killed writer's staging folder, marked, removed too


# ------------------------------------------------------------------ attack 4: the folder that held the claim vanished
def test_a_parent_deleted_and_recreated_mid_request_gets_nothing(tmp_path):
    """A request whose run folder was deleted and created anew re-created its staging folder there (``atomic_write``
    made the parents) and committed half a result into the new run. Now nothing re-creates it, and the commit
    refuses."""
    run = tmp_path / "run"
    parent = run / "unlearn" / "firstorder_smallestlayer"
    claim = OutputClaim.acquire_version(parent)
    atomic_write_text(claim.staging / "config.yaml", "written before the deletion\n")
    shutil.rmtree(run)
    parent.mkdir(parents=True)  # a new run of the same name
    with pytest.raises(FolderGoneError, match=r"staging folder '.*\.staging' is gone .*nothing was committed"):
        atomic_write_text(claim.staging / "report.json", "{}")
    with pytest.raises(FolderGoneError, match=r"is gone"):  # a claim inside it (a sweep's layer) neither
        OutputClaim.acquire(claim.staging / "layer")
    with pytest.raises(FileNotFoundError, match=r"firstorder_smallestlayer' holding the claim on .*version_0' was "
                       r"replaced by another folder .*nothing was committed"):  # fmt: skip
        claim.commit()
    assert _names(parent) == []  # no partial result, no staging folder, no lock
    assert claim.done


def test_a_parent_deleted_mid_request_is_not_recreated_by_the_commit(tmp_path):
    parent = tmp_path / "run" / "unlearn"
    claim = OutputClaim.acquire(parent / "version_0")
    _result(claim.staging, 1)
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"unlearn' holding the claim on .* is gone .*nothing was committed"):
        claim.commit()
    assert not (tmp_path / "run").exists()


def test_a_staging_folder_recreated_by_someone_else_is_not_committed(tmp_path):
    """A staging folder deleted and made anew (as a logger's ``makedirs`` would) holds only part of the outputs: it
    is not committed, and, not being the claim's own, not deleted either."""
    parent = tmp_path / "runs"
    claim = OutputClaim.acquire(parent / "version_0")
    _result(claim.staging, 1)
    shutil.rmtree(claim.staging)
    claim.staging.mkdir()
    (claim.staging / "events.out.tfevents.1").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match=r"staging folder '.*' of '.*version_0' was replaced .*nothing was"):
        claim.commit()
    assert not (parent / "version_0").exists()
    assert _contents(claim.staging) == {"events.out.tfevents.1": b"partial"}


# ---------------------------------------------------------------------- attack 3: permission lost mid-request
def _commit_into_a_folder_made_read_only(work: Path) -> dict[str, Any]:
    """Claim ``work/out``, write into its staging folder, make ``work`` read-only, commit; then make it writable
    again and claim once more (the leftovers recovered)."""
    claim = OutputClaim.acquire(work / "out")
    _result(claim.staging, 1)
    os.chmod(work, 0o555)
    try:
        claim.commit()
        error = None
    except BaseException as err:
        error = {"type": type(err).__name__, "message": str(err)}
    finally:
        os.chmod(work, 0o755)
    after_failure = _names(work)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = OutputClaim.acquire(work / "out")
    _result(again.staging, 2)
    again.commit()
    return {
        "error": error,
        "after_failure": after_failure,
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
        "final": _names(work),
        "out": sorted(_contents(work / "out")),
    }


def _in_child(function: Callable[[Path], dict[str, Any]], work: Path, uid: int | None) -> dict[str, Any]:
    """``function(work)`` in a forked child (as user ``uid``, where given), its JSON result sent back through a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            payload = json.dumps(function(work))
        except BaseException as err:
            payload = json.dumps({"child failed": f"{type(err).__name__}: {err}"})
        with os.fdopen(write, "w") as handle:
            handle.write(payload)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as handle:
        payload = handle.read()
    os.waitpid(pid, 0)
    return json.loads(payload)


@pytest.mark.timeout(120)
def test_a_folder_made_read_only_mid_request_says_so(tmp_path):
    """The output parent made read-only while a request ran ended in a traceback blaming the lock file. Now: "the
    output folder X is no longer writable: nothing was committed", and the next request recovers what was left.

    Root ignores file modes, so as root the request runs as an unprivileged user in a folder of the system's
    temporary directory (the pytest folders are not open to other users)."""
    if os.geteuid() != 0:
        work, uid = tmp_path / "work", None
        work.mkdir()
    else:
        base = tempfile.gettempdir()
        if not os.stat(base).st_mode & 0o001:
            pytest.skip(f"{base} cannot be entered by an unprivileged user")
        work, uid = Path(tempfile.mkdtemp(prefix="lightning-unlearn-test-", dir=base)), 65534
        os.chown(work, uid, uid)
    try:
        outcome = _in_child(_commit_into_a_folder_made_read_only, work, uid)
    finally:
        if uid is not None:
            shutil.rmtree(work, ignore_errors=True)
    assert "child failed" not in outcome, outcome
    error = outcome["error"]
    assert error is not None and error["type"] == "PermissionError"
    where = re.escape(str(work))
    assert re.search(rf"The output folder '{where}' is no longer writable \(Permission denied\): nothing was "
                     rf"committed, '{where}/out' is as it was\.$", error["message"]), error  # fmt: skip
    assert "lock" not in error["message"]
    assert "out" not in outcome["after_failure"]  # nothing committed
    # the staging folder (emptied, still marked) and the lock file could not be removed: the next claim recovers them
    assert any("InterruptedWriteWarning" in w and ".staging" in w for w in outcome["warnings"]), outcome["warnings"]
    assert outcome["final"] == ["out"] and outcome["out"] == ["config.yaml", "report.json"]
