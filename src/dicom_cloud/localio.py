"""Local file reads and writes that do not block the event loop and never leave half-written files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

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


def partial_path(final: Path) -> Path:
    """A unique temporary name beside ``final``, so that a rename into place is atomic."""
    return final.with_name(f".{final.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def write_atomic(final: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a temporary file beside ``final`` and rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
