"""The transfer engine: moves one object or a whole tree between any two locations.

How a transfer flows (see docs/ARCHITECTURE.md for the picture):

1. ``plan`` turns (source, destination, recursive) into a stream of :class:`TransferItem`
   by stat-ing one object or listing a prefix. Listings stream, so memory does not grow
   with the number of objects.
2. ``parallel`` workers take items from a bounded queue. Each item is moved by the
   cheapest route the two stores allow: a server-side copy inside one store; whole-object
   read and put for small objects (the bytes are held once, under the byte budget); for
   large objects a multipart upload from the file, ranged parallel reads into a local
   file, or a streamed multipart copy between providers.
3. Every object written gets a CRC32C of its content in its metadata; every read that
   finds one (or an MD5 ETag) checks the bytes against it before they are written
   anywhere, and local files appear under their final name only once complete.
4. Each step reports :class:`TransferEvent` to a callback; faces render them. Beside the planner,
   a counting pass lists the source once more, ahead of it, keeping only counts: ``counted``
   events tell the totals (and what an earlier run of the job finished) long before the
   transfers reach the end, so progress has a true total and an ETA.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import mimetypes
import os
import posixpath
import stat as stat_module
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from .budget import ByteBudget
from .checksum import Crc32c, crc32c_combine, crc32c_file, crc32c_hex, crc32c_update, md5_etag
from .crypto.a1 import header_key_id
from .crypto.envelope import (
    FORMAT_METADATA_KEY,
    KEY_ID_METADATA_KEY,
    ClientEncryption,
    Format,
    recorded_key_id,
)
from .errors import (
    AlreadyExistsError,
    AuthenticationError,
    BucketNotFoundError,
    ConflictError,
    DicomCloudError,
    DicomFormatError,
    IntegrityError,
    KeyMissingError,
    NetworkError,
    NotFoundError,
    PermissionDeniedError,
    SourceChangedError,
    ThrottledError,
    UnreadableFileError,
    UnsafeNameError,
    UsageError,
)
from .filters import Filter
from .journal import Journal
from .localio import check_local_name, counting_listing, resolves_within
from .location import Location
from .names import check_object_key, nfc_twin, other_spelling_on_disk
from .resumable import fit_part_size, upload_file_resumable
from .retry import DEFAULT_ATTEMPTS, RetryPolicy, retry_after_of
from .store import CHECKSUM_METADATA_KEY, MultipartPlan, ObjectInfo, PutOptions, RandomAccessWriter
from .throttle import AdaptiveLimiter

if TYPE_CHECKING:
    # The DICOM modules load pydicom (and numpy with it): a tenth of a second that a plain transfer,
    # run thousands of times by scripts, should not pay. They are imported where they are used.
    from .dicom.deidentify import DeidentifyOptions
    from .dicom.header import DicomIdentity
    from .dicom.manifest import ManifestWriter
    from .dicom.upload import DicomPolicy

log = logging.getLogger(__name__)

MiB = 1024 * 1024

#: Concurrent object transfers. Measured on SeaweedFS with 512 KB DICOM instances (docs/benchmarks.md):
#: 32 beat 16 on downloads (hashing overlaps the network) and tied on uploads; 64 adds memory, not speed.
DEFAULT_PARALLEL = 32
#: Objects above this size go through multipart uploads or ranged parallel reads.
DEFAULT_MULTIPART_THRESHOLD = 16 * MiB
DEFAULT_PART_SIZE = 8 * MiB
#: Parts of one large object in flight at once.
DEFAULT_PART_CONCURRENCY = 8
#: Parts that obstore's multipart writer holds per upload slot (being read, queued, being sent):
#: measured as peak RSS over a 1 GiB upload.
_HELD_PARTS_PER_SLOT = 3
#: Chunk size of streamed reads (ranged downloads, copies between providers).
_STREAM_CHUNK = 1024 * 1024
#: Bytes of object data held in memory by all workers together.
DEFAULT_MEMORY_BUDGET = 80 * MiB

#: Errors after which no other item can succeed either: stop the whole run at once. A permission
#: refusal is one too while nothing has succeeded yet (afterwards it concerns one object only).
_FATAL = (AuthenticationError, BucketNotFoundError, KeyMissingError)

#: What to do when a destination name already holds other bytes (see TransferOptions.on_conflict).
ConflictPolicy = Literal["overwrite", "skip", "keep-both", "fail"]

DICOM_CONTENT_TYPE = "application/dicom"
OCTET_STREAM = "application/octet-stream"


@dataclass(frozen=True)
class TransferOptions:
    parallel: int = DEFAULT_PARALLEL
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
    part_size: int = DEFAULT_PART_SIZE
    part_concurrency: int = DEFAULT_PART_CONCURRENCY
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    #: Metadata, tags and content type for every object written.
    put: PutOptions = field(default_factory=PutOptions)
    #: Leave existing destination objects alone (reported as skipped).
    no_overwrite: bool = False
    #: Plan only: report what would be transferred, move nothing.
    dry_run: bool = False
    #: Attempts per object for failures worth retrying (network faults, throttling): retry.py's policy.
    attempts: int = DEFAULT_ATTEMPTS
    #: Client-side encryption: keys to decrypt with, and the format to encrypt in (see crypto/envelope.py).
    encryption: ClientEncryption | None = None
    #: Re-encrypt objects in place under the current master key; skip those already under it.
    rekey: bool = False
    #: DICOM-aware writes: names from a layout, attributes as metadata, validation (dicom/upload.py).
    dicom: DicomPolicy | None = None
    #: Which names and DICOM instances to take (include/exclude globs, files-from, modality, UIDs).
    filter: Filter | None = None
    #: De-identify every instance on its way (PS3.15 Basic Profile, dicom/deidentify.py).
    deidentify: DeidentifyOptions | None = None
    #: When the destination already holds an object under the same name with other bytes (for a
    #: DICOM layout: the same SOP Instance UID), whether written before the run or by another source
    #: of this run: overwrite it (reported as replaced), skip, keep both, or fail that object.
    #: Identical bytes are skipped (under "overwrite": only with the same metadata too).
    #: None: ``conflict_policy`` chooses.
    on_conflict: ConflictPolicy | None = None
    #: Receives each instance's UID mapping (old -> new) when de-identifying; called from worker threads.
    on_uid_map: Callable[[Mapping[str, str]], None] | None = None

    @property
    def conflict_policy(self) -> ConflictPolicy:
        """``on_conflict``, or its default: "fail" when a DICOM layout names the objects (two instances
        under one SOP Instance UID must never replace each other unseen; nothing is lost, the run
        lists them), "overwrite" otherwise (as cp, aws s3 cp and rclone copy do)."""
        if self.on_conflict is not None:
            return self.on_conflict
        return "fail" if self.dicom is not None and self.dicom.names_objects else "overwrite"

    def __post_init__(self) -> None:
        if self.rekey and not (self.encryption and self.encryption.writes_encrypted):
            raise UsageError("rekey needs the new master key to encrypt with")
        if self.parallel < 1:
            raise UsageError("--parallel must be at least 1")
        if self.attempts < 1:
            raise UsageError("attempts must be at least 1")
        if self.memory_budget < self.part_size:
            raise UsageError("the memory budget must hold at least one part")
        if self.part_size < 5 * MiB:
            raise UsageError("--part-size must be at least 5 MiB (the S3 minimum)")
        if self.multipart_threshold < 1:
            raise UsageError("--multipart-threshold must be positive")


@dataclass(frozen=True)
class TransferItem:
    src_key: str
    dst_key: str
    size: int
    #: The name below the source prefix, for items of a listing (None for a single object).
    relative: str | None = None
    #: What the source said of this version of the object (ETag, or size and mtime): a journal
    #: entry counts as done only for the same version.
    version: str = ""


def object_version(info: ObjectInfo) -> str:
    """A string that changes when the object changes: its ETag, else its size and modification time."""
    if info.etag:
        return f"etag:{info.etag}"
    stamp = info.last_modified.timestamp() if info.last_modified else ""
    return f"mtime:{info.size}:{stamp}"


class DoneCallback(Protocol):
    """Told of each object written and verified: its item, the CRC32C of the bytes written (when
    known) and the destination's ETag for them (when the store returned one)."""

    def __call__(self, item: TransferItem, crc32c: str | None, etag: str | None) -> None: ...


EventKind = Literal["planned", "started", "progress", "completed", "skipped", "failed", "deleted", "counted"]


@dataclass(frozen=True)
class ListingTotals:
    """What the counting pass has found so far: the objects the run will look at and their bytes,
    and among them those that an earlier, interrupted run of the same job finished (skipped now).
    ``complete`` once the whole source is counted; until then the totals only grow."""

    files: int = 0
    bytes: int = 0
    already_done: int = 0
    already_done_bytes: int = 0
    complete: bool = False


@dataclass(frozen=True)
class TransferEvent:
    """One step of one object.

    ``bytes`` counts bytes moved that no earlier event counted: the increment for
    ``progress``, and for ``completed`` the rest of the object (all of it for small objects,
    which report no progress of their own).

    ``counted`` events are of the whole run, not of one object: ``src`` and ``dst`` are the two
    trees, ``size`` the bytes counted so far, and ``totals`` says the rest.
    """

    kind: EventKind
    src: str
    dst: str
    size: int
    bytes: int = 0
    error: DicomCloudError | None = None
    #: A ``skipped`` object that an earlier, interrupted run of the same job finished.
    already_done: bool = False
    #: The counting pass's findings (``counted`` events only).
    totals: ListingTotals | None = None


EventCallback = Callable[[TransferEvent], None]


@dataclass
class TransferSummary:
    #: Objects written (new, replaced, or kept beside another object), and their bytes.
    files: int = 0
    bytes: int = 0
    #: Objects not written without an error: identical, resumed, rejected, conflicts left alone.
    skipped: int = 0
    #: Objects that failed, conflicts under --on-conflict fail included.
    failed: list[tuple[str, DicomCloudError]] = field(default_factory=list)
    #: Of ``files``: written over an object that held other bytes (--on-conflict overwrite).
    replaced: int = 0
    #: Of ``files``: written beside an object that held other bytes, as name~<crc32c> (keep-both).
    kept_both: int = 0
    #: Of ``skipped``: the destination already held these very bytes (or another source of the
    #: run wrote them there).
    identical: int = 0
    #: Different bytes under a name already taken, not written: in ``failed`` (fail) or in
    #: ``skipped`` (skip).
    conflicts: list[tuple[str, ConflictError]] = field(default_factory=list)
    #: Files left out by validation (not DICOM, malformed), with the reason: counted in ``skipped`` too.
    rejected: list[tuple[str, DicomFormatError]] = field(default_factory=list)
    seconds: float = 0.0
    dry_run: bool = False
    #: Objects skipped because an earlier, interrupted run of the same job finished them.
    resumed: int = 0
    #: Objects whose header the DICOM filters (modality, UIDs) left out: counted in ``skipped`` too.
    filtered_out: int = 0
    #: Throttling answers that reached the engine, and the lowest concurrency it backed off to.
    throttled: int = 0
    lowest_concurrency: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def selected(self) -> int:
        """Objects the filters let through, whatever became of them (written, skipped, failed)."""
        return self.files + self.skipped + len(self.failed) - self.filtered_out


def _ignore(_: TransferEvent) -> None:
    return None


class _Skip(Exception):
    """This object needs no work (reported as skipped, with the reason in the log)."""


class _FilteredOut(_Skip):
    """The DICOM filters leave this object out (its header does not match)."""


class _Identical(_Skip):
    """The destination already holds these very bytes."""


class _ConflictLeft(_Skip):
    """Other bytes are at the name and --on-conflict skip leaves them."""

    def __init__(self, conflict: ConflictError) -> None:
        super().__init__(str(conflict))
        self.conflict = conflict


@dataclass
class _Claim:
    """One destination name claimed by the items of a run that write it (one at a time)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    #: The source last written under this name in this run, for messages.
    writer: str | None = None


class _NameClaims:
    """Destination names in use by this run. Whoever writes a name holds its claim from the check
    of what is there until the write is done, so two sources mapped to one name (a DICOM layout
    and two files with one SOP Instance UID) are compared instead of racing. Only names in use
    are held: memory does not grow with the number of objects."""

    def __init__(self) -> None:
        self._claims: dict[str, _Claim] = {}

    @contextlib.asynccontextmanager
    async def claim(self, key: str) -> AsyncIterator[_Claim]:
        entry = self._claims.setdefault(key, _Claim())
        entry.users += 1
        try:
            async with entry.lock:
                yield entry
        finally:
            entry.users -= 1
            if not entry.users:
                del self._claims[key]


@dataclass(frozen=True)
class _Content:
    """What is about to be written, as far as it is known, to compare with what is there."""

    #: Bytes that will be written, when known.
    size: int | None = None
    #: CRC32C of the bytes written, when known before writing.
    crc: str | None = None
    #: CRC32C of the plaintext (differs from ``crc`` when encrypting: each envelope is unique).
    plain_crc: str | None = None
    #: The bytes themselves (small objects), for objects of other tools with only an MD5 ETag.
    data: bytes | memoryview | None = None
    #: Computes ``crc`` when it is needed (large objects: only when something is at the name).
    compute: Callable[[], Awaitable[str | None]] | None = None
    #: The metadata and content type it will be written with, when known: an object already there
    #: with the same bytes and these is left as it is even under "overwrite".
    put: PutOptions | None = None


_NO_ENCRYPTION = ClientEncryption()


@cache
def _header_only() -> DicomPolicy:
    """Header reading for DICOM filters when no DICOM policy was asked for."""
    from .dicom.upload import DicomPolicy

    return DicomPolicy()


#: Room for an envelope's header and tags beside a whole object in memory.
_ENVELOPE_ROOM = 64 * 1024
#: The counting pass reports its totals every so many objects, or this often, whichever comes first.
_COUNTED_EVERY = 1000
_COUNTED_INTERVAL = 0.5


class _CountAhead:
    """How far the counting pass has got, in listed items; the planner never overtakes it.

    So each item is counted (and looked up in the job's journal) before the planner hands it to a
    worker: "finished by an earlier run" is then never confused with "finished by this one", and
    the totals always run ahead of what is done. The counting pass only lists, so it is the
    faster of the two; the planner waits for it only at the start (for the first report of the
    totals) and on the rare listing page that comes late.
    """

    def __init__(self) -> None:
        self.position = 0
        self.finished = False
        self._moved = asyncio.Event()

    def advance(self, position: int) -> None:
        self.position = position
        self._moved.set()

    def finish(self) -> None:
        self.finished = True
        self._moved.set()

    async def reach(self, index: int) -> None:
        """Wait until the item at ``index`` (0-based) of the listing has been counted."""
        while index >= self.position and not self.finished:
            self._moved.clear()
            await self._moved.wait()


class Transfer:
    """One run of the engine from ``src`` to ``dst``."""

    def __init__(
        self,
        src: Location,
        dst: Location,
        *,
        recursive: bool,
        options: TransferOptions | None = None,
        on_event: EventCallback | None = None,
        manifest: ManifestWriter | None = None,
        journal: Journal | None = None,
        items: AsyncIterator[TransferItem] | None = None,
        on_done: DoneCallback | None = None,
    ) -> None:
        self.src = src
        #: Finished objects of earlier runs of this job are skipped; finished ones are recorded.
        self.journal = journal
        #: Items planned by the caller (sync) instead of a listing of the source.
        self._items = items
        self._on_done = on_done
        #: CRC32C and ETag of what was written, by source key, for journal and on_done.
        self._wrote: dict[str, tuple[str | None, str | None]] = {}
        #: Inventory of what was written, skipped or left out (dicom/manifest.py), row by row.
        self.manifest = manifest
        #: Identity and CRC32C of items in flight, for their manifest rows.
        self._written: dict[str, tuple[DicomIdentity | None, str | None, str | None]] = {}
        self.dst = dst
        self.recursive = recursive
        self.options = options or TransferOptions()
        self._on_event = on_event or _ignore
        #: An exception raised by the event callback (a closed pipe...): stops the run, re-raised at the end.
        self._callback_error: BaseException | None = None
        self.summary = TransferSummary(dry_run=self.options.dry_run)
        self._budget = ByteBudget(self.options.memory_budget)
        self._abort: DicomCloudError | None = None
        #: Bytes of in-flight objects already reported through progress events, by source URL.
        self._reported: dict[str, int] = {}
        #: Per-object retries (retry.py) and the concurrency that backs off under throttling (throttle.py).
        self._retry = RetryPolicy(attempts=self.options.attempts)
        self._limiter = AdaptiveLimiter(self.options.parallel)
        #: The counting pass of a listing (see ``_count_ahead``), while it runs.
        self._counting: asyncio.Task[None] | None = None
        #: Destination names being checked and written, one item at a time per name.
        self._claims = _NameClaims()
        #: How items in flight were written when not as new objects ("replaced", "kept-both"), and
        #: the object they replaced or were kept beside, by source key.
        self._outcomes: dict[str, tuple[str, str]] = {}
        #: The state of local source files in flight when their reading began, by source key.
        self._snapshots: dict[str, os.stat_result] = {}

    def emit(self, event: TransferEvent) -> None:
        if self._callback_error is not None:
            return
        try:
            self._on_event(event)
        except Exception as exc:  # the consumer failed, not the transfer: stop, then say so
            self._callback_error = exc
            self._abort = self._abort or DicomCloudError(f"the progress consumer failed: {exc!r}")

    async def run(self) -> TransferSummary:
        started = time.monotonic()
        await self._preflight()
        queue: asyncio.Queue[TransferItem | None] = asyncio.Queue(maxsize=self.options.parallel * 4)
        workers = [asyncio.create_task(self._worker(queue)) for _ in range(self.options.parallel)]
        items = self.plan()
        try:
            async for item in items:
                if self._abort:
                    break
                await queue.put(item)
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
        except BaseException:
            # Interrupted or the listing failed: stop the workers; partial files are removed by them.
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        finally:
            # Closed here, not when collected: the tasks a producer of items runs end before the
            # caller closes the journal (and releases the job's lock).
            await _close(items)
            if self._counting is not None:
                self._counting.cancel()
                await asyncio.gather(self._counting, return_exceptions=True)
            self.summary.seconds = time.monotonic() - started
            self.summary.throttled = self._limiter.throttled
            self.summary.lowest_concurrency = self._limiter.lowest
        if self._callback_error is not None:
            raise self._callback_error
        if self._abort:
            raise self._abort
        return self.summary

    # -- planning ----------------------------------------------------------------------

    async def _preflight(self) -> None:
        """Fail before any work when the destination bucket is missing or the credentials are wrong."""
        if self.dst.is_local:
            return
        key = self.dst.key
        directory = key if self.dst.names_directory or self.recursive else key.rpartition("/")[0]
        # A recursive listing streams: only its first page is fetched, however large the bucket.
        async for _ in self.dst.store.list(f"{directory.rstrip('/')}/" if directory.strip("/") else ""):
            break

    async def plan(self) -> AsyncIterator[TransferItem]:
        """The items to transfer, streamed from a stat or a listing of the source."""
        if self._items is not None:
            try:
                async for item in self._items:
                    yield item
            finally:
                await _close(self._items)
            return
        if self.recursive and not self._source_is_file():
            found = False
            prefix = self.src.prefix
            if (
                self.src.store is self.dst.store
                and self.dst.prefix != prefix
                and self.dst.prefix.startswith(prefix)
            ):
                # What is written would be listed again and copied again, without end.
                raise UsageError(
                    f"{self.dst.display(self.dst.prefix)} is inside {self.src.display(prefix)}",
                    hint="copy to a destination outside the source tree",
                )
            lookahead: _CountAhead | None = None
            if not self.options.dry_run:
                lookahead = _CountAhead()
                self._counting = asyncio.create_task(self._count_ahead(prefix, lookahead))
            index = 0
            async for info in self.src.store.list(prefix):
                found = True
                listed = self._listed_item(info, prefix)
                if listed is None:
                    continue
                if lookahead is not None:
                    # The first item waits for a first count (a listing page), so that a total is
                    # known before anything completes; the others only for their own count.
                    await lookahead.reach(index or _COUNTED_EVERY - 1)
                index += 1
                yield listed
            if not found:
                await self._explain_empty_source()
            return
        info = await self._stat_single_source()
        yield TransferItem(info.key, self._single_destination_key(), info.size, version=object_version(info))

    def _listed_item(self, info: ObjectInfo, prefix: str) -> TransferItem | None:
        """The item of one listed object, or None for what the run does not take."""
        if info.key.endswith("/"):
            return None  # a "folder" marker object (S3 consoles make them): not a file
        relative = info.key[len(prefix) :]
        if self.options.filter is not None and not self.options.filter.accepts_name(relative):
            return None
        if self.src.is_local and not self.dst.is_local:
            # macOS writes NFD names; one spelling in the bucket avoids duplicates.
            relative = unicodedata.normalize("NFC", relative)
        return TransferItem(info.key, self.dst.join(relative), info.size, relative, object_version(info))

    async def _count_ahead(self, prefix: str, lookahead: _CountAhead) -> None:
        """List the source once more, keeping only counts, and report them as ``counted`` events.

        Memory stays flat in the number of objects: nothing but the totals is kept. A failure of
        this listing only ends the counting: the planner's own listing reports listing errors.
        """
        counting_listing.set(True)  # this task's own context: the planner's listing gives the warnings
        journal = self.journal if self.journal is not None and self.journal.previously_done else None
        src_url, dst_url = self.src.display(prefix), self.dst.display(self.dst.prefix)
        files = size = done = done_bytes = 0
        last_report = time.monotonic()
        try:
            async for info in self.src.store.list(prefix):
                item = self._listed_item(info, prefix)
                if item is None:
                    continue
                files += 1
                size += item.size
                if journal is not None and journal.is_done(item.src_key, item.version):
                    done += 1
                    done_bytes += item.size
                lookahead.advance(files)
                now = time.monotonic()
                if files % _COUNTED_EVERY == 0 or now - last_report >= _COUNTED_INTERVAL:
                    last_report = now
                    totals = ListingTotals(files, size, done, done_bytes)
                    self.emit(TransferEvent("counted", src_url, dst_url, size, totals=totals))
        except Exception as exc:
            log.debug("counting %s stopped: %s", src_url, exc)
            return
        finally:
            lookahead.finish()
        totals = ListingTotals(files, size, done, done_bytes, complete=True)
        self.emit(TransferEvent("counted", src_url, dst_url, size, totals=totals))

    def _source_is_file(self) -> bool:
        return self.src.is_local and os.path.isfile("/" + self.src.key)

    async def _stat_single_source(self) -> ObjectInfo:
        return await self.src.stat_object("transfer")

    async def _explain_empty_source(self) -> None:
        if self.src.is_local:
            if not os.path.isdir("/" + self.src.key.rstrip("/")):
                raise NotFoundError(f"{self.src.display()}: no such file or directory")
            return  # an existing empty directory: nothing to do, and that is fine
        raise NotFoundError(f"nothing found under {self.src.display(self.src.prefix)}")

    def _single_destination_key(self) -> str:
        into_directory = self.dst.names_directory or (
            self.dst.is_local and os.path.isdir("/" + self.dst.key.rstrip("/"))
        )
        if into_directory:
            name = self.src.basename()
            if self.dst.is_local:
                check_local_name(name)
            elif self.src.is_local:
                name = unicodedata.normalize("NFC", name)
            return self.dst.join(name)
        return self.dst.key

    # -- execution ---------------------------------------------------------------------

    async def _worker(self, queue: asyncio.Queue[TransferItem | None]) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            if self._abort:
                continue
            await self._run_item(item)

    async def _run_item(self, item: TransferItem) -> None:
        src_url = self.src.display(item.src_key)
        dst_url = self.dst.display(item.dst_key)
        if self.options.dry_run:
            self.emit(TransferEvent("planned", src_url, dst_url, item.size))
            self.summary.files += 1
            self.summary.bytes += item.size
            return
        if self.journal is not None and self.journal.is_done(item.src_key, item.version):
            self.summary.skipped += 1
            self.summary.resumed += 1
            self.emit(TransferEvent("skipped", src_url, dst_url, item.size, already_done=True))
            return
        self.emit(TransferEvent("started", src_url, dst_url, item.size))
        first_failure: float | None = None
        for attempt in range(1, self.options.attempts + 1):
            try:
                if self.dst.is_local and item.relative is not None:
                    check_local_name(item.relative)
                    _check_confined(self.dst, item.dst_key)
                _check_faithful_names(self.src, self.dst, item)
                async with self._limiter.slot():
                    try:
                        await self._move(item, src_url, dst_url)
                    except ThrottledError:
                        self._limiter.on_throttled()
                        raise
                await self._limiter.on_success()
            except ConflictError as conflict:
                self._forget(item)
                self._take_back_progress(src_url, dst_url, item.size)
                self.summary.failed.append((src_url, conflict))
                self.summary.conflicts.append((src_url, conflict))
                self._manifest_row(item, src_url, dst_url, "conflict", str(conflict))
                self.emit(TransferEvent("failed", src_url, dst_url, item.size, error=conflict))
                return
            except _ConflictLeft as left:
                self._forget(item)
                self._take_back_progress(src_url, dst_url, item.size)
                self.summary.skipped += 1
                self.summary.conflicts.append((src_url, left.conflict))
                self._manifest_row(item, src_url, dst_url, "conflict", str(left))
                self.emit(TransferEvent("skipped", src_url, dst_url, item.size, error=left.conflict))
                return
            except (AlreadyExistsError, _Skip) as reason:
                log.debug("skipped %s: %s", src_url, reason)
                self._forget(item)
                self._take_back_progress(src_url, dst_url, item.size)
                self.summary.skipped += 1
                self.summary.filtered_out += isinstance(reason, _FilteredOut)
                if isinstance(reason, _Identical):
                    self.summary.identical += 1
                rejected = reason.__cause__ if isinstance(reason.__cause__, DicomFormatError) else None
                if rejected is not None:
                    self.summary.rejected.append((src_url, rejected))
                self._manifest_row(
                    item,
                    src_url,
                    dst_url,
                    "rejected" if rejected else "skipped",
                    rejected.reason if rejected else str(reason) if isinstance(reason, _Identical) else "",
                )
                self.emit(TransferEvent("skipped", src_url, dst_url, item.size, error=rejected))
                return
            except Exception as unexpected:  # one object's bug must not stop the others
                exc = (
                    unexpected
                    if isinstance(unexpected, DicomCloudError)
                    else DicomCloudError(f"{src_url}: unexpected error: {unexpected!r}")
                )
                if not isinstance(unexpected, DicomCloudError):
                    log.debug("unexpected error transferring %s", src_url, exc_info=unexpected)
                self._forget(item)
                if isinstance(exc, _FATAL) or (
                    # A store refusing the first objects refuses them all; a local file that
                    # cannot be read is that one file's failure.
                    isinstance(exc, PermissionDeniedError)
                    and not isinstance(exc, UnreadableFileError)
                    and not self.summary.files
                ):
                    # The whole run stops with this error: it is reported once, by the caller.
                    self._abort = self._abort or exc
                    self._take_back_progress(src_url, dst_url, item.size)
                    return
                self._take_back_progress(src_url, dst_url, item.size)
                first_failure = first_failure or time.monotonic()
                if self._retry.should_retry(exc, attempt, first_failure) and not self._abort:
                    wait = self._retry.delay(attempt, retry_after=retry_after_of(exc))
                    log.debug("retrying %s in %.2f s (attempt %d: %s)", src_url, wait, attempt, exc)
                    await asyncio.sleep(wait)
                    continue
                if isinstance(exc, NetworkError) and self.recursive and not self.summary.files:
                    # Every attempt failed and nothing has succeeded yet: the store is unreachable
                    # or refusing everything; stop rather than wait out each remaining object.
                    self._abort = self._abort or exc
                    return
                self.summary.failed.append((src_url, exc))
                self._manifest_row(item, src_url, dst_url, "failed", str(exc))
                self.emit(TransferEvent("failed", src_url, dst_url, item.size, error=exc))
                return
            self.summary.files += 1
            self.summary.bytes += item.size
            crc, etag = self._wrote.pop(item.src_key, (None, None))
            self._snapshots.pop(item.src_key, None)
            outcome, other = self._outcomes.pop(item.src_key, ("", ""))
            if outcome == "replaced":
                self.summary.replaced += 1
            elif outcome == "kept-both":
                self.summary.kept_both += 1
            if self.journal is not None:
                self.journal.record_done(item.src_key, item.version, item.dst_key, item.size, crc)
            if self._on_done is not None:
                self._on_done(item, crc, etag)
            if outcome == "replaced":
                self._manifest_row(item, src_url, dst_url, "replaced", f"replaced other bytes{other}")
            elif outcome == "kept-both":
                self._manifest_row(item, src_url, dst_url, "uploaded", f"kept beside {other} (other bytes)")
            else:
                self._manifest_row(item, src_url, dst_url, "uploaded")
            rest = item.size - self._reported.pop(src_url, 0)
            self.emit(TransferEvent("completed", src_url, dst_url, item.size, bytes=rest))
            return

    def _forget(self, item: TransferItem) -> None:
        """Drop what an attempt of ``item`` noted about itself (it failed, or wrote nothing)."""
        self._outcomes.pop(item.src_key, None)
        self._snapshots.pop(item.src_key, None)

    async def _move(self, item: TransferItem, src_url: str, dst_url: str) -> None:
        put = self.options.put
        if self.src.is_local:
            # First of all: a file that cannot be read, or vanished or changed since it was listed,
            # fails alone; what it is now is compared with what it is once read. (An open and an
            # fstat take microseconds: a hop to a worker thread would cost more than it saves.)
            self._snapshots[item.src_key] = self._open_source(item, src_url)
        policy = self.options.dicom
        if policy is None and self.options.filter is not None and self.options.filter.needs_header:
            policy = _header_only()
        if policy is not None:
            item, dicom_metadata = await self._apply_dicom_policy(policy, item)
            put = replace(put, metadata={**dicom_metadata, **put.metadata})
        if self.options.rekey:
            await self._skip_unless_rekey_needed(item, src_url)
        async with self._claims.claim(item.dst_key) as claim:
            await self._move_named(item, put, src_url, dst_url, claim)
            claim.writer = src_url

    def _checks_destination(self) -> bool:
        """Whether what is at each destination name is looked at before writing: always, except
        where the write itself decides (--no-overwrite is a conditional write; rekey rewrites in
        place) or where the caller planned updates knowingly (sync)."""
        if self.options.no_overwrite or self.options.rekey:
            return False
        return not (self._items is not None and self.options.conflict_policy == "overwrite")

    async def _move_named(
        self, item: TransferItem, put: PutOptions, src_url: str, dst_url: str, claim: _Claim
    ) -> None:
        src, dst = self.src.store, self.dst.store
        crypt = self.options.encryption or _NO_ENCRYPTION
        checks = self._checks_destination()
        if self.options.no_overwrite:
            put = replace(put, if_absent=True)
            if item.size > self.options.multipart_threshold:
                await self._refuse_existing(item.dst_key)
        # Inside one store the server copies (metadata included) unless the bytes or the
        # metadata change; uploads from local disk always go the read-and-put way to record a CRC32C.
        if (
            src is dst
            and src.features.server_side_copy
            and not self.src.is_local
            and not (put.metadata or put.tags or crypt.writes_encrypted)
        ):
            if self.options.no_overwrite:
                await self._refuse_existing(item.dst_key)
            if checks:
                item = await self._check_destination(
                    item, _Content(size=item.size, compute=self._source_crc(item)), claim
                )
            await src.copy(item.src_key, item.dst_key)
            self._wrote[item.src_key] = (None, None)
            return
        # De-identification rewrites the dataset: it needs the whole instance in memory.
        if item.size <= self.options.multipart_threshold or self.options.deidentify is not None:
            async with self._budget.reserve(2 * item.size + _ENVELOPE_ROOM):
                info, data = await src.read(item.src_key)
                self._check_source_unchanged(item, src_url, len(data))
                # Hashing and ciphers release the GIL: in a worker thread they run beside the event loop.
                try:
                    data, options, plain_crc = await asyncio.to_thread(
                        self._prepare_whole, data, info, put, src_url, item
                    )
                except EtagMismatch:
                    first = hashlib.md5(data, usedforsecurity=False).digest()
                    info, data = await src.read(item.src_key)
                    if hashlib.md5(data, usedforsecurity=False).digest() != first:
                        raise  # two reads, two contents: damage in transit
                    # The same bytes twice: the ETag is not an MD5 of them; the other checks still apply.
                    log.debug("%s: ETag is not an MD5 of the content (SSE-KMS or SSE-C?)", src_url)
                    data, options, plain_crc = await asyncio.to_thread(
                        self._prepare_whole, data, info, put, src_url, item, trust_etag=False
                    )
                written_crc = options.metadata.get(CHECKSUM_METADATA_KEY)
                if checks:
                    # A create-only write first: where nothing is at the name (the usual case) the
                    # object is written in one request, without looking first.
                    try:
                        result = await dst.put(item.dst_key, data, replace(options, if_absent=True))
                    except AlreadyExistsError:
                        content = _Content(
                            size=len(data), crc=written_crc, plain_crc=plain_crc, data=data, put=options
                        )
                        item = await self._check_destination(item, content, claim)
                        result = await dst.put(item.dst_key, data, options)
                else:
                    result = await dst.put(item.dst_key, data, options)
                self._wrote[item.src_key] = (written_crc, result.etag)
                if item.src_key in self._written:
                    identity, _, named = self._written[item.src_key]
                    self._written[item.src_key] = (identity, written_crc, named)
            return
        if checks:
            # Large objects: the CRC32C of what will be written is computed only if an object is
            # already at the name (encrypted ones: never known beforehand, so they count as different).
            content = (
                _Content()
                if crypt.writes_encrypted
                else _Content(size=item.size, compute=self._source_crc(item))
            )
            item = await self._check_destination(item, content, claim)
        info = await src.stat(item.src_key)
        fmt = crypt.detect(item.src_key, info.metadata)
        if fmt is not None and crypt.writes_encrypted:
            # Re-encryption (copy or rekey), wherever the destination is: never plaintext at rest.
            await self._streamed_copy(item, info, put, src_url, dst_url, decrypt=fmt)
        elif fmt is not None and self.dst.is_local:
            await self._decrypting_download(item, info, fmt, src_url, dst_url)
        elif self.src.is_local and fmt is None and not crypt.writes_encrypted:
            await self._upload_file(item, put, src_url)
        elif dst.features.random_access_write and not crypt.writes_encrypted:
            await self._ranged_download(item, info, src_url, dst_url)
        else:
            await self._streamed_copy(item, info, put, src_url, dst_url)

    # -- local sources that change under us -------------------------------------------

    def _open_source(self, item: TransferItem, src_url: str) -> os.stat_result:
        """The state of a local source file as its transfer begins, once it is known to open."""
        try:
            fd = os.open("/" + item.src_key, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise NotFoundError(f"{src_url}: vanished since it was listed") from None
        except PermissionError:
            raise UnreadableFileError(f"{src_url}: permission denied (cannot read the file)") from None
        except OSError as exc:
            raise UnreadableFileError(f"{src_url}: cannot read the file ({exc.strerror or exc})") from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat_module.S_ISREG(st.st_mode):
            raise NotFoundError(f"{src_url}: is no longer a regular file")
        if item.relative is not None and st.st_size != item.size:
            raise SourceChangedError(
                f"{src_url} changed since it was listed ({item.size} bytes, now {st.st_size}); not written",
                hint="run the same command again once the file is complete",
            )
        return st

    def _check_source_unchanged(self, item: TransferItem, src_url: str, length: int | None = None) -> None:
        """After a local file was read: refuse what may mix two versions of it."""
        before = self._snapshots.get(item.src_key)
        if before is None:
            return
        try:
            after = os.stat("/" + item.src_key)
        except FileNotFoundError:
            raise SourceChangedError(f"{src_url} vanished while it was read; not written") from None
        size = length if length is not None else after.st_size
        if (after.st_ino, after.st_size, after.st_mtime_ns, size) != (
            before.st_ino,
            before.st_size,
            before.st_mtime_ns,
            before.st_size,
        ):
            raise SourceChangedError(
                f"{src_url} changed while it was read; not written",
                hint="run the same command again once the file is complete",
            )

    # -- what is already at the destination --------------------------------------------

    def _source_crc(self, item: TransferItem) -> Callable[[], Awaitable[str | None]]:
        """How to learn the CRC32C of the source's bytes when they are written unchanged."""

        known: list[str | None] = []

        async def compute() -> str | None:
            if known:
                return known[0]
            if self.src.is_local:
                crc: str | None = await asyncio.to_thread(crc32c_file, Path("/" + item.src_key))
            else:
                info = await self.src.store.stat(item.src_key)
                stored = info.metadata.get(CHECKSUM_METADATA_KEY)
                # An encrypted source may be decrypted on the way: its stored CRC is not the written one's.
                encrypted = (self.options.encryption or _NO_ENCRYPTION).detect(item.src_key, info.metadata)
                crc = stored.lower() if stored and not encrypted else None
            known.append(crc)
            return crc

        return compute

    async def _check_destination(self, item: TransferItem, ours: _Content, claim: _Claim) -> TransferItem:
        """Look at what is already at ``item``'s destination name (the caller holds the name's claim):
        nothing, the same bytes (skipped), or other bytes, which the conflict policy settles. Returns
        the item to write, renamed for keep-both."""
        try:
            existing = await self.dst.store.stat(item.dst_key)
        except NotFoundError:
            return item
        where = self.dst.display(item.dst_key)
        earlier = f" (written from {claim.writer} in this run)" if claim.writer else ""
        policy = self.options.conflict_policy
        same = await self._same_content(existing, ours)
        if policy == "overwrite":
            # The very same object (bytes, metadata, content type) is not written again; the same
            # bytes with other metadata are; a replacement is only of other bytes.
            if same and ours.put is not None and _has_metadata(existing, ours.put):
                raise _Identical(f"identical object already at {where}{earlier}")
            if not same:
                self._outcomes[item.src_key] = ("replaced", earlier)
            return item
        if same:
            raise _Identical(f"identical bytes already at {where}{earlier}")
        conflict = ConflictError(
            f"{where} already holds other bytes{earlier}",
            hint="choose --on-conflict keep-both (write beside it), overwrite or skip",
        )
        # Beside it, under a name from the CRC32C (of the plaintext: an envelope differs each time),
        # the bytes may already be kept by an earlier keep-both: then they are there.
        crc = ours.plain_crc or ours.crc or (await ours.compute() if ours.compute else None)
        new_key = _beside(item.dst_key, crc) if crc else None
        beside: ObjectInfo | None = None
        if new_key is not None:
            with contextlib.suppress(NotFoundError):
                beside = await self.dst.store.stat(new_key)
        if (
            new_key is not None
            and beside is not None
            and await self._same_content(beside, replace(ours, crc=ours.crc or crc))
        ):
            raise _Identical(f"identical bytes already beside {where}, at {self.dst.display(new_key)}")
        if policy == "skip":
            raise _ConflictLeft(conflict)
        if policy == "fail" or new_key is None or beside is not None:
            # fail; or keep-both without a stable name to keep the bytes under, or with other
            # bytes under it: nothing is replaced.
            raise conflict
        self._outcomes[item.src_key] = ("kept-both", where)
        if item.src_key in self._written:
            identity, written_crc, _ = self._written[item.src_key]
            self._written[item.src_key] = (identity, written_crc, new_key)
        return replace(item, dst_key=new_key)

    async def _same_content(self, existing: ObjectInfo, ours: _Content) -> bool:
        """Whether the object already there holds the bytes about to be written (for encrypted
        objects: the same plaintext). Unknown counts as different: nothing is replaced unseen."""
        crypt = self.options.encryption or _NO_ENCRYPTION
        fmt = crypt.detect(existing.key, existing.metadata)
        stored = existing.metadata.get(CHECKSUM_METADATA_KEY)
        if fmt is not None:
            if ours.crc is not None and stored and stored.lower() == ours.crc:
                return True  # the very same ciphertext
            if (
                ours.plain_crc is None
                or crypt.ring is None
                or existing.size > self.options.multipart_threshold
            ):
                return False
            try:
                async with self._budget.reserve(2 * existing.size + _ENVELOPE_ROOM):
                    info, blob = await self.dst.store.read(existing.key)
                    url = self.dst.display(existing.key)
                    plain = await asyncio.to_thread(crypt.decrypt, url, fmt, info.metadata, blob)
            except DicomCloudError:
                return False  # not readable with the keys given: not known to be the same
            return crc32c_hex(plain) == ours.plain_crc
        if ours.size is not None and existing.size != ours.size:
            return False
        crc = ours.crc or (await ours.compute() if ours.compute else None)
        if stored:
            return crc is not None and stored.lower() == crc
        if self.dst.is_local and crc is not None:
            return await asyncio.to_thread(crc32c_file, Path("/" + existing.key)) == crc
        etag = md5_etag(existing.etag)
        if ours.data is not None and etag is not None and self.dst.store.features.etag_is_md5:
            return hashlib.md5(ours.data, usedforsecurity=False).hexdigest() == etag
        return False

    async def _upload_file(self, item: TransferItem, put: PutOptions, src_url: str) -> None:
        """A large local file: CRC32C first (it goes in the metadata), then a multipart upload.

        With a journal, and a store that can continue an upload from another process, the upload's
        session is kept in the journal so that a re-run sends only the parts the server lacks.
        A file that changed while it was read is not left under the name as good: the object just
        written from it is removed again."""
        path = Path("/" + item.src_key)
        plan = self._upload_plan()
        put = replace(put, content_type=put.content_type or await self._content_type_of_file(item))
        uploads = self.dst.store.resumable_uploads() if self.journal is not None else None
        if uploads is not None and self.journal is not None:
            dst_url = self.dst.display(item.dst_key)
            resumed = await upload_file_resumable(
                uploads,
                path,
                item.dst_key,
                part_size=fit_part_size(item.size, plan.part_size, uploads),
                options=_with_checksum(put, None, None),
                state_store=self.journal,
                budget=self._budget,
                on_progress=lambda count: self._progress(src_url, dst_url, item.size, count),
                concurrency=plan.concurrency,
            )
            if resumed.resumed:
                log.info(
                    "%s: continued an interrupted upload, %d of %d parts already on the server",
                    dst_url,
                    resumed.parts_reused,
                    resumed.parts_total,
                )
            await self._unless_changed(item, src_url)
            self._wrote[item.src_key] = (resumed.crc32c, resumed.info.etag)
            return
        checksum = await asyncio.to_thread(crc32c_file, path)
        async with self._budget.reserve(_HELD_PARTS_PER_SLOT * plan.part_size * plan.concurrency):
            result = await self.dst.store.put_file(
                item.dst_key, path, _with_checksum(put, None, checksum), plan
            )
        await self._unless_changed(item, src_url)
        self._wrote[item.src_key] = (checksum, result.etag)

    async def _unless_changed(self, item: TransferItem, src_url: str) -> None:
        """After a large local file was uploaded: if it changed meanwhile, the object may mix two
        versions and its CRC32C may not describe it; remove it and fail."""
        try:
            self._check_source_unchanged(item, src_url)
        except SourceChangedError:
            with contextlib.suppress(DicomCloudError):
                await self.dst.store.delete([item.dst_key])
            raise

    async def _content_type_of_file(self, item: TransferItem) -> str:
        def head() -> bytes:
            with open("/" + item.src_key, "rb") as f:
                return f.read(132)

        return self._content_type(item, None, await asyncio.to_thread(head), encrypted=False)

    def _content_type(
        self,
        item: TransferItem,
        source: ObjectInfo | None,
        head: bytes | memoryview | None,
        *,
        encrypted: bool,
    ) -> str:
        """The Content-Type of what is written for ``item``: application/dicom only for what is known
        to be DICOM (read as DICOM by the policy, or a Part 10 file), octet-stream for ciphertext,
        else the source's own type or one guessed from the name."""
        if encrypted:
            return OCTET_STREAM
        identity = self._written.get(item.src_key, (None, None, None))[0]
        if identity is not None or (head is not None and bytes(head[128:132]) == b"DICM"):
            return DICOM_CONTENT_TYPE
        if source is not None and source.content_type and source.content_type != DICOM_CONTENT_TYPE:
            return source.content_type
        guessed = mimetypes.guess_type(posixpath.basename(item.src_key))[0]
        # A name ending in .dcm does not make DICOM (the system's tables map it to application/dicom).
        return guessed if guessed and guessed != DICOM_CONTENT_TYPE else OCTET_STREAM

    async def _apply_dicom_policy(
        self, policy: DicomPolicy, item: TransferItem
    ) -> tuple[TransferItem, dict[str, str]]:
        """Read the instance's header; name the object by the layout; say which attributes to record."""
        selecting = self.options.filter is not None and self.options.filter.needs_header
        try:
            identity = await policy.identify(
                self.src.store, item.src_key, local=self.src.is_local, size=item.size
            )
        except DicomFormatError as exc:
            if policy is _header_only() and selecting:
                raise _FilteredOut("not DICOM: does not match the DICOM filters") from None
            if policy.skip_invalid:
                raise _Skip(f"not uploaded: {exc.reason}") from exc
            raise
        if self.options.deidentify is not None:
            identity = _deidentified_identity(identity, self.options.deidentify)
        self._written[item.src_key] = (identity, None, None)
        if (
            selecting
            and self.options.filter is not None
            and not self.options.filter.accepts_identity(identity)
        ):
            raise _FilteredOut("does not match the DICOM filters")
        name = policy.object_name(identity, posixpath.basename(item.src_key))
        if name is not None:
            item = replace(item, dst_key=self.dst.join(name), relative=name)
            self._written[item.src_key] = (identity, None, item.dst_key)
        return item, policy.metadata(identity)

    def _prepare_whole(
        self,
        data: bytes | memoryview,
        info: ObjectInfo,
        put: PutOptions,
        src_url: str,
        item: TransferItem,
        *,
        trust_etag: bool = True,
    ) -> tuple[bytes | memoryview, PutOptions, str | None]:
        """Verify a whole object read into memory, decrypt or encrypt it as the rules say, and
        return the bytes to write with their metadata, and the CRC32C of the plaintext when it is
        known. Runs in a worker thread."""
        crypt = self.options.encryption or _NO_ENCRYPTION
        checksum = verify(data, info, src_url, etag_is_md5=trust_etag and self.src.store.features.etag_is_md5)
        fmt = crypt.detect(item.src_key, info.metadata)
        if fmt is not None and not (self.dst.is_local or crypt.writes_encrypted):
            # Ciphertext copied as it is, with the marker that says how to read it.
            cipher_type = self._content_type(item, info, None, encrypted=True)
            return (
                data,
                _with_checksum(put, info, checksum, keep=_markers(info), content_type=cipher_type),
                None,
            )
        if fmt is not None:
            data = crypt.decrypt(src_url, fmt, info.metadata, data)
            checksum = crc32c_hex(data)
        if self.options.deidentify is not None:
            from .dicom.deidentify import deidentify

            data, uid_map = deidentify(bytes(data), self.options.deidentify)
            checksum = crc32c_hex(data)
            if self.options.on_uid_map is not None:
                self.options.on_uid_map(uid_map)
        if crypt.writes_encrypted:
            plain_crc = checksum
            data = crypt.encrypt(data)
            options = _with_checksum(
                put, info, crc32c_hex(data), keep=crypt.marker(), content_type=OCTET_STREAM
            )
            return data, options, plain_crc
        content_type = self._content_type(item, info, data[:132], encrypted=False)
        return data, _with_checksum(put, info, checksum, content_type=content_type), checksum

    async def _skip_unless_rekey_needed(self, item: TransferItem, src_url: str) -> None:
        """For rekey: only encrypted objects not yet under the current master key are rewritten."""
        crypt = self.options.encryption
        assert crypt is not None and crypt.ring is not None
        info = await self.src.store.stat(item.src_key)
        fmt = crypt.detect(item.src_key, info.metadata)
        if fmt is None:
            raise _Skip(f"{src_url} is not client-side encrypted")
        key_id = recorded_key_id(info.metadata)
        if key_id is None:  # an object written by Orthanc: the key id is in its first bytes
            key_id = header_key_id(await self.src.store.get_range(item.src_key, 0, 6))
        if key_id == crypt.ring.current.id and fmt == crypt.encrypt_as:
            raise _Skip(f"{src_url} is already under master key {key_id}")

    def _upload_plan(self) -> MultipartPlan:
        """Parts in flight for one multipart upload, as many as the memory budget allows."""
        part = self.options.part_size
        slots = self.options.memory_budget // (_HELD_PARTS_PER_SLOT * part)
        return MultipartPlan(part, max(1, min(self.options.part_concurrency, slots)))

    def _manifest_row(
        self, item: TransferItem, src_url: str, dst_url: str, status: str, reason: str = ""
    ) -> None:
        identity, crc, named = self._written.pop(item.src_key, (None, None, None))
        if self.manifest is None:
            return
        from .dicom.manifest import ManifestRow

        row = ManifestRow.from_identity(
            identity,
            source=src_url,
            key=self.dst.display(named) if named else dst_url,
            size=item.size,
            crc32c=crc,
            status=status,  # type: ignore[arg-type]
            reason=reason,
        )
        self.manifest.write(row)

    def _progress(self, src_url: str, dst_url: str, size: int, count: int) -> None:
        if count:
            self._reported[src_url] = self._reported.get(src_url, 0) + count
            self.emit(TransferEvent("progress", src_url, dst_url, size, bytes=count))

    def _take_back_progress(self, src_url: str, dst_url: str, size: int) -> None:
        """A failed attempt's bytes were not moved after all: report them back as negative progress."""
        undone = self._reported.pop(src_url, 0)
        if undone:
            self.emit(TransferEvent("progress", src_url, dst_url, size, bytes=-undone))

    async def _refuse_existing(self, key: str) -> None:
        try:
            await self.dst.store.stat(key)
        except NotFoundError:
            return
        raise AlreadyExistsError(f"{self.dst.display(key)} exists")

    async def _ranged_download(
        self, item: TransferItem, info: ObjectInfo, src_url: str, dst_url: str
    ) -> None:
        """Parallel ranged reads streamed into a partial local file; renamed only once verified.

        Each part is read as a stream of small chunks written at their offsets, so memory
        holds about one chunk per part in flight; each part's CRC32C is computed on the way
        and the object's CRC is combined from them at the end.
        """
        size = info.size
        part = self.options.part_size
        offsets = list(range(0, size, part))
        part_crcs = [0] * len(offsets)
        writer = self.dst.store.open_writer(item.dst_key, size)
        parts_in_flight = asyncio.Semaphore(self.options.part_concurrency)
        src_store = self.src.store

        async def fetch(index: int, start: int) -> None:
            end = min(start + part, size)
            async with parts_in_flight, self._budget.reserve(2 * _STREAM_CHUNK):
                crc = 0
                position = start
                async for chunk in src_store.stream(
                    item.src_key, chunk_size=_STREAM_CHUNK, start=start, end=end
                ):
                    # Write and hash in one hop to a worker thread: both release the GIL.
                    crc = await asyncio.to_thread(_write_and_hash, writer, position, chunk, crc)
                    position += len(chunk)
                    self._progress(src_url, dst_url, size, len(chunk))
                if position != end:
                    raise IntegrityError(
                        f"{src_url}: got {position - start} bytes of part at {start}, expected {end - start}"
                    )
                part_crcs[index] = crc

        try:
            tasks = [asyncio.create_task(fetch(index, start)) for index, start in enumerate(offsets)]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            whole = 0
            for index, start in enumerate(offsets):
                whole = crc32c_combine(whole, part_crcs[index], min(part, size - start))
            _check_checksum(f"{whole:08x}", info, src_url)
            await asyncio.to_thread(writer.commit, self.options.no_overwrite)
            self._wrote[item.src_key] = (f"{whole:08x}", None)
        except BaseException:
            writer.abort()
            raise

    async def _streamed_copy(
        self,
        item: TransferItem,
        info: ObjectInfo,
        put: PutOptions,
        src_url: str,
        dst_url: str,
        *,
        decrypt: Format | None = None,
    ) -> None:
        """Stream the source into a multipart upload; no temporary file.

        Decrypts and re-encrypts on the way when asked. A failed check raises inside the stream,
        before its end, so the multipart upload is abandoned rather than completed.
        """
        crypt = self.options.encryption or _NO_ENCRYPTION
        stored_crc = Crc32c()
        decryptor = crypt.decryptor(src_url, decrypt, info.metadata) if decrypt else None
        encryptor = crypt.encryptor() if crypt.writes_encrypted else None
        src_store = self.src.store

        async def chunks() -> AsyncIterator[bytes | memoryview]:
            if encryptor is not None:
                yield encryptor.header
            async for chunk in src_store.stream(item.src_key, chunk_size=self.options.part_size):
                stored_crc.update(chunk)
                self._progress(src_url, dst_url, item.size, len(chunk))
                plain: bytes | memoryview = decryptor.update(chunk) if decryptor else chunk
                yield encryptor.update(plain) if encryptor else plain
            if not self.src.is_local:
                _check_checksum(stored_crc.hexdigest(), info, src_url)
            else:  # raised inside the stream: the upload of what may mix two versions is abandoned
                self._check_source_unchanged(item, src_url)
            if decryptor is not None:
                # IntegrityError here abandons the upload; what it returns is the last plaintext.
                rest = await asyncio.to_thread(decryptor.finalize)
                if rest:
                    yield encryptor.update(rest) if encryptor else rest
            if encryptor is not None:
                yield encryptor.finalize()

        if encryptor is not None:
            # The ciphertext's CRC is known only at the end; its GCM tags protect it instead.
            options = _with_checksum(put, info, None, keep=crypt.marker(), content_type=OCTET_STREAM)
        else:  # the same bytes: the source's CRC32C (if any) still describes them
            ciphertext = crypt.detect(item.src_key, info.metadata) is not None
            head = None
            if not (ciphertext or put.content_type) and info.content_type in (None, DICOM_CONTENT_TYPE):
                head = await src_store.get_range(item.src_key, 0, 132)  # is it Part 10?
            options = _with_checksum(
                put,
                info,
                info.metadata.get(CHECKSUM_METADATA_KEY),
                keep=_markers(info),
                content_type=self._content_type(item, info, head, encrypted=ciphertext),
            )
        plan = self._upload_plan()
        async with self._budget.reserve(_HELD_PARTS_PER_SLOT * plan.part_size * plan.concurrency):
            result = await self.dst.store.put_stream(item.dst_key, chunks(), options, plan)
        self._wrote[item.src_key] = (options.metadata.get(CHECKSUM_METADATA_KEY), result.etag)

    async def _decrypting_download(
        self, item: TransferItem, info: ObjectInfo, fmt: Format, src_url: str, dst_url: str
    ) -> None:
        """An encrypted object decrypted in order into a partial file, renamed once authentic.

        The cipher runs in order, but the reads need not: parts are fetched ahead, a window of
        them in flight, and handed to the decryptor as their turn comes.
        """
        crypt = self.options.encryption or _NO_ENCRYPTION
        head = b"" if crypt.ring else await self.src.store.get_range(item.src_key, 0, 64)  # to name the key
        decryptor = crypt.decryptor(src_url, fmt, info.metadata, head)
        size = info.size
        # Smaller parts than plain downloads: each is held whole until its turn to be decrypted.
        part = min(self.options.part_size, 4 * MiB)
        # Held at once: the parts in flight, the one being decrypted, and the decryptor's output.
        window = max(1, min(self.options.part_concurrency, self.options.memory_budget // (3 * part) - 1))
        stored_crc = Crc32c()
        writer = self.dst.store.open_writer(item.dst_key, 0)
        src_store = self.src.store
        offsets = iter(range(0, size, part))
        ahead: collections.deque[asyncio.Task[bytes | memoryview]] = collections.deque()

        def launch() -> None:
            start = next(offsets, None)
            if start is not None:
                ahead.append(
                    asyncio.create_task(src_store.get_range(item.src_key, start, min(start + part, size)))
                )

        def decrypt_and_write(position: int, data: bytes | memoryview) -> int:
            stored_crc.update(data)
            plain = decryptor.update(data)
            writer.write_at(position, plain)
            return len(plain)

        try:
            async with self._budget.reserve((window + 2) * part):
                try:
                    for _ in range(window):
                        launch()
                    position = 0
                    while ahead:
                        data = await ahead.popleft()
                        launch()
                        position += await asyncio.to_thread(decrypt_and_write, position, data)
                        self._progress(src_url, dst_url, size, len(data))
                finally:
                    # The reads ahead hold memory: they end before the budget is given back.
                    for task in ahead:
                        task.cancel()
                    await asyncio.gather(*ahead, return_exceptions=True)
            _check_checksum(stored_crc.hexdigest(), info, src_url)
            rest = await asyncio.to_thread(decryptor.finalize)
            if rest:
                await asyncio.to_thread(writer.write_at, position, rest)
            await asyncio.to_thread(writer.commit, self.options.no_overwrite)
        except BaseException:
            writer.abort()
            raise


def _deidentified_identity(identity: DicomIdentity, options: DeidentifyOptions) -> DicomIdentity:
    """The identity the de-identified instance will have: UIDs remapped, patient data gone."""
    from .dicom.deidentify import new_uid

    def remap(uid: str | None) -> str | None:
        return new_uid(options.secret, uid) if uid else uid

    return replace(
        identity,
        study_instance_uid=remap(identity.study_instance_uid),
        series_instance_uid=remap(identity.series_instance_uid),
        sop_instance_uid=remap(identity.sop_instance_uid) or identity.sop_instance_uid,
        patient_id=None,
        accession_number=None,
        study_date=None,
        extra={},
    )


def _write_and_hash(writer: RandomAccessWriter, offset: int, chunk: bytes | memoryview, crc: int) -> int:
    writer.write_at(offset, chunk)
    return crc32c_update(crc, chunk)


class EtagMismatch(IntegrityError):
    """The bytes' MD5 differs from an ETag that looks like one. Either the bytes were damaged, or the
    ETag is not an MD5 at all (SSE-KMS and SSE-C objects written by other tools): a second read tells."""


def verify(data: bytes | memoryview, info: ObjectInfo, where: str, *, etag_is_md5: bool = False) -> str:
    """Check whole-object bytes against what the store said of them; return their CRC32C."""
    if len(data) != info.size:
        raise IntegrityError(f"{where}: got {len(data)} bytes, expected {info.size}")
    checksum = crc32c_hex(data)
    if info.metadata.get(CHECKSUM_METADATA_KEY):
        _check_checksum(checksum, info, where)
    elif (
        etag_is_md5
        # Objects written by other tools: a plain single-part S3 ETag is the MD5 of the bytes.
        and (etag := md5_etag(info.etag)) is not None
        and hashlib.md5(data, usedforsecurity=False).hexdigest() != etag
    ):
        raise EtagMismatch(f"{where}: MD5 does not match the ETag")
    return checksum


def _check_checksum(actual: str, info: ObjectInfo, where: str) -> None:
    stored = info.metadata.get(CHECKSUM_METADATA_KEY)
    if stored and stored.lower() != actual:
        raise IntegrityError(f"{where}: CRC32C mismatch (stored {stored}, got {actual})")


#: Metadata dicom-cloud computes for each write; never carried over from the source object.
_OWN_METADATA = (CHECKSUM_METADATA_KEY, FORMAT_METADATA_KEY, KEY_ID_METADATA_KEY)


def _markers(info: ObjectInfo) -> dict[str, str]:
    """The encryption markers of an object, to carry along when its ciphertext is copied as is."""
    return {k: v for k, v in info.metadata.items() if k in (FORMAT_METADATA_KEY, KEY_ID_METADATA_KEY)}


def _with_checksum(
    put: PutOptions,
    source: ObjectInfo | None,
    checksum: str | None,
    *,
    keep: dict[str, str] | None = None,
    content_type: str | None = None,
) -> PutOptions:
    """What to write with an object: the source's own metadata carried over (a copy or a rekey keeps
    it), the user's additions, the encryption markers, the CRC32C of the bytes written when it is
    known, and the content type (the user's, else the one found for these bytes)."""
    carried = {k: v for k, v in (source.metadata if source else {}).items() if k not in _OWN_METADATA}
    metadata = {**carried, **put.metadata, **(keep or {})}
    if checksum:
        metadata[CHECKSUM_METADATA_KEY] = checksum
    chosen = put.content_type or content_type or (source.content_type if source else None) or OCTET_STREAM
    return replace(put, metadata=metadata, content_type=chosen)


def _has_metadata(existing: ObjectInfo, put: PutOptions) -> bool:
    """Whether an object already carries what ``put`` would write with it (object tags cannot be read
    back everywhere: with tags, it is written again)."""
    if put.tags:
        return False
    if put.content_type and existing.content_type and existing.content_type != put.content_type:
        return False
    return all(existing.metadata.get(key) == value for key, value in put.metadata.items())


def _beside(key: str, crc: str) -> str:
    """Where keep-both writes other bytes met under ``key``: ``name~<crc32c>.ext`` (stable across runs)."""
    stem, dot, ext = key.rpartition(".")
    return f"{stem}~{crc}.{ext}" if dot and "/" not in ext else f"{key}~{crc}"


async def _close(items: AsyncIterator[TransferItem]) -> None:
    """Close an async generator now (its ``finally`` runs in this task), not when it is collected."""
    close = getattr(items, "aclose", None)
    if close is not None:
        await close()


def _check_confined(dst: Location, key: str) -> None:
    """The directory a download writes into must resolve inside the destination: a symbolic link
    already in the destination must not carry a file out of it."""
    if not resolves_within("/" + dst.prefix, "/" + key):
        raise UnsafeNameError(f"/{key} would be written outside /{dst.prefix} (through a symbolic link)")


def _check_faithful_names(src: Location, dst: Location, item: TransferItem) -> None:
    """Refuse names that would not survive the trip: too long for an object store, or folded by
    Unicode normalisation into another file's name (names.py)."""
    if not dst.is_local:
        check_object_key(item.dst_key, dst.display(item.dst_key))
        if src.is_local and item.relative is not None and item.src_key.startswith(src.prefix):
            twin = nfc_twin("/" + src.prefix, item.src_key[len(src.prefix) :])
            if twin is not None:
                raise UnsafeNameError(
                    f"/{item.src_key} and {twin} have the same name once normalised to NFC "
                    f"({dst.display(item.dst_key)}); only the NFC spelling is uploaded",
                    hint="rename one of the two files",
                )
    elif not src.is_local:
        existing = other_spelling_on_disk("/" + item.dst_key)
        if existing is not None:
            raise UnsafeNameError(
                f"{src.display(item.src_key)} would replace {existing}: this file system folds "
                "the two spellings into one name",
                hint="download the two objects into different directories",
            )
