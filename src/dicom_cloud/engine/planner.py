"""The planner: (source, destination, recursive) -> a stream of ``TransferItem``.

It stats one object or streams a listing, so memory does not grow with the number of objects.
``counted`` events tell the totals (and what an earlier run of the job finished) before the first
transfer ends. A listing that ends within its first ``COUNTED_EVERY`` objects is counted from
those, before the first is handed on (one listing). A longer one gets a counting pass beside the
planner, listing the source once more, ahead of it, keeping only counts; the planner never
overtakes it (``CountAhead``)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import unicodedata
from collections.abc import AsyncIterator, Callable

from ..errors import NotFoundError, UsageError
from ..journal import Journal
from ..localio import check_local_name, counting_listing
from ..location import Location
from ..store import ObjectInfo
from .model import ListingTotals, TransferEvent, TransferItem, TransferOptions, object_version

log = logging.getLogger(__name__)

#: The counting pass reports its totals every so many objects, or this often, whichever comes first.
COUNTED_EVERY = 1000
COUNTED_INTERVAL = 0.5


class CountAhead:
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


async def close_items(items: AsyncIterator[TransferItem]) -> None:
    """Close an async generator now (its ``finally`` runs in this task), not when it is collected."""
    close = getattr(items, "aclose", None)
    if close is not None:
        await close()


class Planner:
    """Streams the items of one run; ``close`` ends its counting pass."""

    def __init__(
        self,
        src: Location,
        dst: Location,
        *,
        recursive: bool,
        options: TransferOptions,
        journal: Journal | None,
        emit: Callable[[TransferEvent], None],
        items: AsyncIterator[TransferItem] | None = None,
    ) -> None:
        self.src = src
        self.dst = dst
        self.recursive = recursive
        self.options = options
        self.journal = journal
        self._emit = emit
        #: Items planned by the caller (sync) instead of a listing of the source.
        self._items = items
        #: The counting pass of a listing, while it runs.
        self._counting: asyncio.Task[None] | None = None

    async def preflight(self) -> None:
        """Fail before any work when the destination bucket is missing or the credentials are wrong."""
        if self.dst.is_local:
            return
        key = self.dst.key
        directory = key if self.dst.names_directory or self.recursive else key.rpartition("/")[0]
        # A recursive listing streams: only its first page is fetched, however large the bucket.
        async for _ in self.dst.store.list(f"{directory.rstrip('/')}/" if directory.strip("/") else ""):
            break

    async def close(self) -> None:
        if self._counting is not None:
            self._counting.cancel()
            await asyncio.gather(self._counting, return_exceptions=True)

    async def plan(self) -> AsyncIterator[TransferItem]:
        """The items to transfer, streamed from a stat or a listing of the source."""
        if self._items is not None:
            try:
                async for item in self._items:
                    yield item
            finally:
                await close_items(self._items)
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
            # The first COUNTED_EVERY objects are listed before any is handed on: a source that
            # ends within them (a study, a series) is counted from them, listed once. A longer one
            # gets the counting pass, which lists it again ahead of the planner.
            listing = self.src.store.list(prefix)
            head: list[TransferItem] = []
            ended = True
            async for info in listing:
                found = True
                listed = self._listed_item(info, prefix)
                if listed is not None:
                    head.append(listed)
                if len(head) >= COUNTED_EVERY:
                    ended = False
                    break
            lookahead: CountAhead | None = None
            if ended and not self.options.dry_run:
                tally = _Tally(self._finished_before())
                for listed in head:
                    tally.add(listed)
                self._report(prefix, tally, complete=True)
            elif not self.options.dry_run:
                lookahead = CountAhead()
                self._counting = asyncio.create_task(self._count_ahead(prefix, lookahead))
            index = 0
            async for listed in _chain(
                head, None if ended else listing, lambda i: self._listed_item(i, prefix)
            ):
                if lookahead is not None:
                    # The first item waits for a first count (a listing page), so that a total is
                    # known before anything completes; the others only for their own count.
                    await lookahead.reach(index or COUNTED_EVERY - 1)
                index += 1
                yield listed
            if not found:
                await self._explain_empty_source()
            return
        info = await self.src.stat_object("transfer")
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

    async def _count_ahead(self, prefix: str, lookahead: CountAhead) -> None:
        """List the source once more, keeping only counts, and report them as ``counted`` events.

        Memory stays flat in the number of objects: nothing but the totals is kept. A failure of
        this listing only ends the counting: the planner's own listing reports listing errors.
        """
        counting_listing.set(True)  # this task's own context: the planner's listing gives the warnings
        tally = _Tally(self._finished_before())
        last_report = time.monotonic()
        try:
            async for info in self.src.store.list(prefix):
                item = self._listed_item(info, prefix)
                if item is None:
                    continue
                tally.add(item)
                lookahead.advance(tally.files)
                now = time.monotonic()
                if tally.files % COUNTED_EVERY == 0 or now - last_report >= COUNTED_INTERVAL:
                    last_report = now
                    self._report(prefix, tally)
        except Exception as exc:
            log.debug("counting %s stopped: %s", self.src.display(prefix), exc)
            return
        finally:
            lookahead.finish()
        self._report(prefix, tally, complete=True)

    def _finished_before(self) -> Journal | None:
        """The job's journal when an earlier run of it finished objects (which are counted apart)."""
        return self.journal if self.journal is not None and self.journal.previously_done else None

    def _report(self, prefix: str, tally: _Tally, *, complete: bool = False) -> None:
        totals = ListingTotals(tally.files, tally.size, tally.done, tally.done_bytes, complete=complete)
        src_url, dst_url = self.src.display(prefix), self.dst.display(self.dst.prefix)
        self._emit(TransferEvent("counted", src_url, dst_url, tally.size, totals=totals))

    def _source_is_file(self) -> bool:
        return self.src.is_local and os.path.isfile("/" + self.src.key)

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


class _Tally:
    """The counts of a listing so far, with what an earlier run of the job finished (``journal``)."""

    def __init__(self, journal: Journal | None) -> None:
        self.journal = journal
        self.files = self.size = self.done = self.done_bytes = 0

    def add(self, item: TransferItem) -> None:
        self.files += 1
        self.size += item.size
        if self.journal is not None and self.journal.is_done(item.src_key, item.version):
            self.done += 1
            self.done_bytes += item.size


async def _chain(
    head: list[TransferItem],
    rest: AsyncIterator[ObjectInfo] | None,
    item_of: Callable[[ObjectInfo], TransferItem | None],
) -> AsyncIterator[TransferItem]:
    """The items listed already, then those of the rest of the listing."""
    for item in head:
        yield item
    if rest is not None:
        async for info in rest:
            listed = item_of(info)
            if listed is not None:
                yield listed
