"""Safe file-system primitives of output claims: nothing is followed through a link, truncated or removed unless
this library provably created it.

* **lock files** (:class:`Lock`): created exclusively and never through a link; an existing one is used only if it is
  a regular file of this user with a single link, and never truncated;
* **ownership markers** (:data:`OWNER_FILE`): written into every staging folder a claim creates (and into an earlier
  result just before it is moved aside); only a leftover folder holding one is ever restored or removed;
* folders opened by descriptor, not by name, so that a folder replaced under a claim is noticed;
* the atomic exchange of two folders (``renameat2(RENAME_EXCHANGE)``) where the kernel has it;
* the staging folder of a claim (created exclusively, marked) and the recovery of what killed claims left
  (:func:`recover`: only marked leftovers are restored or removed).

:mod:`lightning_unlearn.outputs` builds :class:`~lightning_unlearn.outputs.OutputClaim` on these.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import tempfile
import warnings
from pathlib import Path

from lightning_unlearn.utils import MARKER, RANDOM, InterruptedWriteWarning, _process_running, umask

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: exclusive lock files without the kernel's automatic release
    fcntl = None  # type: ignore[assignment]

#: Staging folders of a claim: ``.<folder name>.<pid>.<8 random>.lightning-unlearn.staging``.
STAGING_PATTERN = re.compile(rf"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<random>{RANDOM})\.{MARKER}\.staging$")
#: The previous contents of a folder being replaced where the kernel cannot swap two folders atomically:
#: ``.<folder name>.<pid>.<8 random>.lightning-unlearn.previous``, with the pid and random part of the staging folder.
PREVIOUS_PATTERN = re.compile(rf"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<random>{RANDOM})\.{MARKER}\.previous$")
#: The marker file a claim writes into its staging folder as it creates it (and into an earlier result just before
#: moving that aside): ``lightning-unlearn claim <pid> <random>``, the pid and random part of the folder's name. Only
#: a leftover folder holding it is ever restored or removed; it is never part of a committed result.
OWNER_FILE = f".{MARKER}.claim"

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class UnsafeOutputError(FileExistsError):
    """Something this library did not create sits at a name it uses for an output folder (a symbolic link, a FIFO or
    device, a hard-linked file, another user's file): it is never followed, opened for writing, truncated or removed."""


class ForeignEntryWarning(UserWarning):
    """Entries beside an output folder are named like the leftovers of an interrupted claim, but hold no marker
    proving that this library created them: they are left as they are (reported once per process)."""


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _ours(st: os.stat_result) -> bool:
    """Whether this process's user owns the file (always True where the system has no user ids)."""
    return not hasattr(os, "geteuid") or st.st_uid == os.geteuid()


def _target(path: Path) -> str:
    try:
        return repr(os.readlink(path))
    except OSError:
        return "?"


def _open_folder(path: Path, follow: bool = False) -> int:
    """A descriptor of the folder ``path`` (of the folder itself, never of a link's target, unless ``follow``)."""
    return os.open(path, os.O_RDONLY | _DIRECTORY | _CLOEXEC | (0 if follow else _NOFOLLOW))


def _owner_text(pid: int | str, random: str) -> bytes:
    return f"{MARKER} claim {pid} {random}\n".encode()


def _mark(folder_fd: int, text: bytes) -> None:
    """Write the ownership marker :data:`OWNER_FILE` into the folder open as ``folder_fd`` (exclusively, not through a
    link)."""
    fd = os.open(OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644, dir_fd=folder_fd)
    try:
        os.write(fd, text)
    finally:
        os.close(fd)


def _unmark(folder_fd: int) -> None:
    """Remove the ownership marker from the folder open as ``folder_fd`` (quietly: one left behind is removed by the
    next claim of the folder)."""
    with contextlib.suppress(OSError):
        os.unlink(OWNER_FILE, dir_fd=folder_fd)


def _marker_at(folder_fd: int) -> bytes | None:
    """The ownership marker in the folder open as ``folder_fd``: a regular file of this user with a single link, in a
    folder of this user; None if there is no such file."""
    try:
        if not _ours(os.fstat(folder_fd)):
            return None
        fd = os.open(OWNER_FILE, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC, dir_fd=folder_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        return os.read(fd, 256) if stat.S_ISREG(st.st_mode) and _ours(st) and st.st_nlink == 1 else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _marker(folder: Path) -> bytes | None:
    """The ownership marker in ``folder`` (see :func:`_marker_at`); None for a link, a file or a missing folder."""
    try:
        fd = _open_folder(folder)
    except OSError:
        return None
    try:
        return _marker_at(fd)
    finally:
        os.close(fd)


def _drop_stray_marker(folder: Path) -> None:
    """Remove a marker a commit left in the result it put in place (killed between its rename and the removal)."""
    try:
        fd = _open_folder(folder)
    except OSError:
        return
    try:
        text = _marker_at(fd)
        if text is not None and text.startswith(f"{MARKER} claim ".encode()):
            _unmark(fd)
    finally:
        os.close(fd)


def _remove_owned(folder: Path) -> bool:
    """Delete a folder this library created (its contents first, its marker last, so that a removal interrupted midway
    stays recognisable); False where it could not be removed whole (what is left keeps its marker, for the next
    claim to recover)."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return False
        text = _marker(folder)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name == OWNER_FILE:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / OWNER_FILE)
        try:
            os.rmdir(folder)
        except OSError:
            if text is not None:  # e.g. its folder is no longer writable: keep it recognisable
                with contextlib.suppress(OSError):
                    fd = _open_folder(folder)
                    try:
                        _mark(fd, text)
                    finally:
                        os.close(fd)
            raise
    except OSError:
        return False
    return True


def _warn_once(key: str, message: str, stacklevel: int) -> None:
    """Warn with :class:`ForeignEntryWarning` about ``key`` (a path) once per process."""
    if key in _reported:
        return
    _reported.add(key)
    warnings.warn(message, ForeignEntryWarning, stacklevel=stacklevel + 1)


_reported: set[str] = set()


# ------------------------------------------------------------------------------------------------------- the lock
def _check_lock_file(path: Path, st: os.stat_result) -> None:
    """Refuse a lock file this library cannot have created: it is never opened for writing, truncated or removed.

    Raises:
        UnsafeOutputError: For a symbolic link, anything but a regular file, another user's file, or a file with
            more than one hard link (another name of some other file), naming ``path``.
    """
    if stat.S_ISLNK(st.st_mode):
        kind = f"a symbolic link (to {_target(path)})"
    elif not stat.S_ISREG(st.st_mode):
        kind = "not a regular file (a FIFO, device, socket or folder)"
    elif not _ours(st):
        kind = f"a file of another user (uid {st.st_uid})"
    elif st.st_nlink > 1:
        kind = f"a file with {st.st_nlink} hard links (another name of some other file)"
    else:
        return
    raise UnsafeOutputError(
        f"The lock file {str(path)!r} is {kind}, not a lock file this library created: it is never followed, written "
        "or removed. Remove it (and find out who put it there), then run again."
    )


class _Lock:
    """An exclusive lock file ``.<folder>.lightning-unlearn.lock`` beside an output folder: ``flock`` on it, so the
    kernel releases it when its process dies (no stale lock after ``kill -9``); removed again on release.

    The file is created exclusively and never through a link; an existing one is used only if it is a regular file of
    this user with a single link (see :func:`_check_lock_file`), and never truncated: one left by a holder that could
    not remove it is removed, and a new one created."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def try_acquire(cls, path: Path) -> _Lock | None:
        """The lock, or None while another live process holds it.

        Raises:
            UnsafeOutputError: If ``path`` is not a lock file this library created (see :func:`_check_lock_file`).
        """
        while True:
            created = True
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
            except FileExistsError:  # a lock file, or something else at its name (a dangling link included)
                created = False
                try:
                    _check_lock_file(path, os.lstat(path))  # before it is opened: a FIFO or device is never opened
                    fd = os.open(path, os.O_RDWR | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
                except FileNotFoundError:
                    continue  # removed by its holder meanwhile
                except OSError as err:
                    if err.errno != errno.ELOOP:
                        raise
                    _check_lock_file(path, os.lstat(path))  # replaced by a link meanwhile
                    raise
            keep = False
            try:
                _check_lock_file(path, os.fstat(fd))
                if fcntl is None:  # pragma: no cover - exclusive creation; a killed holder's is removed by hand
                    if not created:
                        return None
                    os.write(fd, f"{os.getpid()}\n".encode())
                    keep = True
                    return cls(path, fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return None
                here = _lstat(path)
                if here is None or _identity(here) != _identity(os.fstat(fd)):
                    continue  # a file its previous holder removed after we opened it
                if not created:  # left by a holder that could not remove it; held by nobody: start afresh
                    os.unlink(path)
                    continue
                os.write(fd, f"{os.getpid()}\n".encode())
                keep = True
                return cls(path, fd)
            finally:
                if not keep:
                    os.close(fd)

    @staticmethod
    def holder(path: Path) -> str:
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
        except OSError:
            return "another process"
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return f"pid {int(os.read(fd, 32).decode().strip())}"
        except (OSError, ValueError):
            pass
        finally:
            os.close(fd)
        return "another process"

    def release(self) -> None:
        """Remove the lock file (where its folder is still writable) and release the lock; never raises."""
        if self.fd < 0:
            return
        try:
            here = _lstat(self.path)
            if here is not None and _identity(here) == _identity(os.fstat(self.fd)):
                os.unlink(self.path)
        except OSError:
            pass  # its folder is no longer writable: the file stays, unlocked, and the next claim replaces it
        finally:
            os.close(self.fd)
            self.fd = -1


def _renameat2_exchange(first: Path, second: Path) -> bool:
    """Swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where the C library, kernel or filesystem
    lacks it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, f"Cannot swap {str(first)!r} and {str(second)!r}: {os.strerror(code)}")


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _token(staging: Path) -> tuple[str, str]:
    """The pid and random part of a staging folder's name (``.<name>.<pid>.<random>.lightning-unlearn.staging``)."""
    stem = staging.name[: -len(f".{MARKER}.staging")]
    return stem[:-9].rsplit(".", 1)[-1], stem[-8:]


def make_staging(folder: Path) -> tuple[Path, int]:
    """Create the staging folder of a claim on ``folder`` (exclusively: ``mkdir`` never follows a link) with the
    permissions ``mkdir`` would give and its ownership marker; returns it and a descriptor of it."""
    suffix = f".{MARKER}.staging"
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", suffix=suffix, dir=folder.parent))
    try:
        fd = _open_folder(staging)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(staging)
        raise
    try:
        os.fchmod(fd, 0o777 & ~umask())  # mkdtemp creates 0700: the permissions mkdir would give
        _mark(fd, _owner_text(*_token(staging)))
    except BaseException:
        _unmark(fd)
        os.close(fd)
        with contextlib.suppress(OSError):
            os.rmdir(staging)
        raise
    return staging, fd


def _claim_entries(folder: Path) -> list[tuple[Path, re.Match]]:
    """Entries beside ``folder`` named like the staging or ``.previous`` folder of a claim on it, sorted."""
    try:
        names = sorted(os.listdir(folder.parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        for pattern in (STAGING_PATTERN, PREVIOUS_PATTERN):
            match = pattern.match(name)
            if match is not None and match["name"] == folder.name:
                found.append((folder.parent / name, match))
    return found


def recover(folder: Path, what: str) -> bool:
    """Before claiming ``folder`` (its lock held): remove the staging folders of killed claims on it, and undo a
    replacement that a kill interrupted between its renames (only where ``renameat2`` is missing).

    Only names of the exact forms :data:`STAGING_PATTERN` / :data:`PREVIOUS_PATTERN` for this folder, whose process is
    gone (or is this one: its live claims of the folder would hold the lock), and that hold the marker
    :data:`OWNER_FILE` naming the same pid and random part, are touched; others are left alone, with one
    :class:`ForeignEntryWarning`. Returns whether entries of those names remain."""
    previous, staging, foreign, live = [], [], [], False
    for path, match in _claim_entries(folder):
        pid = int(match["pid"])
        if pid != os.getpid() and _process_running(pid):
            live = True  # not touched (a claim of another machine on a shared folder?)
        elif _marker(path) == _owner_text(match["pid"], match["random"]):  # checked before any rename
            (previous if match.re is PREVIOUS_PATTERN else staging).append(path)
        else:
            foreign.append(path)
    if previous and not os.path.lexists(folder):
        os.rename(previous.pop(), folder)
        warnings.warn(
            f"Replacing {str(folder)!r} was interrupted midway: restored its previous contents.",
            InterruptedWriteWarning,
            stacklevel=5,
        )
    _drop_stray_marker(folder)
    leftovers = staging + previous
    if leftovers:
        state = f"{str(folder)!r} holds the last complete result" if folder.exists() else "no result was committed"
        warnings.warn(
            f"An earlier writer of {str(folder)!r} was interrupted; removing what it left: "
            f"{', '.join(p.name for p in leftovers)} ({state}).",
            InterruptedWriteWarning,
            stacklevel=5,
        )
        for path in leftovers:
            _remove_owned(path)
    if foreign:
        names = [p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in foreign]
        _warn_once(
            "\0".join(str(p) for p in foreign),
            f"Left as they are: {_listing(names)} beside {str(folder)!r}, named like what an interrupted {what} "
            f"leaves, but without the marker ({OWNER_FILE}) that proves this library created them (planted, or left "
            "by another program). Remove them by hand if they are not needed.",
            stacklevel=4,
        )
    return live or bool(foreign)
