"""Output folders claimed before any work, written in a staging folder, and put in place whole.

An unlearning request, a sweep and the demo's requests write into a folder of their own. :class:`OutputClaim` takes
it before any work (a lock beside it, so two processes never write one folder), refuses one that already holds
something (unless ``overwrite``) or that holds anything such an output never writes (a training run), has the
outputs written into a staging folder beside it, and at the end renames the staging folder into place, or swaps it
atomically with an earlier result. A failed request leaves nothing; a killed one leaves the earlier result whole.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from lightning_unlearn.utils import MARKER, RANDOM, InterruptedWriteWarning, stale_entries, umask

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: exclusive lock files without the kernel's automatic release
    fcntl = None  # type: ignore[assignment]

#: Staging folders of :class:`OutputClaim`: ``.<folder name>.<pid>.<8 random>.lightning-unlearn.staging``.
STAGING_PATTERN = re.compile(rf"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<random>{RANDOM})\.{MARKER}\.staging$")
#: The previous contents of a folder being replaced where the kernel cannot swap two folders atomically.
PREVIOUS_PATTERN = re.compile(rf"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<random>{RANDOM})\.{MARKER}\.previous$")
#: Lock files of :class:`OutputClaim`: ``.<folder name>.lightning-unlearn.lock`` beside the folder.
LOCK_SUFFIX = f".{MARKER}.lock"


class OutputBusyError(FileExistsError):
    """Another live process holds the claim on an output folder (it is writing it right now)."""


def safe_folder_name(value: str, what: str) -> str:
    """``value`` if it is a single, plain folder name (letters, digits, ``.``, ``_``, ``-``; not starting with ``.``),
    so that a path built from it stays inside its parent folder.

    Raises:
        ValueError: Naming ``what`` (e.g. ``"--name"``) and the rule.
    """
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", value):
        raise ValueError(
            f"`{what}` must be a single folder name (letters, digits, '.', '_', '-'; no '/', not starting with '.'), "
            f"got {value!r}."
        )
    return value


def launched_as_rank_zero() -> bool:
    """Whether this process is global rank zero as far as the launch environment tells before any process group
    exists (``RANK``; ``LOCAL_RANK`` with ``NODE_RANK``; ``SLURM_PROCID``; ``JSM_NAMESPACE_RANK``); True when none
    is set (a single process, or the parent of spawned ranks)."""
    if (rank := os.environ.get("RANK")) is not None:
        return int(rank) == 0
    if (local := os.environ.get("LOCAL_RANK")) is not None:
        return int(local) == 0 and int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0"))) == 0
    for key in ("SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if (rank := os.environ.get(key)) is not None:
            return int(rank) == 0
    return True


class _Lock:
    """An exclusive lock file ``.<folder>.lightning-unlearn.lock`` beside an output folder: ``flock`` on it, so the
    kernel releases it when its process dies (no stale lock after ``kill -9``); removed again on release."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def try_acquire(cls, path: Path) -> _Lock | None:
        """The lock, or None while another live process holds it."""
        while True:
            if fcntl is None:  # pragma: no cover - exclusive creation; a killed holder leaves it to be removed by hand
                try:
                    return cls(path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666))
                except FileExistsError:
                    return None
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its previous holder removed after we opened it
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return cls(path, fd)
            os.close(fd)

    @staticmethod
    def holder(path: Path) -> str:
        try:
            return f"pid {int(path.read_text().strip())}"
        except (OSError, ValueError):
            return "another process"

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
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


def _exchange(first: Path, second: Path) -> None:
    """Swap two folders atomically (:func:`_renameat2_exchange`); where that is missing, by three renames through a
    ``.previous`` name, which :meth:`OutputClaim.acquire` restores if a kill falls between them."""
    if _renameat2_exchange(first, second):
        return
    previous = Path(
        tempfile.mkdtemp(prefix=f".{second.name}.{os.getpid()}.", suffix=f".{MARKER}.previous", dir=second.parent)
    )
    os.rmdir(previous)  # only its (unique) name is needed
    os.rename(second, previous)
    os.rename(first, second)
    os.rename(previous, first)


def _entries(folder: Path) -> list[str]:
    return sorted(entry.name + ("/" if entry.is_dir() else "") for entry in folder.iterdir())


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class OutputClaim:
    """Exclusive hold on an output folder, whose contents are written in a staging folder beside it and put in place
    whole by :meth:`commit`.

    :meth:`acquire` runs before any work: it takes the folder's lock (``.<folder>.lightning-unlearn.lock`` beside
    it; concurrent claims of the same folder get :class:`OutputBusyError`), refuses a folder that already holds
    something unless ``overwrite`` (and, even then, one that holds anything an output of this kind never holds, such
    as a training run), and creates the staging folder ``.<folder>.<pid>.<random>.lightning-unlearn.staging``.
    :meth:`commit` renames the staging folder to the final name, or, over an earlier result, swaps the two atomically
    and deletes the old one: a kill at any moment leaves the old result or the new one, never a mix. :meth:`abort`
    (also run at exit for claims neither committed nor aborted) deletes the staging folder. Leftovers of killed
    claims are recognised by the marker and a dead pid in their names, and removed (with a warning) the next time the
    same folder is claimed.

    Attributes:
        final: The folder the outputs end up in.
        staging: Where they are written until :meth:`commit`.
    """

    _active: ClassVar[dict[Path, OutputClaim]] = {}

    def __init__(
        self, final: Path, staging: Path, lock: _Lock, overwrite: bool, foreign: Callable[[Path], list[str]]
    ) -> None:
        self.final, self.staging, self._lock = final, staging, lock
        self.overwrite, self._foreign = overwrite, foreign
        self._owner = os.getpid()
        self.done = False
        OutputClaim._active[staging.resolve()] = self

    # ---------------------------------------------------------------------------------------------------- claim
    @classmethod
    def acquire(
        cls,
        folder: str | os.PathLike,
        overwrite: bool = False,
        describe: Callable[[Path], str] | None = None,
        foreign: Callable[[Path], list[str]] | None = None,
        what: str = "output",
    ) -> OutputClaim:
        """Claim ``folder`` (see the class docstring).

        Args:
            folder: The output folder (created on :meth:`commit`; an existing empty folder counts as free).
            overwrite: Allow replacing a folder that already holds something (at :meth:`commit`, whole).
            describe: What an existing folder holds, in words, for the refusal (default: its entries).
            foreign: The entries of an existing folder that no output of this kind holds: such a folder is never
                replaced, even with ``overwrite`` (default: none).
            what: The kind of output, for messages (``"unlearning request"``, ``"sweep"``, ...).

        Raises:
            OutputBusyError: If another live process holds the claim.
            FileExistsError: If the folder holds something and ``overwrite`` is False, holds something foreign, or
                is not a folder.
            PermissionError: If the folder's parent cannot be created or written.
        """
        folder = Path(folder)
        parent = folder.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise type(err)(
                err.errno, f"Cannot create the output folder {str(folder)!r} ({err.strerror}): choose another folder."
            ) from err
        lock_path = parent / f".{folder.name}{LOCK_SUFFIX}"
        try:
            lock = _Lock.try_acquire(lock_path)
        except OSError as err:
            raise type(err)(
                err.errno, f"Cannot claim the output folder {str(folder)!r} ({err.strerror}): choose another folder."
            ) from err
        if lock is None:
            raise OutputBusyError(
                f"The output folder {str(folder)!r} is being written by another {what} ({_Lock.holder(lock_path)}) "
                "right now: wait for it to finish, or choose another folder."
            )
        try:
            _recover(folder)
            cls._check_existing(folder, overwrite, describe, foreign, what)
            staging = Path(
                tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", suffix=f".{MARKER}.staging", dir=parent)
            )
            os.chmod(staging, 0o777 & ~umask())  # mkdtemp creates 0700: the permissions mkdir would give
        except BaseException:
            lock.release()
            raise
        return cls(folder, staging, lock, overwrite, foreign or (lambda _: []))

    @classmethod
    def acquire_version(cls, parent: str | os.PathLike, **kwargs: Any) -> OutputClaim:
        """Claim the next free ``parent/version_<n>`` (one more than the largest existing one, skipping any another
        process holds), as TensorBoard numbers its versions; ``kwargs`` go to :meth:`acquire`."""
        parent = Path(parent)
        found = [re.fullmatch(r"version_(\d+)", p.name) for p in parent.iterdir()] if parent.is_dir() else []
        version = max((int(m[1]) for m in found if m), default=-1) + 1
        while True:
            folder = parent / f"version_{version}"
            if not folder.exists():
                try:
                    return cls.acquire(folder, overwrite=False, **kwargs)
                except OutputBusyError:
                    pass
            version += 1

    @staticmethod
    def _check_existing(
        folder: Path,
        overwrite: bool,
        describe: Callable[[Path], str] | None,
        foreign: Callable[[Path], list[str]] | None,
        what: str,
    ) -> None:
        if not folder.exists() and not folder.is_symlink():
            return
        if folder.is_symlink() or not folder.is_dir():
            raise FileExistsError(f"The output folder {str(folder)!r} exists and is not a folder: choose another one.")
        entries = _entries(folder)
        if not entries:
            return
        if not overwrite:
            holds = describe(folder) if describe is not None else _listing(entries)
            raise FileExistsError(
                f"The output folder {str(folder)!r} already holds {holds}; pass `overwrite=True` (`--overwrite` on "
                "the command line) to replace it, or choose another folder."
            )
        bad = foreign(folder) if foreign is not None else []
        if bad:
            raise FileExistsError(
                f"The output folder {str(folder)!r} holds {_listing(bad)}, which no {what} writes: it is not "
                "replaced, even with overwrite (is it a training run, or results built on this one?). Choose another "
                "folder."
            )

    @classmethod
    def of_staging(cls, path: str | os.PathLike | None) -> OutputClaim | None:
        """The live claim whose staging folder is ``path`` (e.g. a logger's ``log_dir`` set by the command line)."""
        if path is None:
            return None
        claim = cls._active.get(Path(path).resolve())
        return claim if claim is not None and not claim.done else None

    # --------------------------------------------------------------------------------------------------- finish
    def commit(self) -> Path:
        """Put the staging folder's contents in place whole (see the class docstring) and release the claim.

        Raises:
            FileExistsError: If the final folder was filled meanwhile by something that did not take the claim (it is
                left as it is; the staging folder is removed).
        """
        if self.done:
            raise RuntimeError(f"The claim on {str(self.final)!r} is already finished.")
        try:
            if self.final.is_dir() and not self.final.is_symlink() and not any(self.final.iterdir()):
                os.rename(self.staging, self.final)  # replaces an empty folder atomically
            elif self.final.exists() or self.final.is_symlink():
                self._check_existing(self.final, self.overwrite, None, self._foreign, "output")
                _exchange(self.staging, self.final)
                shutil.rmtree(self.staging)  # the previous contents
            else:
                os.rename(self.staging, self.final)
        except BaseException:
            self.abort()
            raise
        self._finish()
        return self.final

    def abort(self) -> None:
        """Delete the staging folder and release the claim; the final folder is left as it was (idempotent)."""
        if self.done:
            return
        shutil.rmtree(self.staging, ignore_errors=True)
        self._finish()

    def _finish(self) -> None:
        self.done = True
        OutputClaim._active.pop(self.staging.resolve(), None)
        self._lock.release()

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None and not self.done:
            self.commit()
        else:
            self.abort()


def _recover(folder: Path) -> None:
    """Before claiming ``folder``: remove the staging folders of killed claims on it, and undo a replacement that a
    kill interrupted between its renames (only where ``renameat2`` is missing). Only names of the exact forms
    :data:`STAGING_PATTERN` / :data:`PREVIOUS_PATTERN` for this folder, whose pid is dead, are touched."""
    parent = folder.parent
    previous = sorted(stale_entries(parent, PREVIOUS_PATTERN, folder.name))
    if previous and not folder.exists():
        os.rename(previous.pop(), folder)
        warnings.warn(
            f"Replacing {str(folder)!r} was interrupted midway: restored its previous contents.",
            InterruptedWriteWarning,
            stacklevel=4,
        )
    leftovers = sorted(stale_entries(parent, STAGING_PATTERN, folder.name)) + previous
    if leftovers:
        state = f"{str(folder)!r} holds the last complete result" if folder.exists() else "no result was committed"
        warnings.warn(
            f"An earlier writer of {str(folder)!r} was interrupted; removing what it left: "
            f"{', '.join(p.name for p in leftovers)} ({state}).",
            InterruptedWriteWarning,
            stacklevel=4,
        )
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)


@atexit.register
def _abort_unfinished_claims() -> None:
    for claim in list(OutputClaim._active.values()):
        if claim._owner == os.getpid():
            claim.abort()
