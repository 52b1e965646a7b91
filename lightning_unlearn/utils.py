"""Small shared helpers: atomic file writes (and the temporary files an interrupted one leaves), hashing."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

#: Temporary files of :func:`atomic_write`: ``.<artifact name>.<writer pid>.<random>.tmp`` next to the artifact.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<random>[A-Za-z0-9_]+)\.tmp$")
#: The same without the writer's pid (written by versions before the pid was part of the name).
_LEGACY_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<random>[A-Za-z0-9_]{8})\.tmp$")


class InterruptedWriteWarning(UserWarning):
    """A previous atomic write of an artifact was interrupted (its process was killed): its temporary file is left."""


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write a file atomically: ``write`` fills a temporary file in the same directory, which then replaces ``path``.

    A reader (or a crash mid-write) sees either the old file or the complete new one, never a half-written file. A
    process killed mid-write (``kill -9``, power loss) leaves its temporary file ``.<name>.<pid>.<random>.tmp``
    beside ``path``; the next write of the same artifact removes such leftovers of writers that are no longer running,
    with an :class:`InterruptedWriteWarning` naming them (see :func:`clean_stale_temp_files`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600: give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def _process_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (conservatively True where that cannot be told)."""
    if pid == os.getpid() or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a pid this system cannot have: leave the file alone)
    return True


def stale_temp_files(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Temporary files in ``folder`` left by interrupted :func:`atomic_write` calls, sorted.

    A temporary file is stale when the process that was writing it is no longer running on this machine (its pid is
    part of the name; files of the older name format, without a pid, always count as stale). Temporary files of a
    write still in progress, in this or another live process, are not listed. Artifacts are written by a single
    process (global rank zero), so a writer on another machine sharing the folder is not expected.

    Args:
        folder: The folder to look in (not recursive); a missing folder has none.
        name: Only temporary files of the artifact with this file name (e.g. ``"report.json"``); default: all.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".tmp") or not entry.name.startswith("."):
            continue
        match = _TEMP_NAME.match(entry.name)
        if match is not None:
            artifact, running = match["name"], _process_running(int(match["pid"]))
        else:
            legacy = _LEGACY_TEMP_NAME.match(entry.name)
            if legacy is None:
                continue
            artifact, running = legacy["name"], False
        if (name is None or artifact == name) and not running and entry.is_file():
            stale.append(entry)
    return sorted(stale)


def clean_stale_temp_files(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the :func:`stale_temp_files` of ``folder`` (of artifact ``name`` only, if given), warning first.

    The :class:`InterruptedWriteWarning` names each file and says that the artifact itself is the last complete
    version (or absent, if the interrupted write was its first). Returns the files removed.
    """
    stale = stale_temp_files(folder, name)
    if not stale:
        return []
    folder = Path(folder)
    if name is None:
        state = "Each artifact holds its last complete version (if it was ever written completely)."
    elif (folder / name).is_file():
        state = f"{str(folder / name)!r} is intact: the last complete version."
    else:
        state = f"{str(folder / name)!r} does not exist: it was never written completely."
    warnings.warn(
        f"A previous write of {name or 'artifacts'!r} in {str(folder)!r} was interrupted (its process stopped "
        f"mid-write); removing the temporary file(s) it left: {', '.join(p.name for p in stale)}. {state}",
        InterruptedWriteWarning,
        stacklevel=3,
    )
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
