"""Local file reads and writes that do not block the event loop and never leave half-written files."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import fcntl
import logging
import os
import posixpath
import random
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from .errors import UnsafeNameError

log = logging.getLogger(__name__)

#: True in a listing made only to count what another listing of the same tree transfers: what
#: that one says of unreadable entries and symbolic link loops is not said twice.
counting_listing: contextvars.ContextVar[bool] = contextvars.ContextVar("counting_listing", default=False)

#: Suffix of files being written; renamed to their final name only when complete and verified.
PARTIAL_SUFFIX = ".dicom-cloud-partial"
#: ``.NAME.XXXXXXXX.dicom-cloud-partial``: the hidden partial file of ``NAME`` (see partial_path).
_PARTIAL_NAME = re.compile(r"\.(?P<final>.+)\.[0-9a-f]{8}" + re.escape(PARTIAL_SUFFIX), re.DOTALL)


async def read_chunks(
    path: Path, chunk_size: int, *, start: int = 0, end: int | None = None
) -> AsyncIterator[bytes]:
    """Yield bytes ``start`` to ``end`` (default: the whole file) in chunks of ``chunk_size``."""
    f = await asyncio.to_thread(open, path, "rb")
    try:
        position = start
        while end is None or position < end:
            want = chunk_size if end is None else min(chunk_size, end - position)
            chunk = await asyncio.to_thread(os.pread, f.fileno(), want, position)
            if not chunk:
                return
            position += len(chunk)
            yield chunk
    finally:
        f.close()


def resolves_within(root: str, path: str) -> bool:
    """Whether the directory holding ``path`` is ``root`` or below it once symbolic links are followed."""
    directory = os.path.dirname(path)  # noqa: PTH120 - strings, not Paths, on this hot path
    if directory.rstrip("/") == root.rstrip("/"):
        return True  # the root itself, whatever it resolves to (two realpath calls per file saved)
    real_root = os.path.realpath(root)
    parent = os.path.realpath(directory)
    return parent == real_root or parent.startswith(real_root.rstrip("/") + "/")


def partial_path(final: Path) -> Path:
    """A unique temporary name beside ``final``, so that a rename into place is atomic."""
    # Not secrets.token_hex: the name needs to be unlikely to be taken, not unguessable (the file is
    # created exclusively, and a name taken is tried again); a system call per file (getrandom, and
    # the wait for the GIL after it in a busy worker thread) was 4% of a study download's samples.
    return final.with_name(f".{final.name}.{_partial_names.getrandbits(32):08x}{PARTIAL_SUFFIX}")


def is_partial_name(name: str) -> bool:
    """Whether a file name is one :func:`partial_path` makes."""
    return _PARTIAL_NAME.fullmatch(name) is not None


def final_name_of(name: str) -> str | None:
    """The name of the file a partial file was to become, or None if ``name`` is no partial file."""
    match = _PARTIAL_NAME.fullmatch(name)
    return match["final"] if match else None


#: Draws partial file names; seeded from the system's randomness, again in each forked child (whose
#: names would otherwise repeat its parent's).
_partial_names = random.Random()
os.register_at_fork(after_in_child=_partial_names.seed)

#: New partial file names tried before giving up (each is lost only to a name already taken or
#: to a concurrent cleanup).
_NAME_TRIES = 8


class PartialFile:
    """A new, empty partial file beside ``final``, locked for as long as this process may write it.

    The lock (``flock``) is what tells a partial file being written from a leftover: the kernel
    drops it when its process dies, even by ``kill -9``, so a partial file nobody holds belongs to
    no running transfer (:func:`remove_if_stale`). Writers open the file again to fill it; the lock
    lives on its own descriptor, held until :meth:`release`, after the rename or the unlink.
    """

    def __init__(self, final: Path, *, private: bool = False) -> None:
        # Created with its final mode: writers open it again, and an open of a file that exists
        # keeps its mode.
        mode = PRIVATE_FILE_MODE if private else 0o666
        for _ in range(_NAME_TRIES):
            path = partial_path(final)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            except FileExistsError:
                continue  # the name is another writer's: another one
            # Another process may have taken the lock between the create and this call, finding the
            # file unlocked: it then removes it. Waiting for the lock and checking the file is still
            # linked tells; a fresh name is taken if it was removed.
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:  # a file system without flock: written unlocked, never taken as stale
                log.debug("%s: no lock on partial files here (%s)", path, exc.strerror)
            if os.fstat(fd).st_nlink:
                break
            os.close(fd)
        else:
            raise FileExistsError(f"{final}: no partial file name could be kept")
        self.path = path
        self._lock_fd = fd

    def fileno(self) -> int:
        """The descriptor that holds the lock, open for writing: the content can go through it
        (no second open of a file this process just created empty)."""
        return self._lock_fd

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def held_by_a_writer(path: Path) -> bool:
    """Whether a running process holds this partial file (see :class:`PartialFile`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # no locks on this file system: nothing tells
    finally:
        os.close(fd)  # also drops the shared lock, if taken
    return False


def remove_if_stale(path: Path) -> bool:
    """Remove a partial file if no running process holds it (see :class:`PartialFile`).

    Symbolic links are neither followed nor removed; on a file system without locks nothing is
    removed (a partial file there cannot be told from one being written). True if it was removed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # gone already, a symbolic link, or not ours to open
    try:
        # Fails with BlockingIOError while a running transfer holds it.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Still the file we locked (not replaced under the same name meanwhile)?
        if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
            return False
        path.unlink()
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


class StalePartials:
    """Partial files of processes that died, removed when their destination is written again.

    Each directory is read once, at the first write into it (a bounded number of directories is
    remembered); after that, a write of ``NAME`` removes the stale partial files of ``NAME`` found
    there. Partial files of other names, and any that a running process holds, are left alone.
    Thread-safe: local writes run in worker threads.
    """

    def __init__(self, directories: int = 256) -> None:
        self._found: collections.OrderedDict[Path, dict[str, list[str]]] = collections.OrderedDict()
        self._directories = directories
        self._lock = threading.Lock()

    def remove_for(self, final: Path, keep: str | None = None) -> int:
        """Remove the stale partial files of ``final`` (but the one named ``keep``: the caller's
        own, held); the number removed."""
        directory = final.parent
        with self._lock:
            found = self._found.get(directory)
            if found is not None:
                self._found.move_to_end(directory)
        if found is None:
            found = _partials_by_final(directory)
            with self._lock:
                found = self._found.setdefault(directory, found)
                while len(self._found) > self._directories:
                    self._found.popitem(last=False)
        with self._lock:
            names = found.pop(final.name, [])
        removed = 0
        for name in names:
            if name != keep and remove_if_stale(directory / name):
                log.info("removed %s, left by an interrupted transfer of %s", directory / name, final)
                removed += 1
        return removed


def _partials_by_final(directory: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            final = final_name_of(entry.name)
            if final is not None and entry.is_file(follow_symlinks=False):
                found.setdefault(final, []).append(entry.name)
    return found


def check_local_name(relative: str) -> None:
    """Refuse object names that could not be written safely under a local directory."""
    if "\x00" in relative:
        raise UnsafeNameError(f"object name contains a NUL byte: {relative!r}")
    if "\\" in relative:
        raise UnsafeNameError(f"object name contains a backslash: {relative!r}")
    if relative.startswith("/") or posixpath.isabs(relative):
        raise UnsafeNameError(f"object name is an absolute path: {relative!r}")
    for segment in relative.split("/"):
        if segment in ("", ".", ".."):
            raise UnsafeNameError(f"object name would leave the destination directory: {relative!r}")


#: Modes of what holds patient data (the archive's objects and index): owner only.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def make_dirs(path: Path, *, private: bool) -> None:
    """Create ``path`` and its missing parents; with ``private`` each one created gets
    :data:`PRIVATE_DIR_MODE` (``Path.mkdir(parents=True)`` would give the parents the default
    mode). Directories that exist keep their mode."""
    if not private:
        path.mkdir(parents=True, exist_ok=True)
        return
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            if not directory.is_dir():
                raise
