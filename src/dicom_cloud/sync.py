"""Making one tree match another (``sync``), or two trees match each other (``--bidirectional``),
and checking that they do (``verify``).

A sync plans by comparing the two listings (treediff.py), then hands the objects to copy to the
transfer engine and deletes last, only when every copy succeeded. Its state lives in the job's
journal (journal.py, table ``entries``): for each name, the versions of both sides when they were
last known equal, and the content's CRC32C. That is what makes a second sync of an unchanged tree
cost only two listings, what lets an interrupted sync resume (finished objects are recorded as they
finish), and what a bidirectional sync compares against to tell a new file from a deleted one.

Bidirectional rules (docs/sync.md): a name changed on one side only is copied to the other; a name
deleted on one side and unchanged on the other is deleted there; changed on one side and deleted on
the other: the change wins (copied back); changed on both sides with different content: a
conflict, resolved by ``--conflict`` (default ``keep-both``: the newer version keeps the name on
both sides, the older is kept beside it as ``<name>.conflict-<UTC time><ext>``). The first run (no
state yet) deletes nothing: it is a union of both trees.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import sqlite3
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from .deletelimit import DEFAULT_MAX_DELETE, check_delete_limit, parse_max_delete
from .errors import DicomCloudError, NotSupportedError, UsageError
from .filters import Filter
from .journal import Journal
from .location import Location
from .store import ObjectInfo
from .transfer import (
    DoneCallback,
    EventCallback,
    Transfer,
    TransferEvent,
    TransferItem,
    TransferOptions,
    TransferSummary,
    object_version,
)
from .treediff import Comparison, create_tables, same_content, spill

ConflictPolicy = Literal["keep-both", "newer", "source", "destination"]
#: Called with each planned action ("create", "update", "delete", "conflict") and its name, size.
PlanCallback = Callable[[str, str, int], None]

_CHUNK = 500


@dataclass(frozen=True)
class SyncOptions:
    #: Remove destination objects that the source does not have (one-way sync).
    delete: bool = False
    #: The most a run may delete: a count ("1000") or a share of the tree ("50%").
    max_delete: str = DEFAULT_MAX_DELETE
    bidirectional: bool = False
    conflict: ConflictPolicy = "keep-both"
    #: Which names take part (include/exclude globs): others are neither copied nor deleted.
    name_filter: Filter | None = None
    #: Compare the content of every pair of equal size, as ``verify`` does (reading what no checksum
    #: can tell), instead of trusting the journal's record of versions last seen equal.
    checksum: bool = False


@dataclass
class SyncSummary:
    created: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    conflicts: int = 0
    #: The transfers' own summaries (one per direction).
    transfers: list[TransferSummary] = field(default_factory=list)
    seconds: float = 0.0
    dry_run: bool = False

    @property
    def failed(self) -> list[tuple[str, DicomCloudError]]:
        return [failure for summary in self.transfers for failure in summary.failed]

    @property
    def bytes(self) -> int:
        return sum(summary.bytes for summary in self.transfers)


class _Plan:
    """The temporary tables of one sync run inside the job's database."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        create_tables(db, "side_a", "side_b")
        db.execute("DROP TABLE IF EXISTS temp.plan")
        db.execute(
            "CREATE TEMP TABLE plan (id INTEGER PRIMARY KEY, rel TEXT NOT NULL, action TEXT NOT NULL,"
            " a_key TEXT, a_size INTEGER, a_sig TEXT, a_mtime REAL,"
            " b_key TEXT, b_size INTEGER, b_sig TEXT, b_mtime REAL,"
            " e_a_sig TEXT, e_b_sig TEXT, has_entry INTEGER NOT NULL)"
        )

    def chunks(self, actions: tuple[str, ...]) -> AsyncIterator[list[sqlite3.Row]]:
        return self._chunks(actions)

    async def _chunks(self, actions: tuple[str, ...]) -> AsyncIterator[list[sqlite3.Row]]:
        last = 0
        marks = ",".join("?" for _ in actions)
        while True:
            # A chunk is fetched whole: no cursor stays open while the journal writes and commits.
            batch = self.db.execute(
                f"SELECT * FROM plan WHERE id > ? AND action IN ({marks}) ORDER BY id LIMIT {_CHUNK}",  # noqa: S608
                (last, *actions),
            ).fetchall()
            if not batch:
                return
            last = batch[-1]["id"]
            yield batch
            await asyncio.sleep(0)

    def count(self, action: str) -> int:
        return int(self.db.execute("SELECT count(*) FROM plan WHERE action = ?", (action,)).fetchone()[0])


class Copier(Protocol):
    """Runs the copies of a sync's plan (``items``, in plan order) from ``src`` to ``dst``, telling
    ``on_done`` of each object written, as the transfer engine does in this process; upload
    sessions are kept in ``sessions`` (the sync's job file)."""

    async def __call__(
        self,
        src: Location,
        dst: Location,
        items: AsyncIterator[TransferItem],
        on_done: DoneCallback,
        on_event: EventCallback | None,
        sessions: Journal,
    ) -> TransferSummary: ...


class Sync:
    """One run of ``sync`` from ``a`` (the source) to ``b`` (the destination), or between both."""

    def __init__(
        self,
        a: Location,
        b: Location,
        journal: Journal,
        *,
        transfer: TransferOptions,
        options: SyncOptions,
        on_event: EventCallback | None = None,
        on_plan: PlanCallback | None = None,
        copier: Copier | None = None,
    ) -> None:
        if transfer.dicom is not None or transfer.deidentify is not None:
            raise UsageError(
                "sync copies names as they are: --layout, --dicom-tags and --deidentify do not apply",
                hint="use upload or copy for DICOM-aware writes",
            )
        self.a, self.b = a, b
        self.journal = journal
        self.db = journal.db
        self.db.row_factory = sqlite3.Row
        self.transfer = transfer
        self.options = options
        self.on_event = on_event
        self.on_plan = on_plan
        #: Runs the plan's copies elsewhere (a cluster's workers) instead of in this process.
        self.copier = copier
        self.summary = SyncSummary(dry_run=transfer.dry_run)
        # With client-side encryption the stored bytes are not the source's: only the journal's record
        # of earlier copies can tell an object is up to date, never its size or checksum.
        self.compare_content = not (transfer.encryption and transfer.encryption.writes_encrypted)
        if options.checksum and not self.compare_content:
            raise UsageError(
                "--checksum cannot compare client-side encrypted copies with their sources",
                hint="their stored bytes differ by design; run sync without --checksum",
            )
        self._stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")

    # -- the run ----------------------------------------------------------------------

    async def run(self) -> SyncSummary:
        started = time.monotonic()
        try:
            plan = _Plan(self.db)
            total_a, total_b = await asyncio.gather(
                spill(
                    self.db,
                    "side_a",
                    self.a,
                    nfc=self.a.is_local and not self.b.is_local,
                    name_filter=self.options.name_filter,
                ),
                spill(
                    self.db,
                    "side_b",
                    self.b,
                    nfc=self.b.is_local and not self.a.is_local,
                    name_filter=self.options.name_filter,
                ),
            )
            self._fill_plan(plan)
            if self.options.bidirectional:
                await self._bidirectional(plan, total_a, total_b)
            else:
                await self._one_way(plan, total_b)
        finally:
            self.summary.seconds = time.monotonic() - started
        return self.summary

    def _fill_plan(self, plan: _Plan) -> None:
        """Every name of either side or of the journal, with what each says of it, sorted by name."""
        self.db.execute(
            "INSERT INTO plan (rel, action, a_key, a_size, a_sig, a_mtime, b_key, b_size, b_sig, b_mtime,"
            " e_a_sig, e_b_sig, has_entry)"
            " SELECT n.rel, '?', a.key, a.size, a.sig, a.mtime, b.key, b.size, b.sig, b.mtime,"
            " e.src_sig, e.dst_sig, e.rel IS NOT NULL"
            " FROM (SELECT rel FROM side_a UNION SELECT rel FROM side_b) n"
            " LEFT JOIN side_a a ON a.rel = n.rel LEFT JOIN side_b b ON b.rel = n.rel"
            " LEFT JOIN main.entries e ON e.rel = n.rel ORDER BY n.rel"
        )

    # -- one way ----------------------------------------------------------------------

    async def _one_way(self, plan: _Plan, total_b: int) -> None:
        db = self.db
        db.execute(
            "UPDATE plan SET action = CASE"
            " WHEN a_key IS NULL THEN 'delete'"
            " WHEN b_key IS NULL THEN 'create'"
            " WHEN NOT ? AND has_entry AND e_a_sig = a_sig AND e_b_sig = b_sig THEN 'same'"
            " WHEN ? AND a_size != b_size THEN 'update'"
            " ELSE 'compare' END",
            (int(self.options.checksum), int(self.compare_content)),
        )
        if not self.options.delete:
            db.execute("UPDATE plan SET action = 'keep' WHERE action = 'delete'")
        deletions = plan.count("delete")
        check_delete_limit(deletions, total_b, self.options.max_delete, self.b.display(self.b.prefix))
        self._begin_if_work(plan)
        self.summary.unchanged += plan.count("same")
        summary = await self._copy(self.a, self.b, self._one_way_items(plan), "a")
        if self.options.delete and not summary.failed and not self.transfer.dry_run:
            await self._delete(plan, self.b, "delete", "b_key")
        elif self.transfer.dry_run:
            async for batch in plan.chunks(("delete",)):
                for row in batch:
                    self._planned("delete", row["rel"], row["b_size"])
                    self.summary.deleted += 1
        # Names that left both sides leave the journal too.
        if not self.transfer.dry_run:
            db.execute("DELETE FROM main.entries WHERE rel NOT IN (SELECT rel FROM side_a)")

    async def _one_way_items(self, plan: _Plan) -> AsyncIterator[TransferItem]:
        queue: asyncio.Queue[TransferItem | None] = asyncio.Queue(maxsize=self.transfer.parallel * 2)
        pending: set[asyncio.Task[None]] = set()

        async def produce() -> None:
            compares = asyncio.Semaphore(self.transfer.parallel)

            async def decide(row: sqlite3.Row) -> None:
                try:
                    result = await same_content(
                        self.a, row["a_key"], self.b, row["b_key"], thorough=self.options.checksum
                    )
                    if result.same:
                        self.summary.unchanged += 1
                        if not self.transfer.dry_run:
                            self.journal.set_entry(row["rel"], row["a_sig"], row["b_sig"], result.crc32c)
                        return
                    await self._enqueue(queue, row, "update", self.a, self.b, "a")
                finally:
                    compares.release()

            async for batch in plan.chunks(("create", "update", "compare")):
                for row in batch:
                    if row["action"] == "compare" and self.compare_content:
                        await compares.acquire()
                        task = asyncio.create_task(decide(row))
                        pending.add(task)
                        task.add_done_callback(pending.discard)
                        continue
                    action = "create" if row["action"] == "create" else "update"
                    await self._enqueue(queue, row, action, self.a, self.b, "a")
            await asyncio.gather(*list(pending))

        try:
            async with contextlib.aclosing(_drain(queue, produce())) as items:
                async for item in items:
                    yield item
        finally:
            # Stopped early: no comparison outlives the run (nor writes to its closed journal).
            for task in list(pending):
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _enqueue(
        self,
        queue: asyncio.Queue[TransferItem | None],
        row: sqlite3.Row,
        action: str,
        src: Location,
        dst: Location,
        side: Literal["a", "b"],
        *,
        rel: str | None = None,
        src_key: str | None = None,
    ) -> None:
        other = "b" if side == "a" else "a"
        name = rel or row["rel"]
        if action == "create":
            self.summary.created += 1
        elif action == "update":
            self.summary.updated += 1
        self._planned(action, name, row[f"{side}_size"])
        dst_key = row[f"{other}_key"] if rel is None and row[f"{other}_key"] else dst.join(name)
        await queue.put(
            TransferItem(
                src_key or row[f"{side}_key"], dst_key, row[f"{side}_size"], name, row[f"{side}_sig"]
            )
        )

    # -- both ways --------------------------------------------------------------------

    async def _bidirectional(self, plan: _Plan, total_a: int, total_b: int) -> None:
        db = self.db
        for which in ("a", "b"):
            store = (self.a if which == "a" else self.b).store
            if not (store.features.server_side_copy or (self.a if which == "a" else self.b).is_local):
                raise NotSupportedError(
                    f"{store.url()} cannot copy inside itself, needed for conflict copies"
                )
        # Per name: changed since the journal's record, gone since it, or unknown (no record). With
        # --checksum, versions unchanged on both sides are compared too: bytes that differ there
        # changed unseen on one side or the other, which only a conflict can settle.
        db.execute(
            "UPDATE plan SET action = CASE"
            " WHEN a_key IS NOT NULL AND b_key IS NOT NULL THEN CASE"
            "   WHEN has_entry AND e_a_sig = a_sig AND e_b_sig = b_sig THEN"
            "     CASE WHEN ? THEN 'compare' ELSE 'same' END"
            "   WHEN has_entry AND (e_a_sig IS NULL OR e_b_sig IS NULL) THEN 'compare'"
            "   WHEN has_entry AND e_a_sig IS a_sig THEN 'b2a'"
            "   WHEN has_entry AND e_b_sig IS b_sig THEN 'a2b'"
            "   ELSE 'compare' END"
            " WHEN a_key IS NOT NULL THEN CASE"
            "   WHEN has_entry AND e_b_sig IS NOT NULL AND e_a_sig IS a_sig THEN 'delete-a'"
            "   ELSE 'a2b' END"
            " WHEN b_key IS NOT NULL THEN CASE"
            "   WHEN has_entry AND e_a_sig IS NOT NULL AND e_b_sig IS b_sig THEN 'delete-b'"
            "   ELSE 'b2a' END"
            " ELSE 'gone' END",
            (int(self.options.checksum),),
        )
        check_delete_limit(
            plan.count("delete-a"), total_a, self.options.max_delete, self.a.display(self.a.prefix)
        )
        check_delete_limit(
            plan.count("delete-b"), total_b, self.options.max_delete, self.b.display(self.b.prefix)
        )
        self._begin_if_work(plan)
        self.summary.unchanged += plan.count("same")
        # Decide the unknowns (both present, both changed or never seen): same bytes, or a conflict.
        # Sizes first, as everywhere: other sizes differ without a request (unless client-side
        # encryption makes stored sizes say nothing of the content).
        async for batch in plan.chunks(("compare",)):
            results = await asyncio.gather(
                *(
                    same_content(self.a, row["a_key"], self.b, row["b_key"], thorough=self.options.checksum)
                    if row["a_size"] == row["b_size"] or not self.compare_content
                    else _different()
                    for row in batch
                )
            )
            for row, result in zip(batch, results, strict=True):
                if result.same:
                    self.summary.unchanged += 1
                    action = "same"
                    if not self.transfer.dry_run:
                        self.journal.set_entry(row["rel"], row["a_sig"], row["b_sig"], result.crc32c)
                else:
                    action = await self._resolve_conflict(row)
                db.execute("UPDATE plan SET action = ? WHERE id = ?", (action, row["id"]))
        a2b = await self._copy(self.a, self.b, self._direction_items(plan, "a2b", "a"), "a")
        b2a = await self._copy(self.b, self.a, self._direction_items(plan, "b2a", "b"), "b")
        if self.transfer.dry_run:
            for action in ("delete-a", "delete-b"):
                async for batch in plan.chunks((action,)):
                    for row in batch:
                        self._planned(action, row["rel"], row["a_size" if action == "delete-a" else "b_size"])
                        self.summary.deleted += 1
            return
        if not (a2b.failed or b2a.failed):
            await self._delete(plan, self.a, "delete-a", "a_key")
            await self._delete(plan, self.b, "delete-b", "b_key")
            db.execute("DELETE FROM main.entries WHERE rel IN (SELECT rel FROM plan WHERE action = 'gone')")

    async def _resolve_conflict(self, row: sqlite3.Row) -> str:
        """Both sides changed with different bytes: pick the winner; keep the loser beside it if asked."""
        self.summary.conflicts += 1
        policy = self.options.conflict
        if policy == "source":
            winner = "a"
        elif policy == "destination":
            winner = "b"
        else:
            winner = "a" if (row["a_mtime"] or 0) >= (row["b_mtime"] or 0) else "b"
        self._planned("conflict", row["rel"], row[f"{winner}_size"])
        if policy == "keep-both":
            loser = "b" if winner == "a" else "a"
            side = self.b if loser == "b" else self.a
            kept = _conflict_name(row["rel"], self._stamp)
            if not self.transfer.dry_run:
                # The loser's bytes are copied aside on its own side first: nothing is overwritten
                # before it is safe; the next run carries the copy to the other side.
                await side.store.copy(row[f"{loser}_key"], side.join(kept))
        return "a2b" if winner == "a" else "b2a"

    async def _direction_items(
        self, plan: _Plan, action: str, side: Literal["a", "b"]
    ) -> AsyncIterator[TransferItem]:
        queue: asyncio.Queue[TransferItem | None] = asyncio.Queue(maxsize=self.transfer.parallel * 2)
        src, dst = (self.a, self.b) if side == "a" else (self.b, self.a)

        async def produce() -> None:
            async for batch in plan.chunks((action,)):
                for row in batch:
                    present = row["b_key" if side == "a" else "a_key"] is not None
                    await self._enqueue(queue, row, "update" if present else "create", src, dst, side)

        # Closed with this generator (not when collected): its producer task ends with it.
        async with contextlib.aclosing(_drain(queue, produce())) as items:
            async for item in items:
                yield item

    # -- shared steps -----------------------------------------------------------------

    async def _copy(
        self, src: Location, dst: Location, items: AsyncIterator[TransferItem], side: Literal["a", "b"]
    ) -> TransferSummary:
        def on_done(item: TransferItem, crc32c: str | None, etag: str | None) -> None:
            written = _written_version(dst, item, etag)
            rel = item.relative or ""
            a_sig, b_sig = (item.version, written) if side == "a" else (written, item.version)
            self.journal.set_entry(rel, a_sig, b_sig, crc32c)

        if self.copier is not None and not self.transfer.dry_run:
            summary = await self.copier(src, dst, items, on_done, self.on_event, self.journal)
        else:
            transfer = Transfer(
                src,
                dst,
                recursive=True,
                options=self.transfer,
                on_event=self.on_event,
                items=items,
                on_done=on_done,
                # The sync records what it copied itself (its entries), so the job file keeps
                # no finished objects; it keeps the upload sessions, as every job's does.
                sessions=self.journal,
            )
            summary = await transfer.run()
        self.summary.transfers.append(summary)
        return summary

    async def _delete(self, plan: _Plan, side: Location, action: str, key_column: str) -> None:
        async for batch in plan.chunks((action,)):
            keys = [row[key_column] for row in batch]
            await side.store.delete(keys)
            for row in batch:
                self.journal.drop_entry(row["rel"])
                self.summary.deleted += 1
                if self.on_event is not None:
                    size = row["a_size" if key_column == "a_key" else "b_size"]
                    self.on_event(TransferEvent("deleted", side.display(row[key_column]), "", size))

    def _begin_if_work(self, plan: _Plan) -> None:
        """A plan that passed its checks and holds work: from here on the run is a job to resume."""
        idle = ("same", "keep", "gone")
        if plan.db.execute("SELECT 1 FROM plan WHERE action NOT IN (?, ?, ?) LIMIT 1", idle).fetchone():
            self.journal.begin()

    def _planned(self, action: str, rel: str, size: int | None) -> None:
        if self.on_plan is not None and self.transfer.dry_run:
            self.on_plan(action, rel, size or 0)


async def _drain(
    queue: asyncio.Queue[TransferItem | None], producer: Coroutine[Any, Any, None]
) -> AsyncGenerator[TransferItem, None]:
    """Yield what ``producer`` (a coroutine filling ``queue``) puts in it; its errors propagate."""

    async def run() -> None:
        try:
            await producer
        finally:
            # Cancelled (the consumer has gone, or the run was interrupted): nobody waits for the end
            # mark, and waiting for room in a full queue would never end.
            this = asyncio.current_task()
            if this is None or not this.cancelling():
                await queue.put(None)

    task = asyncio.create_task(run())
    try:
        while (item := await queue.get()) is not None:
            yield item
        await task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _different() -> Comparison:
    """The comparison of two objects of other sizes, awaitable beside real ones."""
    return Comparison(False)


def _written_version(dst: Location, item: TransferItem, etag: str | None) -> str | None:
    """The destination's version of what was just written, as its next listing will show it."""
    if dst.is_local:
        try:
            st = os.stat("/" + item.dst_key)
        except OSError:
            return None
        return object_version(
            ObjectInfo(item.dst_key, st.st_size, last_modified=datetime.fromtimestamp(st.st_mtime, tz=UTC))
        )
    return object_version(ObjectInfo(item.dst_key, item.size, etag=etag)) if etag else None


def _conflict_name(rel: str, stamp: str) -> str:
    directory, name = posixpath.split(rel)
    stem, ext = posixpath.splitext(name)
    kept = f"{stem}.conflict-{stamp}{ext}"
    return posixpath.join(directory, kept) if directory else kept


__all__ = [
    "DEFAULT_MAX_DELETE",
    "ConflictPolicy",
    "Sync",
    "SyncOptions",
    "SyncSummary",
    "check_delete_limit",
    "parse_max_delete",
]
