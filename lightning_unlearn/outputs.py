"""Output folders claimed before any work, written in a staging folder, and put in place whole.

An unlearning request, a sweep and the demo's requests write into a folder of their own. :class:`OutputClaim` takes
it before any work (a lock beside it, so two processes never write one folder), refuses one that already holds
something (unless ``overwrite``) or that holds anything such an output never writes (a training run), has the
outputs written into a staging folder beside it, and at the end renames the staging folder into place, or swaps it
atomically with an earlier result. A failed request leaves nothing; a killed one leaves the earlier result whole.

Nothing escapes the output folder's parent. The lock file, the staging folder and the ``.previous`` folder are
created exclusively (``O_EXCL``) and never through a link (``O_NOFOLLOW``); a symbolic link, FIFO, device, hard-linked
or another user's file found at one of these names, or a link in the output folder's own place, is refused with an
error naming it (:class:`UnsafeOutputError`), never followed, truncated or removed. Leftovers of killed claims are
recovered only where the marker file inside them (:data:`OWNER_FILE`) proves them this library's own; anything else
is left alone with a warning (:class:`ForeignEntryWarning`). A claim whose folder disappeared or was replaced while its
request ran commits nothing, and a folder that is no longer writable is reported as such.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from lightning_unlearn.folder_safety import (
    OWNER_FILE,
    ForeignEntryWarning,
    UnsafeOutputError,
    _identity,
    _listing,
    _Lock,
    _lstat,
    _mark,
    _open_folder,
    _owner_text,
    _remove_owned,
    _renameat2_exchange,
    _stat,
    _target,
    _token,
    _unmark,
    _warn_once,
    make_staging,
    recover,
)
from lightning_unlearn.utils import (
    MARKER,
    FolderGoneError,
    make_folder,
)

__all__ = [
    "OWNER_FILE",
    "ForeignEntryWarning",
    "OutputBusyError",
    "OutputClaim",
    "UnsafeOutputError",
    "launched_as_rank_zero",
    "safe_folder_name",
]

#: Lock files of :class:`OutputClaim`: ``.<folder name>.lightning-unlearn.lock`` beside the folder.
LOCK_SUFFIX = f".{MARKER}.lock"
#: What a rename in a folder that is no longer writable fails with (a read-only mount included).
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


class OutputBusyError(FileExistsError):
    """Another live process holds the claim on an output folder (it is writing it right now)."""


class _TakenError(Exception):
    """A version's name is taken (by a folder, or by leftovers that are not provably this library's)."""


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


def _entries(folder: Path) -> list[str]:
    return sorted(entry.name + ("/" if entry.is_dir() else "") for entry in folder.iterdir())


class OutputClaim:
    """Exclusive hold on an output folder, whose contents are written in a staging folder beside it and put in place
    whole by :meth:`commit`.

    :meth:`acquire` runs before any work: it takes the folder's lock (``.<folder>.lightning-unlearn.lock`` beside
    it; concurrent claims of the same folder get :class:`OutputBusyError`), refuses a folder that already holds
    something unless ``overwrite`` (and, even then, one that holds anything an output of this kind never holds, such
    as a training run), and creates the staging folder ``.<folder>.<pid>.<random>.lightning-unlearn.staging`` with
    its ownership marker (:data:`OWNER_FILE`). :meth:`commit` renames the staging folder to the final name, or, over
    an earlier result, swaps the two atomically and deletes the old one: a kill at any moment leaves the old result
    or the new one, never a mix. :meth:`abort` (also run at exit for claims neither committed nor aborted) deletes
    the staging folder. Leftovers of killed claims are recognised by their names, a dead pid and their marker, and
    removed (with a warning) the next time the same folder is claimed; what is named like one but holds no marker is
    left alone (:class:`ForeignEntryWarning`).

    The claim keeps the folder that holds it (the output folder's parent) and the staging folder open: if either is
    deleted, moved or replaced while the request runs, :meth:`commit` commits nothing (and
    :func:`~lightning_unlearn.utils.atomic_write` never re-creates a staging folder that is gone).

    Attributes:
        final: The folder the outputs end up in.
        staging: Where they are written until :meth:`commit`.
    """

    _active: ClassVar[dict[Path, OutputClaim]] = {}

    def __init__(
        self,
        final: Path,
        staging: Path,
        lock: _Lock,
        overwrite: bool,
        foreign: Callable[[Path], list[str]],
        what: str = "output",
        parent_fd: int | None = None,
        staging_fd: int | None = None,
    ) -> None:
        self.final, self.staging, self._lock = final, staging, lock
        self.overwrite, self._foreign, self.what = overwrite, foreign, what
        # held open until the claim ends: their identities cannot be taken by a folder created meanwhile
        self._parent_fd = parent_fd if parent_fd is not None else _open_folder(final.parent, follow=True)
        self._staging_fd = staging_fd if staging_fd is not None else _open_folder(staging)
        self._owner = os.getpid()
        self.done = False
        self._key = staging.resolve()
        OutputClaim._active[self._key] = self

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
            UnsafeOutputError: If the folder is a symbolic link, or its lock file is not one this library created (a
                link, FIFO, device, hard-linked or another user's file), naming it.
            FileExistsError: If the folder holds something and ``overwrite`` is False, holds something foreign, or
                is not a folder.
            FolderGoneError: If the folder lies in a staging folder that is gone (a claim inside another's).
            PermissionError: If the folder's parent cannot be created or written.
        """
        return cls._claim(Path(folder), overwrite, describe, foreign, what)

    @classmethod
    def _claim(
        cls,
        folder: Path,
        overwrite: bool = False,
        describe: Callable[[Path], str] | None = None,
        foreign: Callable[[Path], list[str]] | None = None,
        what: str = "output",
        next_free: bool = False,
    ) -> OutputClaim:
        """:meth:`acquire`; with ``next_free``, :class:`_TakenError` where ``folder`` exists or leftovers beside it that
        are not provably this library's remain (for :meth:`acquire_version`)."""
        parent = folder.parent
        try:
            make_folder(parent)
        except FolderGoneError:
            raise
        except OSError as err:
            raise type(err)(
                err.errno, f"Cannot create the output folder {str(folder)!r} ({err.strerror}): choose another folder."
            ) from err
        lock_path = parent / f".{folder.name}{LOCK_SUFFIX}"
        try:
            lock = _Lock.try_acquire(lock_path)
        except UnsafeOutputError:
            raise
        except OSError as err:
            raise type(err)(
                err.errno, f"Cannot claim the output folder {str(folder)!r} ({err.strerror}): choose another folder."
            ) from err
        if lock is None:
            raise OutputBusyError(
                f"The output folder {str(folder)!r} is being written by another {what} ({_Lock.holder(lock_path)}) "
                "right now: wait for it to finish, or choose another folder."
            )
        parent_fd = staging_fd = -1
        try:
            parent_fd = _open_folder(parent, follow=True)
            taken = recover(folder, what)
            if next_free and (taken or os.path.lexists(folder)):
                raise _TakenError(folder)
            cls._check_existing(folder, overwrite, describe, foreign, what)
            staging, staging_fd = make_staging(folder)
            return cls(folder, staging, lock, overwrite, foreign or (lambda _: []), what, parent_fd, staging_fd)
        except BaseException:
            for fd in (parent_fd, staging_fd):
                if fd >= 0:
                    os.close(fd)
            lock.release()
            raise

    @classmethod
    def acquire_version(cls, parent: str | os.PathLike, **kwargs: Any) -> OutputClaim:
        """Claim the next free ``parent/version_<n>`` (one more than the largest existing one), as TensorBoard numbers
        its versions; ``kwargs`` go to :meth:`acquire`.

        A version is skipped while another process holds it, and where its name is taken by anything: a file, folder
        or link of that name, or, beside it, a lock file or a folder named like a claim's leftovers that this library
        cannot prove its own (left as they are, with one warning)."""
        parent = Path(parent)
        found = [re.fullmatch(r"version_(\d+)", p.name) for p in parent.iterdir()] if parent.is_dir() else []
        version = max((int(m[1]) for m in found if m), default=-1) + 1
        while True:
            folder = parent / f"version_{version}"
            if not os.path.lexists(folder):
                try:
                    return cls._claim(folder, overwrite=False, next_free=True, **kwargs)
                except (OutputBusyError, _TakenError):
                    pass
                except UnsafeOutputError as err:
                    _warn_once(str(folder), f"{err} Until then {folder.name} is skipped.", stacklevel=2)
            version += 1

    @staticmethod
    def _check_existing(
        folder: Path,
        overwrite: bool,
        describe: Callable[[Path], str] | None,
        foreign: Callable[[Path], list[str]] | None,
        what: str,
    ) -> None:
        st = _lstat(folder)
        if st is None:
            return
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeOutputError(
                f"The output folder {str(folder)!r} is a symbolic link (to {_target(folder)}): an output is never "
                "written through a link in its folder's place. Remove the link, or choose another folder."
            )
        if not stat.S_ISDIR(st.st_mode):
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
            UnsafeOutputError: If a link was put in the final folder's place meanwhile (it is left as it is).
            FileNotFoundError: If the folder that held the claim, or the staging folder, is gone or was replaced
                while the request ran: nothing is committed.
            PermissionError: If the output folder is no longer writable: nothing is committed.
        """
        if self.done:
            raise RuntimeError(f"The claim on {str(self.final)!r} is already finished.")
        try:
            self._check_in_place()
            aside = self._put_in_place()
        except BaseException:
            self.abort()
            raise
        if aside is not None:  # the previous contents, marked as ours before they were moved aside
            _remove_owned(aside)  # where it cannot be removed whole, the next claim removes what is left
        self._finish()
        return self.final

    def _check_in_place(self) -> None:
        """Refuse to commit where the folder that held the claim, or the staging folder, is no longer the one the
        claim created (deleted, moved, or replaced by one created meanwhile)."""
        folders = (
            (self._parent_fd, _stat(self.final.parent), f"The folder {str(self.final.parent)!r} holding the claim on"),
            (self._staging_fd, _lstat(self.staging), f"The staging folder {str(self.staging)!r} of"),
        )
        for fd, now, what in folders:
            held = os.fstat(fd)
            if held.st_nlink == 0 or now is None or _identity(now) != _identity(held):
                state = "is gone" if now is None else "was replaced by another folder"
                raise FileNotFoundError(
                    errno.ENOENT,
                    f"{what} {str(self.final)!r} {state} while the {self.what} ran (deleted or moved?): nothing was "
                    "committed.",
                )

    def _not_writable(self, err: OSError) -> OSError:
        if err.errno not in _NOT_WRITABLE:
            return err
        return PermissionError(
            err.errno,
            f"The output folder {str(self.final.parent)!r} is no longer writable ({err.strerror}): nothing was "
            f"committed, {str(self.final)!r} is as it was.",
        )

    def _rename(self, source: Path, target: Path) -> None:
        try:
            os.rename(source, target)
        except OSError as err:
            raise self._not_writable(err) from err

    def _put_in_place(self) -> Path | None:
        """Rename the staging folder to the final name, or swap it with an earlier result; the folder now holding the
        earlier result, to delete, or None. Raises before anything changed (or after undoing it)."""
        final = self.final
        st = _lstat(final)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise UnsafeOutputError(
                f"The output folder {str(final)!r} became a symbolic link (to {_target(final)}) while the {self.what} "
                "ran: it is never followed or replaced. Remove the link; nothing was committed."
            )
        if st is None or (stat.S_ISDIR(st.st_mode) and not _entries(final)):
            self._rename(self.staging, final)  # replaces an empty folder atomically
            _unmark(self._staging_fd)  # now the result's
            return None
        self._check_existing(final, self.overwrite, None, self._foreign, self.what)
        pid, random = _token(self.staging)
        try:
            old = _open_folder(final)
        except OSError:
            old = -1
        marked = False
        if old >= 0:  # the marker proves the earlier result ours once it is aside (at the staging or .previous name)
            with contextlib.suppress(OSError):  # an earlier result this user cannot write into is replaced all the same
                _mark(old, _owner_text(pid, random))
                marked = True
        try:
            try:
                swapped = _renameat2_exchange(self.staging, final)
            except OSError as err:
                raise self._not_writable(err) from err
            if swapped:
                aside = self.staging
            else:
                aside = final.parent / f".{final.name}.{pid}.{random}.{MARKER}.previous"
                self._swap_through(aside)
        except BaseException:
            if marked:
                _unmark(old)
            raise
        finally:
            if old >= 0:
                os.close(old)
        _unmark(self._staging_fd)  # now the result's
        return aside

    def _swap_through(self, aside: Path) -> None:
        """Replace the final folder by the staging folder where the kernel cannot swap them: three renames through
        ``aside``, which :meth:`acquire` undoes if a kill falls between them."""
        final = self.final
        if os.path.lexists(aside):
            raise UnsafeOutputError(
                f"{str(aside)!r} exists (planted?): an earlier result is moved aside only to a new name, never over "
                "something else. Remove it; nothing was committed."
            )
        # a rename never follows a link at its target, and replaces nothing but an empty folder
        self._rename(final, aside)
        try:
            self._rename(self.staging, final)
        except BaseException:
            os.rename(aside, final)  # the earlier result back in its place
            raise

    def abort(self) -> None:
        """Delete the staging folder and release the claim; the final folder is left as it was (idempotent, never
        raises for the file system: a staging folder that cannot be removed is left, marked, for the next claim)."""
        if self.done:
            return
        here = _lstat(self.staging)
        if here is not None and stat.S_ISDIR(here.st_mode) and _identity(here) == _identity(os.fstat(self._staging_fd)):
            _remove_owned(self.staging)  # only the folder this claim created, never one created meanwhile
        self._finish()

    def _finish(self) -> None:
        self.done = True
        OutputClaim._active.pop(self._key, None)
        self._lock.release()
        for fd in (self._parent_fd, self._staging_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._parent_fd = self._staging_fd = -1

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None and not self.done:
            self.commit()
        else:
            self.abort()


@atexit.register
def _abort_unfinished_claims() -> None:
    for claim in list(OutputClaim._active.values()):
        if claim._owner == os.getpid():
            claim.abort()
