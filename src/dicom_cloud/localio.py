"""Local file reads and writes that do not block the event loop and never leave half-written files."""

from __future__ import annotations

import asyncio
import os
import posixpath
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from .errors import UnsafeNameError

#: Suffix of files being written; renamed to their final name only when complete and verified.
PARTIAL_SUFFIX = ".dicom-cloud-partial"


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
    real_root = os.path.realpath(root)
    parent = os.path.realpath(os.path.dirname(path))  # noqa: PTH120 - strings, not Paths, on this hot path
    return parent == real_root or parent.startswith(real_root.rstrip("/") + "/")


def partial_path(final: Path) -> Path:
    """A unique temporary name beside ``final``, so that a rename into place is atomic."""
    return final.with_name(f".{final.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


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
