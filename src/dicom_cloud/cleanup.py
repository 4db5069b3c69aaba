"""Finding and removing what interrupted uploads and downloads leave behind.

- S3: multipart uploads never completed nor aborted (their parts are billed until aborted).
- Azure: blobs holding only uncommitted blocks (Azure drops those itself after seven days).
- Local directories: partial files of interrupted downloads (``.NAME.XXXXXXXX.dicom-cloud-partial``).
- GCS: unfinished resumable sessions cannot be listed; GCS drops them after one week.

Only leftovers older than ``older_than`` are taken, so that uploads in progress (ours or anyone
else's) are left alone. The rules and their limits: ``docs/resume.md``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from .backends import StoreConfig
from .errors import NotSupportedError, UsageError
from .localio import held_by_a_writer, is_partial_name
from .location import Location, LocationOpener
from .resumable import IncompleteUpload, ResumableUploads

OrphanKind = Literal["multipart-upload", "uncommitted-blocks", "partial-file"]


@dataclass(frozen=True)
class Orphan:
    """One leftover: where it is, what it is, since when."""

    url: str
    key: str
    kind: OrphanKind
    initiated: datetime | None
    #: S3 upload id (empty for the other kinds).
    upload_id: str = ""
    #: Bytes held, when known without another request (partial files).
    size: int | None = None


@dataclass(frozen=True)
class CleanupSummary:
    found: int
    removed: int
    #: Leftovers younger than the threshold: left alone.
    too_recent: int
    dry_run: bool


async def cleanup_async(
    url: str,
    *,
    older_than: timedelta = timedelta(days=1),
    dry_run: bool = False,
    config: StoreConfig | None = None,
    on_orphan: Callable[[Orphan], None] | None = None,
    now: datetime | None = None,
) -> CleanupSummary:
    """Remove (or with ``dry_run`` only report) the leftovers under ``url`` older than ``older_than``.

    ``on_orphan`` is called for each one taken, before it is removed. NotSupportedError where
    the provider cannot list its leftovers (GCS) or our credentials cannot (S3 identities only
    obstore resolves, Azure without an account key).
    """
    if older_than < timedelta(0):
        raise UsageError("--older-than must not be negative")
    cutoff = (now or datetime.now(UTC)) - older_than
    opener = LocationOpener(config)
    try:
        location = opener.open(url)
        found = removed = too_recent = 0
        async for orphan, remove in _leftovers(location):
            if orphan.initiated is not None and orphan.initiated > cutoff:
                too_recent += 1
                continue
            found += 1
            if on_orphan:
                on_orphan(orphan)
            if not dry_run:
                await remove()
                removed += 1
        return CleanupSummary(found=found, removed=removed, too_recent=too_recent, dry_run=dry_run)
    finally:
        await opener.close()


#: Removes one leftover when awaited.
Remover = Callable[[], Awaitable[None]]


async def _leftovers(
    location: Location,
) -> AsyncIterator[tuple[Orphan, Remover]]:
    if location.is_local:
        async for item in _partial_files(location):
            yield item
        return
    if location.url.scheme == "memory":
        return  # in-process stores hold no unfinished uploads
    uploads = location.store.resumable_uploads()
    if uploads is None:
        raise NotSupportedError(
            f"{location.display()}: unfinished uploads cannot be listed with these credentials",
            hint="S3 needs access keys (environment or profile), Azure an account key; see docs/resume.md",
        )
    kind: OrphanKind = "uncommitted-blocks" if location.url.scheme == "azure" else "multipart-upload"
    # A prefix names what starts with it; "dir/" or "" for a whole tree.
    async for upload in uploads.incomplete(location.key):
        orphan = Orphan(
            url=location.display(upload.key),
            key=upload.key,
            kind=kind,
            initiated=upload.initiated,
            upload_id=upload.upload_id,
        )
        yield orphan, _aborter(uploads, upload)


def _aborter(uploads: ResumableUploads, upload: IncompleteUpload) -> Remover:
    async def abort() -> None:
        await uploads.abort_incomplete(upload)

    return abort


async def _partial_files(location: Location) -> AsyncIterator[tuple[Orphan, Remover]]:
    root = Path("/" + location.key)
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory", hint="give the directory downloads went into")
    found = await asyncio.to_thread(_walk_partials, root)
    for path, size, mtime in found:
        orphan = Orphan(
            url=str(path),
            key=str(path).lstrip("/"),
            kind="partial-file",
            initiated=datetime.fromtimestamp(mtime, UTC),
            size=size,
        )
        yield orphan, _unlinker(path)


def _walk_partials(root: Path) -> list[tuple[Path, int, float]]:
    """Partial files under ``root``, by name; symbolic links are neither followed nor taken, nor
    are partial files that a running transfer holds (they are being written, whatever their age)."""
    found: list[tuple[Path, int, float]] = []
    for directory, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            if not is_partial_name(name):
                continue
            path = Path(directory) / name
            st = path.lstat()
            if path.is_symlink() or held_by_a_writer(path):
                continue
            found.append((path, st.st_size, st.st_mtime))
    return found


def _unlinker(path: Path) -> Remover:
    async def unlink() -> None:
        await asyncio.to_thread(path.unlink, missing_ok=True)

    return unlink
