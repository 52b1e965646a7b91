"""Small shared helpers: atomic and exclusive file writes (and the temporary files an interrupted one leaves), disk-full
errors in plain words, hashing. Output folders claimed and committed whole: :mod:`lightning_unlearn.outputs`."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

#: Every temporary name this project writes ends with this marker: nothing without it is ever removed.
MARKER = "lightning-unlearn"
RANDOM = r"[a-z0-9_]{8}"  # tempfile's random part: 8 characters of [a-z0-9_]
#: Temporary files of :func:`atomic_write`: ``.<artifact name>.<writer pid>.<8 random>.lightning-unlearn.tmp``.
TEMP_PATTERN = re.compile(rf"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<random>{RANDOM})\.{MARKER}\.tmp$")
#: The staging (and ``.previous``) folders of :class:`~lightning_unlearn.outputs.OutputClaim`: never re-created.
_CLAIM_FOLDER = re.compile(rf"^\..+\.\d+\.{RANDOM}\.{MARKER}\.(?:staging|previous)$")
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class InterruptedWriteWarning(UserWarning):
    """A previous atomic write of an artifact was interrupted (its process was killed): its temporary file is left."""


class FolderGoneError(FileNotFoundError):
    """The staging folder of an output claim that a write goes into is gone (deleted or moved while the request ran):
    it is never re-created, so nothing half-written can be committed into a folder created meanwhile."""


# ----------------------------------------------------------------------------------------------------- disk errors
def disk_full_error(err: BaseException) -> OSError | None:
    """The "no space left on device" (or quota) ``OSError`` behind ``err``, if any: the error itself or one in its
    ``__cause__`` / ``__context__`` chain (``torch.save`` reports a full disk as ``RuntimeError: unexpected pos``,
    Lightning's TensorBoard logger as "you tried to log 78.35 which is currently not supported")."""
    stack, seen = [err], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL:
            return current
        stack += [current.__cause__, current.__context__]
    return None


def disk_full(err: BaseException, where: str | os.PathLike, state: str) -> OSError | None:
    """A plain ``OSError`` for a full disk behind ``err`` (see :func:`disk_full_error`) naming ``where`` and what is
    left (``state``), or None when ``err`` is something else."""
    cause = disk_full_error(err)
    if cause is None:
        return None
    reason = "no space left on the device" if cause.errno == errno.ENOSPC else "the disk quota is exhausted"
    return OSError(cause.errno, f"Could not write {str(where)!r}: {reason}. {state} Free some space and run again.")


# --------------------------------------------------------------------------------------------------- atomic writes
def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], exclusive: bool = False) -> Path:
    """Write a file atomically: ``write`` fills a temporary file in the same directory, which then replaces ``path``.

    A reader (or a crash mid-write) sees either the old file or the complete new one, never a half-written file. A
    process killed mid-write (``kill -9``, power loss) leaves its temporary file
    ``.<name>.<pid>.<random>.lightning-unlearn.tmp`` beside ``path``; the next write of the same artifact removes such
    leftovers of writers that are no longer running, with an :class:`InterruptedWriteWarning` naming them (see
    :func:`clean_stale_temp_files`).

    Args:
        path: The file to write.
        write: Fills the (binary) temporary file.
        exclusive: Create ``path`` only if it does not exist (a hard link of the finished temporary file, which fails
            if anything is there): an existing file is never replaced, even one created by another process while this
            one was writing.

    Raises:
        FileExistsError: With ``exclusive``, if ``path`` exists (nothing is written).
        FolderGoneError: If ``path`` lies in the staging folder of an output claim that is gone (see
            :func:`make_folder`; nothing is written).
        OSError: "no space left on the device" (or quota) in plain words, naming ``path``; the previous version of
            the file is intact.
    """
    path = Path(path)
    make_folder(path.parent)
    clean_stale_temp_files(path.parent, path.name)
    if exclusive and (path.exists() or path.is_symlink()):
        raise FileExistsError(errno.EEXIST, f"{str(path)!r} already exists; it is never replaced without overwrite.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=f".{MARKER}.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            # mkstemp creates 0600 (O_EXCL | O_NOFOLLOW): give the file the permissions open() would, through its
            # descriptor (not through its name, which could be a link by now)
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), 0o666 & ~umask())
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if not hasattr(os, "fchmod"):  # pragma: no cover - Windows before Python 3.13
            os.chmod(tmp, 0o666 & ~umask())
        if exclusive:
            _link_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = disk_full(err, path, "Its previous version (if any) is intact.")
        if full is not None:
            raise full from err
        raise
    return path


def _link_exclusive(tmp: str, path: Path) -> None:
    """Give the complete file ``tmp`` the name ``path`` only if nothing has that name (atomic), then drop ``tmp``."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(
            errno.EEXIST, f"{str(path)!r} was created by another process while this one was writing it; kept as is."
        ) from None
    except OSError:  # no hard links on this filesystem: reserve the name exclusively, then fill it atomically
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def make_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` and its missing parents, except the staging folder of an output claim
    (:class:`~lightning_unlearn.outputs.OutputClaim`, ``.<name>.<pid>.<random>.lightning-unlearn.staging``): one that
    disappeared while its request ran (its run folder deleted, and perhaps created anew) is never re-created, so a
    request cannot write half of its outputs into a folder that is not the one it claimed.

    Folders inside an existing staging folder are created as usual.

    Raises:
        FolderGoneError: If ``folder`` is, or lies in, a staging folder that does not exist.
    """
    folder = Path(folder)
    if folder.is_dir():
        return folder
    for ancestor in (folder, *folder.parents):
        if _CLAIM_FOLDER.match(ancestor.name):
            if not ancestor.is_dir() or ancestor.is_symlink():
                raise FolderGoneError(
                    errno.ENOENT,
                    f"The staging folder {str(ancestor)!r} is gone or replaced (was its folder deleted or moved while "
                    "the request ran?): it is not re-created, and nothing was committed.",
                )
            break
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str, exclusive: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`, also for ``exclusive``)."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")), exclusive=exclusive)


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


def stale_entries(folder: Path, pattern: re.Pattern, name: str | None) -> Iterator[Path]:
    """Entries of ``folder`` named by ``pattern`` (of artifact ``name`` only, if given) whose writer is dead."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        match = pattern.match(entry.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if not _process_running(int(match["pid"])):
            yield entry


def stale_temp_files(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Temporary files in ``folder`` left by interrupted :func:`atomic_write` calls, sorted.

    Only names of exactly the form :data:`TEMP_PATTERN` (``.<artifact>.<pid>.<8 random>.lightning-unlearn.tmp``, what
    :func:`atomic_write` creates) are considered, and of those only the ones whose writer (the pid in the name) is no
    longer running on this machine: a write in progress, in this or another live process, is never listed, and no
    file of another program (without the marker) ever is. Artifacts are written by a single process (global rank
    zero), so a writer on another machine sharing the folder is not expected.

    Args:
        folder: The folder to look in (not recursive); a missing folder has none.
        name: Only temporary files of the artifact with this file name (e.g. ``"report.json"``); default: all.
    """
    entries = stale_entries(Path(folder), TEMP_PATTERN, name)
    return sorted(entry for entry in entries if entry.is_file() and not entry.is_symlink())  # never a link: not ours


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
