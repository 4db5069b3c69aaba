"""The client of a run on a cluster: lists, partitions, submits, gathers.

The listing is the planner's, as in a local run (its counting pass included); partitions are
submitted as they fill, at most two per worker thread in flight, so the listing waits while the
cluster is busy and the client holds only those partitions. Each partition's result carries its
events, replayed here to the progress display in the order they happened, and its summary, added
to the run's. A partition whose worker died is run again by Dask on another worker (up to
``distributed.scheduler.allowed-failures`` times); the journal shared by the workers makes the new
attempt skip what the dead one finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from .. import extras
from ..api import JobRequest, open_journal, open_transfer_locations
from ..backends import StoreConfig
from ..engine.model import (
    DoneCallback,
    EventCallback,
    TransferEvent,
    TransferItem,
    TransferOptions,
    TransferSummary,
)
from ..engine.planner import Planner, close_items
from ..errors import DicomCloudError, NetworkError, UsageError
from ..journal import Journal
from ..location import Location, LocationOpener
from .partition import DEFAULT_PARTITION_BYTES, DEFAULT_PARTITION_ITEMS, Partition, partitions
from .pg_journal import PostgresJournal, check_journal_url, create_tables
from .spec import ClusterSpec
from .task import PartitionJob, PartitionResult, run_partition

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

#: Times a partition is started again after the worker running it died (Dask's allowed-failures,
#: for the scheduler of a local cluster; a remote scheduler has its own setting).
ALLOWED_FAILURES = 3
#: Partitions in flight per worker thread: one running, one waiting, so a worker never idles
#: between two partitions while the client holds little.
IN_FLIGHT_PER_THREAD = 2
#: Seconds the cluster has to close when the run ends or is interrupted (the command ends within
#: 2 s of Ctrl-C: whatever is left is not waited for).
CLOSE_TIMEOUT = 1.0
#: Seconds to wait for a remote scheduler to answer.
CONNECT_TIMEOUT = 10.0
#: Seconds the cluster has to close at the end of a run that was not interrupted.
CLOSE_TIMEOUT_ENDED = 10.0


async def transfer_on_cluster(
    verb: Literal["upload", "download", "copy"],
    source: str,
    destination: str,
    *,
    cluster: ClusterSpec,
    arguments: Mapping[str, Any],
    options: TransferOptions,
    config: StoreConfig,
    on_event: EventCallback | None = None,
    job: JobRequest | None = None,
    partition_items: int = DEFAULT_PARTITION_ITEMS,
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
    journal_url: str | None = None,
) -> TransferSummary:
    """A recursive upload, download or copy run as partitions on ``cluster``.

    ``arguments``: the command's parsed arguments (flags and file paths, JSON-able), from which
    each worker builds the same options as ``options``. ``journal_url``: the PostgreSQL database
    holding the job's finished objects (required for a remote cluster; a local one shares the
    job's SQLite file)."""
    extras.require("cluster", "--cluster")
    if journal_url is not None:
        check_journal_url(journal_url)
        if job is None:
            raise UsageError("--journal and --no-journal contradict each other", hint="drop one")
    elif not cluster.is_local:
        raise UsageError(
            f"--cluster {cluster} needs --journal postgresql://...: workers on other machines cannot "
            "share this machine's job file",
            hint="give a PostgreSQL database that the workers reach (docs/cluster.md)",
        )
    opener = LocationOpener(config)
    try:
        src, dst = open_transfer_locations(opener, source, destination, verb)
        journal = open_journal(job, verb, src, dst, True, options)
        done_records: Journal | None = journal
        try:
            if journal is not None and journal_url is not None:
                create_tables(journal_url)
                done_records = PostgresJournal(journal_url, journal.spec)
            run = _ClusterRun(cluster, on_event, journal, partition_items, partition_bytes)
            run.display = src.display
            planner = Planner(src, dst, recursive=True, options=options, journal=done_records, emit=run.emit)
            partition_job = PartitionJob(
                str(src.url),  # local paths made absolute: a worker's directory is not the client's
                str(dst.url),
                dict(arguments),
                journal_path=str(journal.path.resolve()) if journal is not None else None,
                journal_spec=journal.spec if journal is not None else None,
                journal_url=journal_url,
            )
            summary = await run.run(planner, partition_job)
        except BaseException:
            if done_records is not None and done_records is not journal:
                done_records.close()
            if journal is not None:
                journal.close()  # interrupted: the journal stays for the next run
            raise
        if done_records is not None and done_records is not journal:
            done_records.finish(failed=len(summary.failed))
        if journal is not None:
            journal.finish(failed=len(summary.failed))
        return summary
    finally:
        await opener.close()


class _ClusterRun:
    def __init__(
        self,
        cluster: ClusterSpec,
        on_event: EventCallback | None,
        journal: Journal | None,
        partition_items: int,
        partition_bytes: int,
    ) -> None:
        self.cluster = cluster
        #: How a source key is shown (in failures).
        self.display: Callable[[str], str] = str
        self.journal = journal
        self.summary = TransferSummary()
        self._on_event = on_event
        self._partition_items = partition_items
        self._partition_bytes = partition_bytes
        #: Told of each object written (sync records its state from them).
        self.on_done: DoneCallback | None = None
        #: Called once a partition's objects are told: commits what ``on_done`` recorded.
        self.recorded: Callable[[], None] | None = None
        self.abort: DicomCloudError | None = None
        self._run_id = uuid.uuid4().hex[:12]

    def emit(self, event: TransferEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)

    async def run(self, planner: Planner, job: PartitionJob) -> TransferSummary:
        started = time.monotonic()
        await planner.preflight()
        if self.journal is not None:
            self.journal.begin()
            self.journal.flush()
        items = planner.plan()
        try:
            async with ClusterSession(self.cluster) as session:
                await self.run_items(items, job, session)
        finally:
            await close_items(items)
            await planner.close()
            self.summary.seconds = time.monotonic() - started
        if self.abort is not None:
            raise self.abort
        return self.summary

    async def run_items(
        self, items: AsyncIterator[TransferItem], job: PartitionJob, session: ClusterSession
    ) -> None:
        """Partition ``items``, run the partitions on the cluster, account for their results."""
        in_flight: dict[asyncio.Future[PartitionResult], Partition] = {}
        try:
            async for partition in partitions(
                items, max_items=self._partition_items, max_bytes=self._partition_bytes
            ):
                client, limit = await session.client()
                while len(in_flight) >= limit and self.abort is None:
                    await self._gather(in_flight)
                if self.abort is not None:
                    break
                future = client.submit(
                    run_partition,
                    job,
                    partition.index,
                    partition.items,
                    key=f"dicom-cloud-{self._run_id}-{partition.index}",
                    pure=False,
                )
                in_flight[asyncio.ensure_future(_result(future))] = partition
            while in_flight and self.abort is None:
                await self._gather(in_flight)
        finally:
            for pending in in_flight:
                pending.cancel()

    async def _gather(self, in_flight: dict[asyncio.Future[PartitionResult], Partition]) -> None:
        """Wait for at least one partition to end, and account for those that did."""
        done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        for finished in done:
            partition = in_flight.pop(finished)
            try:
                result = finished.result()
            except Exception as exc:  # the task never returned: its worker died too often, or a bug
                self._lost(partition, exc)
                continue
            for event in result.events:
                self.emit(event.restore())
            if self.on_done is not None:
                for item, crc32c, etag in result.written:
                    self.on_done(item, crc32c, etag)
                if self.recorded is not None:
                    self.recorded()
            result.summary.add_to(self.summary)
            if result.abort is not None and self.abort is None:
                self.abort = result.abort.restore()

    def _lost(self, partition: Partition, exc: Exception) -> None:
        """Every object of a partition that did not come back fails (those that its attempts
        finished are in the journal: running the command again skips them)."""
        reason = _why_lost(exc)
        log.debug("partition %d lost", partition.index, exc_info=exc)
        for item in partition.items:
            src_url = self.display(item.src_key)
            error = DicomCloudError(f"{src_url}: {reason}", hint="run the same command again to resume")
            self.summary.failed.append((src_url, error))
            self.emit(TransferEvent("failed", src_url, item.dst_key, item.size, error=error))


def _why_lost(exc: Exception) -> str:
    if type(exc).__name__ == "KilledWorker":
        return f"the workers running its partition died {ALLOWED_FAILURES + 1} times"
    return f"its partition failed on the cluster: {exc!r}"


async def _result(future: Any) -> PartitionResult:
    result: PartitionResult = await future
    return result


class ClusterSession:
    """A connection to the cluster, made on first use (a run with nothing to move starts none) and
    kept for the rest of the command (a bidirectional sync copies twice)."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self._stack = contextlib.AsyncExitStack()
        self._client: Client | None = None
        self._limit = 1

    async def client(self) -> tuple[Client, int]:
        """The client, and how many partitions may be in flight."""
        if self._client is None:
            client = await self._stack.enter_async_context(_connect(self.spec))
            threads = self.spec.local_workers
            if not self.spec.is_local:
                threads = sum((await client.nthreads()).values())  # type: ignore[no-untyped-call]
            self._client = client
            self._limit = IN_FLIGHT_PER_THREAD * max(threads, 1)
        return self._client, self._limit

    async def __aenter__(self) -> ClusterSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


@contextlib.asynccontextmanager
async def _connect(spec: ClusterSpec) -> AsyncIterator[Client]:
    """A client of the cluster: for ``local:N``, a cluster of N worker processes started here and
    stopped on the way out (within CLOSE_TIMEOUT seconds, interrupted or not)."""
    import dask
    from distributed import Client, LocalCluster

    # Dask's own notices (nannies closing, workers restarted) are not the command's output: what
    # became of the objects is reported by the run itself.
    logging.getLogger("distributed").setLevel(logging.ERROR)

    if not spec.is_local:
        try:
            client = await Client(spec.address, asynchronous=True, timeout=CONNECT_TIMEOUT)  # type: ignore[no-untyped-call]
        except (TimeoutError, OSError) as exc:
            raise NetworkError(
                f"cannot reach the Dask scheduler at {spec.address}: {exc}",
                hint="start it with 'dask scheduler', its workers with 'dask worker ADDRESS' "
                "(docs/cluster.md)",
            ) from None
        try:
            yield client
        finally:
            await _bounded(client.close(timeout=_close_timeout()))
        return
    settings = {
        "distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
        # Dask's statistical profiler samples every worker thread 100 times a second: CPU that the
        # transfers want, for a dashboard that a local cluster does not start.
        "distributed.worker.profile.enabled": False,
    }
    with dask.config.set(settings):
        cluster = await LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=spec.local_workers,
            threads_per_worker=1,
            processes=True,
            asynchronous=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        try:
            client = await Client(cluster, asynchronous=True)  # type: ignore[no-untyped-call]
            try:
                yield client
            finally:
                await _bounded(client.close(timeout=_close_timeout()))
        finally:
            await _bounded(cluster.close(timeout=_close_timeout()))


def _close_timeout() -> float:
    """Seconds the cluster has to close: a run that ended lets its workers stop cleanly (about a
    second); an interrupted one does not wait beyond CLOSE_TIMEOUT (the workers end with it:
    each one leaves when its parent's pipe closes)."""
    task = asyncio.current_task()
    return CLOSE_TIMEOUT if task is not None and task.cancelling() else CLOSE_TIMEOUT_ENDED


async def _bounded(closing: Any) -> None:
    timeout = _close_timeout()
    with contextlib.suppress(Exception, asyncio.TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(closing, timeout)


class SyncCopier:
    """A sync's copies on a cluster (``sync --cluster``): the client plans as a local sync does
    (listings spilled to its job file, comparisons, ``--max-delete`` checked before anything
    changes), the plan's copy actions are partitioned and run by the workers, each object written
    comes back to the client, which records the sync's state, and deletions happen in the client
    after every copy succeeded. The workers record no finished objects: a partition run again
    after its worker died copies its objects again (the same bytes). The workers of a local
    cluster keep their upload sessions in the sync's job file, so that the worker taking a dead
    one's partition over continues its large uploads and removes its unfinished streamed ones."""

    def __init__(
        self,
        cluster: ClusterSpec,
        arguments: Mapping[str, Any],
        *,
        partition_items: int = DEFAULT_PARTITION_ITEMS,
    ) -> None:
        extras.require("cluster", "--cluster")
        self.cluster = cluster
        self.arguments = dict(arguments)
        self.partition_items = partition_items
        self.session = ClusterSession(cluster)

    async def __call__(
        self,
        src: Location,
        dst: Location,
        items: AsyncIterator[TransferItem],
        on_done: DoneCallback,
        on_event: EventCallback | None,
        sessions: Journal,
    ) -> TransferSummary:
        started = time.monotonic()
        run = _ClusterRun(self.cluster, on_event, None, self.partition_items, DEFAULT_PARTITION_BYTES)
        run.display = src.display
        run.on_done = on_done
        # The workers write their upload sessions into the sync's job file: the client commits
        # what it recorded after each partition, rather than holding SQLite's write lock (its
        # batched commits wait for the next row) while it waits for the next partition.
        run.recorded = sessions.flush
        job = PartitionJob(
            str(src.url),
            str(dst.url),
            self.arguments,
            # The workers keep their upload sessions in the sync's job file (a local cluster's
            # workers share it), never its finished objects: see the class's docstring.
            journal_path=str(sessions.path.resolve()) if self.cluster.is_local else None,
            journal_spec=sessions.spec,
            sessions_only=True,
            items_listed=False,
            report_written=True,
        )
        try:
            await run.run_items(items, job, self.session)
        finally:
            await close_items(items)
            run.summary.seconds = time.monotonic() - started
        if run.abort is not None:
            raise run.abort
        return run.summary

    async def aclose(self) -> None:
        await self.session.__aexit__()
