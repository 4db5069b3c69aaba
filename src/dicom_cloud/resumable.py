"""Resumable uploads: a large file's parts survive a crash, and a later run sends only what is missing.

Each provider keeps unfinished uploads on its side in its own way (S3 upload ids and parts, Azure
uncommitted blocks, GCS resumable sessions); a :class:`ResumableUploads` speaks one of them. The
driver :func:`upload_file_resumable` keeps only the *session state* (a small JSON-serialisable
dict, no credentials) in a :class:`StateStore`, and on every start asks the *server* which parts
it already holds, checks them against the local bytes, sends the rest and completes the object
with the whole file's CRC32C in its metadata, as every other upload does.

Format of the session state and the per-provider behaviour: ``docs/resume.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .budget import ByteBudget
from .checksum import crc32c_file
from .errors import (
    CorruptedInTransitError,
    DicomCloudError,
    IntegrityError,
    NotFoundError,
    NotSupportedError,
    UsageError,
)
from .store import CHECKSUM_METADATA_KEY, ObjectInfo, PutOptions

#: Version of the session-state dicts written here; states of another version start over.
STATE_VERSION = 1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartRecord:
    """One part the server holds (or just accepted)."""

    number: int  # 1-based
    size: int
    #: What the server calls the part (S3 ETag, Azure block id); needed to complete.
    etag: str | None = None
    #: Hex MD5 of the part as the server reports it, when it does (S3 ETag, our Azure block ids).
    md5: str | None = None


@dataclass(frozen=True)
class IncompleteUpload:
    """An upload started and never completed nor aborted, as the server lists it."""

    key: str
    upload_id: str
    initiated: datetime | None = None


@runtime_checkable
class ResumableUploads(Protocol):
    """Multipart uploads that can be continued from another process (one per store that can)."""

    #: The provider's rules: smallest part but the last, most parts, parts sent one after another.
    min_part_size: int
    max_parts: int
    sequential: bool

    async def begin(self, key: str, size: int, part_size: int, options: PutOptions) -> dict[str, Any]:
        """Start an upload of ``size`` bytes; the returned state is JSON-serialisable and secret-free
        (except a GCS session URI, a bearer capability: see docs/resume.md)."""
        ...

    async def uploaded_parts(self, state: dict[str, Any]) -> dict[int, PartRecord]:
        """The parts the server holds for this upload. NotFoundError when the upload is gone
        (aborted, completed or expired): the caller then begins a new one."""
        ...

    async def upload_part(self, state: dict[str, Any], number: int, data: bytes | memoryview) -> PartRecord:
        """Send part ``number`` (1-based); the server checks it against its MD5 where it can."""
        ...

    async def complete(self, state: dict[str, Any], parts: list[PartRecord]) -> ObjectInfo:
        """Assemble the parts (in number order) into the object; returns its info with metadata."""
        ...

    async def abort(self, state: dict[str, Any]) -> None:
        """Discard the upload and its parts (a missing upload is not an error)."""
        ...

    def incomplete(self, prefix: str = "") -> AsyncIterator[IncompleteUpload]:
        """Unfinished uploads under ``prefix``; NotSupportedError where the provider cannot list them."""
        ...

    async def abort_incomplete(self, upload: IncompleteUpload) -> None:
        """Discard one upload that ``incomplete`` listed."""
        ...

    async def close(self) -> None:
        """Release connections (the store's ``close`` calls it)."""
        ...


class StateStore(Protocol):
    """Where session states live between runs (the transfer journal implements it)."""

    def load(self, key: str) -> dict[str, Any] | None: ...
    def save(self, key: str, state: dict[str, Any]) -> None: ...
    def clear(self, key: str) -> None: ...


class MemoryStateStore:
    """A StateStore in a dict (tests, and callers that resume within one process)."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}

    def load(self, key: str) -> dict[str, Any] | None:
        return self.states.get(key)

    def save(self, key: str, state: dict[str, Any]) -> None:
        self.states[key] = dict(state)

    def clear(self, key: str) -> None:
        self.states.pop(key, None)


@dataclass(frozen=True)
class ResumableResult:
    info: ObjectInfo
    crc32c: str
    parts_total: int
    #: Parts found on the server and kept (a resumed run), and parts sent by this run.
    parts_reused: int
    parts_sent: int
    #: Parts the server held but that did not match the local bytes (sent again).
    parts_rejected: int
    resumed: bool


def plan_parts(size: int, part_size: int, uploads: ResumableUploads) -> int:
    """Number of parts, after checking the provider's limits."""
    if size <= 0:
        raise UsageError("a resumable upload needs at least one byte", hint="write empty objects with put")
    if part_size < uploads.min_part_size and size > part_size:
        raise UsageError(
            f"part size {part_size} is below this store's minimum of {uploads.min_part_size} bytes"
        )
    count = -(-size // part_size)
    if count > uploads.max_parts:
        raise UsageError(
            f"{count} parts of {part_size} bytes exceed this store's limit of {uploads.max_parts} parts",
            hint="use a larger part size",
        )
    return count


#: Part sizes are rounded up to a multiple of this: GCS's chunk quantum, harmless elsewhere.
PART_QUANTUM = 256 * 1024


def fit_part_size(size: int, requested: int, uploads: ResumableUploads) -> int:
    """The part size to use for ``size`` bytes: ``requested``, raised to the provider's minimum,
    rounded up to :data:`PART_QUANTUM`, and grown until the parts fit the provider's maximum count."""
    part = max(requested, uploads.min_part_size, 1, _ceil_div(size, uploads.max_parts))
    return _ceil_div(part, PART_QUANTUM) * PART_QUANTUM


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def part_range(number: int, size: int, part_size: int) -> tuple[int, int]:
    start = (number - 1) * part_size
    return start, min(start + part_size, size)


def _read_part(path: Path, start: int, end: int) -> bytes:
    with path.open("rb") as f:
        data = os.pread(f.fileno(), end - start, start)
    if len(data) != end - start:
        raise IntegrityError(f"{path} shrank while it was being uploaded")
    return data


def _md5_of_range(path: Path, start: int, end: int) -> str:
    md5 = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        offset = start
        while offset < end:
            chunk = os.pread(f.fileno(), min(8 << 20, end - offset), offset)
            if not chunk:
                raise IntegrityError(f"{path} shrank while it was being uploaded")
            md5.update(chunk)
            offset += len(chunk)
    return md5.hexdigest()


def _source_fingerprint(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


async def upload_file_resumable(
    uploads: ResumableUploads,
    path: Path,
    key: str,
    *,
    part_size: int,
    options: PutOptions = PutOptions(),
    state_store: StateStore,
    budget: ByteBudget,
    on_progress: Callable[[int], None] | None = None,
    concurrency: int = 8,
) -> ResumableResult:
    """Upload ``path`` to ``key``, continuing the upload recorded in ``state_store`` if there is one.

    On start: the saved state is reused only if it describes this file (same size, modification
    time, CRC32C and part size); the server is asked which parts it holds; each is checked
    (size, and MD5 where the server reports one) and the missing or mismatching ones are sent,
    in parallel within ``budget`` (one after another where the provider needs it). A session the
    server no longer knows (aborted, expired) is replaced by a new one. ``on_progress`` gets the
    bytes of each part sent or found. The state is cleared once the object is complete.
    ``options.if_absent`` is not honoured here: the caller checks the destination first.
    """
    fingerprint = await asyncio.to_thread(_source_fingerprint, path)
    size = fingerprint["size"]
    count = plan_parts(size, part_size, uploads)
    crc = await asyncio.to_thread(crc32c_file, path)
    options = replace(options, metadata={**options.metadata, CHECKSUM_METADATA_KEY: crc})

    state = state_store.load(key)
    held: dict[int, PartRecord] = {}
    resumed = False
    if state is not None and not _describes(state, fingerprint, crc, part_size, key):
        await abandon(uploads, state, key)
        state_store.clear(key)
        state = None
    if state is not None:
        try:
            held = await uploads.uploaded_parts(state)
            resumed = True
        except NotFoundError:
            state_store.clear(key)
            state = None
    if state is None:
        # Recorded before the upload exists: a process killed between the two leaves a marker,
        # and the next attempt removes what it began (abandon).
        state_store.save(key, begin_marker(key))
        state = await uploads.begin(key, size, part_size, options)
        state.update(v=STATE_VERSION, source=fingerprint, crc32c=crc, part_size=part_size, key=key)
        state_store.save(key, state)

    kept: dict[int, PartRecord] = {}
    rejected = 0
    for number, record in sorted(held.items()):
        if not 1 <= number <= count:
            continue
        start, end = part_range(number, size, part_size)
        if record.size != end - start:
            rejected += 1
            continue
        if record.md5 is not None and record.md5 != await asyncio.to_thread(_md5_of_range, path, start, end):
            rejected += 1
            continue
        kept[number] = record
        if on_progress:
            on_progress(record.size)
    if uploads.sequential:
        # Sessions that take bytes in order (GCS) continue after the last contiguous part held.
        contiguous = 0
        while contiguous + 1 in kept:
            contiguous += 1
        kept = {n: r for n, r in kept.items() if n <= contiguous}
    missing = [n for n in range(1, count + 1) if n not in kept]

    sent: dict[int, PartRecord] = {}

    async def send(number: int) -> None:
        start, end = part_range(number, size, part_size)
        async with budget.reserve(end - start):
            data = await asyncio.to_thread(_read_part, path, start, end)
            sent[number] = await uploads.upload_part(state, number, data)
        if on_progress:
            on_progress(end - start)

    if uploads.sequential:
        for number in missing:
            await send(number)
    else:
        gate = asyncio.Semaphore(max(1, concurrency))

        async def bounded(number: int) -> None:
            async with gate:
                await send(number)

        try:
            async with asyncio.TaskGroup() as group:
                for number in missing:
                    group.create_task(bounded(number))
        except BaseExceptionGroup as group_error:
            # Callers map one typed error to an exit code or a retry: give them the first one.
            raise _first_error(group_error) from None

    # The file must not have changed while it was read: parts sent and parts kept would mix.
    if await asyncio.to_thread(_source_fingerprint, path) != fingerprint:
        raise IntegrityError(f"{path} changed during the upload; run it again")
    parts = [({**kept, **sent})[n] for n in range(1, count + 1)]
    try:
        info = await uploads.complete(state, parts)
    except CorruptedInTransitError:
        state_store.clear(key)  # the server's object was removed: nothing is left to continue
        raise
    state_store.clear(key)
    if info.size != size:
        raise IntegrityError(f"{key}: the completed object has {info.size} bytes, the file {size}")
    return ResumableResult(
        info=info,
        crc32c=crc,
        parts_total=count,
        parts_reused=len(kept),
        parts_sent=len(sent),
        parts_rejected=rejected,
        resumed=resumed,
    )


def _describes(
    state: Mapping[str, Any], fingerprint: dict[str, int], crc: str, part_size: int, key: str
) -> bool:
    return (
        state.get("v") == STATE_VERSION
        and state.get("source") == fingerprint
        and state.get("crc32c") == crc
        and state.get("part_size") == part_size
        and state.get("key") == key
    )


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first failure of a group (a typed error if there is one); cancellations come last."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending[:0] = list(error.exceptions)
        else:
            leaves.append(error)
    typed = [e for e in leaves if isinstance(e, DicomCloudError)]
    return (typed or leaves)[0]


def begin_marker(key: str) -> dict[str, Any]:
    """The state saved for ``key`` before a multipart upload to it begins, where the upload's own
    session is not (yet) recorded: a streamed upload, or the moment before ``begin`` answers."""
    return {"v": STATE_VERSION, "key": key, "begun": True}


@contextlib.asynccontextmanager
async def streamed_upload(uploads: ResumableUploads, sessions: StateStore, key: str) -> AsyncIterator[None]:
    """Around a multipart upload to ``key`` that cannot be continued (a stream): the unfinished
    upload of an earlier attempt that left its marker is aborted first, this one's marker is kept
    while it runs, and cleared when it completes, or when it fails and its own upload is aborted.
    An interruption (cancellation) leaves the marker for the next attempt."""
    earlier = sessions.load(key)
    if earlier is not None:
        await abandon(uploads, earlier, key)
    sessions.save(key, begin_marker(key))
    try:
        yield
    except Exception:
        await abandon(uploads, begin_marker(key), key)
        sessions.clear(key)
        raise
    sessions.clear(key)


async def abandon(uploads: ResumableUploads, state: Mapping[str, Any], key: str) -> int:
    """Discard the upload an earlier attempt at ``key`` recorded in ``state``; the number aborted.

    A recorded session is aborted by its id. A :func:`begin_marker` names no session: the
    unfinished uploads the server lists at exactly ``key`` are aborted (the attempt that saved the
    marker died with its upload in flight: a killed worker, process or machine). Failures are
    logged and left to ``dicom-cloud cleanup``: they never fail the new attempt."""
    if not state.get("begun"):
        with contextlib.suppress(Exception):  # an orphan is listed and removed by `dicom-cloud cleanup`
            await uploads.abort(dict(state))
            return 1
        return 0
    aborted = 0
    try:
        async for upload in uploads.incomplete(key):
            if upload.key == key:
                await uploads.abort_incomplete(upload)
                aborted += 1
    except NotSupportedError:
        pass  # GCS: our client cannot list them (docs/resume.md, "Markers")
    except Exception as exc:  # never fails the attempt it precedes (or hides the error it follows)
        log.warning(
            "%s: an earlier attempt's unfinished upload could not be removed (%s)", key, type(exc).__name__
        )
    if aborted:
        log.info("%s: removed %d unfinished upload(s) of an earlier attempt", key, aborted)
    return aborted
