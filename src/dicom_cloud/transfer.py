"""The transfer engine: moves one object or a whole tree between any two locations.

``Transfer`` only puts the parts of ``dicom_cloud.engine`` together (the map is in
docs/ARCHITECTURE.md):

1. the planner (``engine/planner.py``) turns (source, destination, recursive) into a stream of
   :class:`TransferItem` from a stat or a listing, with a counting pass ahead of it;
2. ``parallel`` workers take items from a bounded queue; each item's attempts run inside the
   wrappers (``engine/wrappers.py``: journal, retries, throttling);
3. an attempt prepares the source (``engine/source.py``: local files that change, the DICOM
   policy), claims the destination name, and the router (``engine/routes.py``) picks the route
   that moves the bytes and returns what it wrote;
4. accounting (``engine/accounting.py``) turns the outcome into the summary's counts, events,
   manifest rows and ``on_done`` calls.

Every object written gets a CRC32C of its content in its metadata; every read that finds one (or
an MD5 ETag) checks the bytes against it before they are written anywhere, and local files appear
under their final name only once complete.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING

from .budget import ByteBudget
from .checksum import crc32c_hex
from .crypto.envelope import ClientEncryption
from .engine.accounting import Accounting
from .engine.destination import DestinationCheck, NameClaims
from .engine.model import (
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_MULTIPART_THRESHOLD,
    DEFAULT_PARALLEL,
    DEFAULT_PART_CONCURRENCY,
    DEFAULT_PART_SIZE,
    DICOM_CONTENT_TYPE,
    FATAL,
    OCTET_STREAM,
    Attempt,
    ConflictPolicy,
    DoneCallback,
    EventCallback,
    EventKind,
    ListingTotals,
    MiB,
    Skip,
    TransferEvent,
    TransferItem,
    TransferOptions,
    TransferSummary,
    Written,
    object_version,
)
from .engine.objectmeta import EtagMismatch, verify
from .engine.planner import Planner, close_items
from .engine.routes import RouteContext, Router
from .engine.source import apply_dicom_policy, header_only, open_source, skip_unless_rekey_needed
from .engine.wrappers import Journaled, Retrying, Throttled
from .errors import (
    AlreadyExistsError,
    ConflictError,
    DicomCloudError,
    NetworkError,
    PermissionDeniedError,
    UnreadableFileError,
    UnsafeNameError,
)
from .journal import Journal
from .localio import check_local_name, resolves_within
from .location import Location
from .names import check_object_key, nfc_twin, other_spelling_on_disk
from .resumable import StateStore
from .retry import RetryPolicy
from .throttle import AdaptiveLimiter

if TYPE_CHECKING:
    from .dicom.manifest import ManifestWriter

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_MULTIPART_THRESHOLD",
    "DEFAULT_PARALLEL",
    "DEFAULT_PART_CONCURRENCY",
    "DEFAULT_PART_SIZE",
    "DICOM_CONTENT_TYPE",
    "OCTET_STREAM",
    "ConflictPolicy",
    "DoneCallback",
    "EtagMismatch",
    "EventCallback",
    "EventKind",
    "ListingTotals",
    "MiB",
    "Transfer",
    "TransferEvent",
    "TransferItem",
    "TransferOptions",
    "TransferSummary",
    "check_local_name",
    "crc32c_hex",
    "object_version",
    "verify",
]

log = logging.getLogger(__name__)

_NO_ENCRYPTION = ClientEncryption()


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
        sessions: StateStore | None = None,
        items: AsyncIterator[TransferItem] | None = None,
        on_done: DoneCallback | None = None,
        items_listed: bool = False,
        preflight: bool = True,
    ) -> None:
        """``items``: what to transfer, planned by the caller instead of a listing of ``src``.
        ``items_listed``: they are a listing's items as the planner makes them (a partition of a
        run on a cluster), to be checked against the destination as a listing's are. ``preflight``:
        False where the caller has checked the destination already (a cluster's client, once for
        all its partitions: a listing per partition costs the store more than the partition's
        small objects). ``sessions``: where upload sessions are kept when they are not in
        ``journal`` (a sync keeps no finished objects there, but its uploads are resumable and
        its streamed copies leave nothing unfinished behind a killed process)."""
        self.src = src
        self.dst = dst
        self.recursive = recursive
        self.options = options or TransferOptions()
        #: Finished objects of earlier runs of this job are skipped; finished ones are recorded.
        self.journal = journal
        self.summary = TransferSummary(dry_run=self.options.dry_run)
        self._accounting = Accounting(self.summary, on_event, manifest, on_done, dst.display)
        self._abort: DicomCloudError | None = None
        self._preflight = preflight
        self._planner = Planner(
            src,
            dst,
            recursive=recursive,
            options=self.options,
            journal=journal,
            emit=self._accounting.emit,
            items=items,
        )
        crypt = self.options.encryption or _NO_ENCRYPTION
        budget = ByteBudget(self.options.memory_budget)
        sessions = sessions if sessions is not None else journal
        context = RouteContext(src, dst, self.options, crypt, budget, self._accounting.progress, sessions)
        self._router = Router(
            context,
            DestinationCheck(dst, self.options, crypt, budget),
            checks_destination=self._checks_destination(
                caller_planned=items is not None and not items_listed
            ),
        )
        self._crypt = crypt
        #: Destination names being checked and written, one item at a time per name.
        self._claims = NameClaims()
        self._journaled = Journaled(journal) if journal is not None else None
        self._limiter = AdaptiveLimiter(self.options.parallel)
        self._throttled = Throttled(self._limiter)
        self._retrying = Retrying(RetryPolicy(attempts=self.options.attempts), stopping=self._stopping)

    def _stopping(self) -> bool:
        return self._abort is not None or self._accounting.callback_error is not None

    def _checks_destination(self, *, caller_planned: bool) -> bool:
        """Whether what is at each destination name is looked at before writing: always, except
        where the write itself decides (--no-overwrite is a conditional write; rekey rewrites in
        place) or where the caller planned updates knowingly (sync)."""
        if self.options.no_overwrite or self.options.rekey:
            return False
        return not (caller_planned and self.options.conflict_policy == "overwrite")

    async def run(self) -> TransferSummary:
        started = time.monotonic()
        if self._preflight:
            await self._planner.preflight()
        queue: asyncio.Queue[TransferItem | None] = asyncio.Queue(maxsize=self.options.parallel * 4)
        workers = [asyncio.create_task(self._worker(queue)) for _ in range(self.options.parallel)]
        items = self._planner.plan()
        try:
            async for item in items:
                if self._stopping():
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
            await close_items(items)
            await self._planner.close()
            self.summary.seconds = time.monotonic() - started
            self.summary.throttled = self._limiter.throttled
            self.summary.lowest_concurrency = self._limiter.lowest
        callback_error = self._accounting.callback_error
        if callback_error is not None:
            raise callback_error
        if self._abort:
            raise self._abort
        return self.summary

    async def _worker(self, queue: asyncio.Queue[TransferItem | None]) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            if self._stopping():
                continue
            await self._run_item(item)

    async def _run_item(self, item: TransferItem) -> None:
        """One item through the wrappers: journal, retries, throttling; its outcome accounted once."""
        accounting = self._accounting
        src_url = self.src.display(item.src_key)
        dst_url = self.dst.display(item.dst_key)
        if self.options.dry_run:
            accounting.planned(item, src_url, dst_url)
            return
        if self._journaled is not None and self._journaled.done_before(item):
            accounting.resumed(item, src_url, dst_url)
            return
        accounting.started(item, src_url, dst_url)
        last = Attempt(item, src_url, dst_url)

        async def attempt_once() -> Written:
            nonlocal last
            last = Attempt(item, src_url, dst_url)  # nothing of a failed attempt carries over
            try:
                return await self._attempt(last)
            except (DicomCloudError, Skip):
                raise
            except Exception as unexpected:  # one object's bug must not stop the others
                log.debug("unexpected error transferring %s", src_url, exc_info=unexpected)
                raise DicomCloudError(f"{src_url}: unexpected error: {unexpected!r}") from None

        try:
            written = await self._retrying(
                attempt_once,
                what=src_url,
                on_retry=lambda _: accounting.take_back(src_url, dst_url, item.size),
            )
        except ConflictError as conflict:
            accounting.conflict_failed(last, item.size, conflict)
            return
        except AlreadyExistsError as exists:
            accounting.skipped(last, item.size, Skip(str(exists)))
            return
        except Skip as reason:
            accounting.skipped(last, item.size, reason)
            return
        except DicomCloudError as exc:
            if self._stops_the_run(exc):
                # The whole run stops with this error: it is reported once, by the caller.
                self._abort = self._abort or exc
                accounting.take_back(src_url, dst_url, item.size)
                return
            accounting.failed(last, item.size, exc)
            return
        if self._journaled is not None:
            self._journaled.record(item, written)
        accounting.completed(item, last, written)

    def _stops_the_run(self, exc: DicomCloudError) -> bool:
        """Errors after which no other item can succeed either. A permission refusal is one while
        nothing has succeeded yet (a store refusing the first objects refuses them all; a local
        file that cannot be read is that one file's failure), and so is a network failure that
        outlasted every retry of a tree's first object: the store is unreachable or refusing
        everything, better stop than wait out each remaining object."""
        nothing_yet = not self.summary.files
        return (
            isinstance(exc, FATAL)
            or (
                isinstance(exc, PermissionDeniedError)
                and not isinstance(exc, UnreadableFileError)
                and nothing_yet
            )
            or (isinstance(exc, NetworkError) and self.recursive and nothing_yet)
        )

    async def _attempt(self, attempt: Attempt) -> Written:
        item = attempt.item
        if self.dst.is_local and item.relative is not None:
            check_local_name(item.relative)
            _check_confined(self.dst, item.dst_key)
        _check_faithful_names(self.src, self.dst, item)
        return await self._throttled(lambda: self._move(attempt))

    async def _move(self, attempt: Attempt) -> Written:
        put = self.options.put
        if self.src.is_local:
            # First of all: a file that cannot be read, or vanished or changed since it was listed,
            # fails alone; what it is now is compared with what it is once read.
            attempt.snapshot = open_source(attempt.item, attempt.src_url)
        policy = self.options.dicom
        if policy is None and self.options.filter is not None and self.options.filter.needs_header:
            policy = header_only()
        if policy is not None:
            dicom_metadata = await apply_dicom_policy(policy, attempt, self.src, self.dst, self.options)
            put = replace(put, metadata={**dicom_metadata, **put.metadata})
        if self.options.rekey:
            await skip_unless_rekey_needed(self.src, self._crypt, attempt)
        async with self._claims.claim(attempt.item.dst_key) as claim:
            written = await self._router.move(attempt, put, claim)
            claim.writer = attempt.src_url
        return written


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
