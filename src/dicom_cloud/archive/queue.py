"""The ingest queue: completions of presigned uploads as jobs on PostgreSQL, run by workers.

With a PostgreSQL index the service can hand the ingest of a completed upload to a queue
instead of doing it in the request (``ingest_queue``, docs/service.md "Ingest queue"):
:meth:`IngestQueue.enqueue` records one job per upload session, and ``dicom-cloud worker``
processes (any number, on any machine reaching the database and the store) run them through
:meth:`IngestQueue.run_worker`, which calls :meth:`Archive.run_queued_upload`.

The queue is procrastinate's (jobs are rows of ``procrastinate_jobs`` in the index database,
taken with ``SELECT ... FOR UPDATE SKIP LOCKED``, announced by LISTEN/NOTIFY): no broker to run
beside the database the index needs anyway. Its tables, types and functions (all named
``procrastinate_*``) are created by the first service or worker that opens the queue.

A job carries the tenant and the upload session id, nothing else (no patient data: the files
are read from staging). What happens when things go wrong:

* a job that raises is retried with capped exponential backoff and full jitter, up to
  ``MAX_ATTEMPTS``; after the last one the session is marked ``failed`` with the reason;
* a worker stopped by SIGINT/SIGTERM gives its running jobs ``SHUTDOWN_GRACE`` seconds, then
  cancels them and puts them back in the queue at once;
* a worker that dies (SIGKILL, power) stops sending heartbeats; after ``stalled_after`` seconds
  any other worker puts its running jobs back in the queue.

A job run again is safe: the ingest is idempotent (see :meth:`Archive.run_queued_upload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterable
from importlib import resources
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING, Any, Final

import psycopg
from procrastinate import App, PsycopgConnector
from procrastinate import exceptions as queue_errors
from procrastinate.job_context import JobContext
from procrastinate.jobs import Job
from procrastinate.retry import BaseRetryStrategy, RetryDecision
from procrastinate.schema import SchemaManager
from procrastinate.worker import Worker
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy.engine import make_url

from ..errors import DicomCloudError, NotFoundError, UsageError

if TYPE_CHECKING:
    from .core import Archive

log = logging.getLogger("dicom_cloud.archive.queue")

#: The queue (procrastinate's queue_name) and task name of ingest jobs.
QUEUE: Final = "dicom_cloud_ingest"
TASK: Final = "dicom_cloud.ingest_upload"
#: Attempts of one job before its session is marked failed.
MAX_ATTEMPTS: Final = 8
#: Backoff between attempts: up to BACKOFF_BASE * 2**attempts seconds (full jitter), capped.
BACKOFF_BASE: Final = 2.0
BACKOFF_CAP: Final = 300.0
#: Seconds running jobs get to finish when a worker is asked to stop; then they are cancelled
#: and queued again (the CLI leaves within 2 s of the signal).
SHUTDOWN_GRACE: Final = 0.8
#: Seconds between two looks for new or retried jobs besides LISTEN/NOTIFY (retries scheduled
#: for later are not notified).
POLL_INTERVAL: Final = 1.0
#: The advisory lock held while the queue's schema is created (one creator among many starters).
_SCHEMA_LOCK: Final = 0x64632D71  # "dc-q"
_PERMANENT: Final = (UsageError, NotFoundError)


def queue_conninfo(database_url: str) -> str:
    """The libpq connection string of a PostgreSQL index URL (SQLAlchemy's, any driver part);
    UsageError for any other database: the queue lives in PostgreSQL."""
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        raise UsageError(
            "the ingest queue needs a PostgreSQL index (database = postgresql://...)",
            hint="with a SQLite index, uploads are ingested in the service process: leave ingest_queue off",
        )
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def backoff_seconds(attempts: int, rng: random.Random | None = None) -> float:
    """The wait before the next attempt of a job that failed ``attempts + 1`` times: full jitter
    over an exponential bound (at least one second, so that a failure is not hammered)."""
    bound = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempts)
    return max(1.0, (rng or random).uniform(0, bound))


class IngestRetry(BaseRetryStrategy):
    """When a failed ingest job runs again. Not when its error is the request's own (the
    session is unknown, the input refused): running it again would fail the same way. A job
    cancelled because its worker is stopping is queued again at once, and does not count."""

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        if isinstance(exception, asyncio.CancelledError):
            return RetryDecision(retry_in={"seconds": 0})  # type: ignore[no-any-return]
        if isinstance(exception, _PERMANENT) or job.attempts + 1 >= MAX_ATTEMPTS:
            return None
        return RetryDecision(retry_in={"milliseconds": round(1000 * backoff_seconds(job.attempts))})  # type: ignore[no-any-return]


def failure_reason(error: BaseException) -> str:
    """What a session that failed records: our own errors' messages (free of patient data by
    design), only the class name of anything else (a driver's message may quote row values)."""
    if isinstance(error, DicomCloudError):
        return str(error)[:500]
    return f"internal error ({type(error).__name__})"


_RETRY: Final = IngestRetry()


class WorkerMetrics:
    """A worker's Prometheus metrics, in their own registry (``dicom-cloud worker --metrics-port``).
    Counts are this process's; the queue's depth is the whole queue's, as last looked at."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter(
            "dicom_cloud_ingest_jobs_total",
            "Ingest jobs run by this worker, by result: done; retry (failed, will run again); "
            "failed (given up, session marked failed); cancelled (worker stopping, queued again)",
            ["result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "dicom_cloud_ingest_job_duration_seconds",
            "Time one ingest job ran, whatever its result",
            registry=self.registry,
        )
        self.instances = Counter(
            "dicom_cloud_ingest_instances_total",
            "Files of upload sessions ingested by this worker, by outcome (accepted, rejected)",
            ["outcome"],
            registry=self.registry,
        )
        self.queued = Gauge(
            "dicom_cloud_ingest_queue_jobs",
            "Ingest jobs in the queue by status (todo: waiting, retries included; doing: running "
            "on some worker)",
            ["status"],
            registry=self.registry,
        )


async def _ingest_upload(context: JobContext, tenant: str, session_id: str) -> dict[str, int] | None:
    archive: Archive = context.additional_context["archive"]
    metrics: WorkerMetrics | None = context.additional_context.get("metrics")
    started = time.monotonic()
    try:
        outcome = await archive.run_queued_upload(tenant, session_id)
    except BaseException as exc:
        retried = _RETRY.get_retry_decision(exception=exc, job=context.job) is not None
        if not retried and isinstance(exc, Exception):
            await archive.fail_queued_upload(tenant, session_id, failure_reason(exc))
        if metrics is not None:
            cancelled = isinstance(exc, asyncio.CancelledError)
            metrics.jobs.labels("cancelled" if cancelled else "retry" if retried else "failed").inc()
            metrics.duration.observe(time.monotonic() - started)
        raise
    if metrics is not None:
        metrics.jobs.labels("done").inc()
        metrics.duration.observe(time.monotonic() - started)
    if outcome is None:
        return None
    if metrics is not None:
        metrics.instances.labels("accepted").inc(len(outcome.accepted))
        metrics.instances.labels("rejected").inc(len(outcome.rejected))
    return {"accepted": len(outcome.accepted), "rejected": len(outcome.rejected)}


class IngestQueue:
    """The queue of ingest jobs in the index's PostgreSQL database. Open with :meth:`open`,
    close with :meth:`close` (or ``async with``)."""

    def __init__(self, app: App) -> None:
        """Use :meth:`open`."""
        self._app = app
        self._task = app.task(name=TASK, queue=QUEUE, pass_context=True, retry=_RETRY)(_ingest_upload)

    @classmethod
    async def open(cls, database_url: str) -> IngestQueue:
        """Connect (a small pool) and create the queue's schema if it is not there yet."""
        conninfo = queue_conninfo(database_url)
        await _ensure_schema(conninfo)
        app = App(connector=PsycopgConnector(conninfo=conninfo, min_size=1, max_size=4))
        await app.open_async()
        return cls(app)

    async def close(self) -> None:
        await self._app.close_async()

    async def __aenter__(self) -> IngestQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def enqueue(self, tenant: str, session_id: str) -> None:
        """Queue the ingest of a session (one waiting job per session: a second is not added)."""
        with contextlib.suppress(queue_errors.AlreadyEnqueued):  # its job is waiting already
            await self._task.configure(queueing_lock=session_id).defer_async(
                tenant=tenant, session_id=session_id
            )

    async def unfinished_jobs(self) -> int:
        """Jobs waiting (now or for a retry) or running."""
        return sum((await self.job_counts()).values())

    async def job_counts(self) -> dict[str, int]:
        """Jobs waiting (``todo``, now or for a retry) and running (``doing``)."""
        rows = await self._app.connector.execute_query_all_async(
            "SELECT status::text AS status, count(*) AS n FROM procrastinate_jobs"
            " WHERE queue_name = %(queue)s AND status IN ('todo', 'doing') GROUP BY status",
            queue=QUEUE,
        )
        counts = {"todo": 0, "doing": 0}
        counts.update({row["status"]: int(row["n"]) for row in rows})
        return counts

    async def requeue_stalled(self, stalled_after: float) -> int:
        """Put back in the queue the running jobs of workers silent for ``stalled_after`` seconds
        (dead); returns how many. Safe from several workers at once."""
        requeued = 0
        for job in await self._app.job_manager.get_stalled_jobs(
            queue=QUEUE, seconds_since_heartbeat=stalled_after
        ):
            try:
                await self._app.job_manager.retry_job(job)
            except queue_errors.ConnectorException:
                continue  # another worker put it back first
            requeued += 1
            log.warning("ingest.job_requeued", extra={"job": job.id, "reason": "worker stalled"})
        return requeued

    async def run_worker(
        self,
        archive: Archive,
        *,
        concurrency: int = 4,
        stalled_after: float = 60.0,
        until_empty: bool = False,
        name: str | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        """Run ingest jobs until cancelled (or, ``until_empty``, until no job is waiting or running
        anywhere, retries included). Cancelled: running jobs get ``SHUTDOWN_GRACE`` seconds, then
        go back to the queue."""
        if concurrency < 1 or stalled_after <= 0:
            raise UsageError("concurrency must be at least 1 and stalled_after positive")
        worker = Worker(
            self._app,
            queues=[QUEUE],
            name=name or "dicom-cloud-worker",
            concurrency=concurrency,
            wait=True,
            fetch_job_polling_interval=POLL_INTERVAL,
            shutdown_graceful_timeout=SHUTDOWN_GRACE,
            delete_jobs="successful",  # the session keeps the outcome; failed jobs stay to be looked at
            additional_context={"archive": archive, "metrics": metrics},
            install_signal_handlers=False,  # the CLI's runner handles them (cancellation)
            # Heartbeats well within the silence that declares a worker dead.
            update_heartbeat_interval=max(0.5, stalled_after / 4),
            stalled_worker_timeout=stalled_after,
        )
        running = asyncio.create_task(worker.run(), name="ingest worker")  # type: ignore[no-untyped-call]
        helpers = [asyncio.create_task(self._requeue_stalled_forever(stalled_after, metrics))]
        if until_empty:
            helpers.append(asyncio.create_task(self._stop_when_empty(worker)))
        try:
            await asyncio.shield(running)
        except asyncio.CancelledError:
            worker.stop()  # type: ignore[no-untyped-call]  # graceful: running jobs get SHUTDOWN_GRACE, then go back to the queue
            await asyncio.wait([running], timeout=SHUTDOWN_GRACE + 0.4)
            raise
        finally:
            await _cancel(helpers)

    async def _requeue_stalled_forever(self, stalled_after: float, metrics: WorkerMetrics | None) -> None:
        while True:
            try:
                await self.requeue_stalled(stalled_after)
                if metrics is not None:
                    for status, count in (await self.job_counts()).items():
                        metrics.queued.labels(status).set(count)
            except Exception as exc:  # the database away for a moment: look again later
                log.warning("ingest.requeue_failed", extra={"error": type(exc).__name__})
            await asyncio.sleep(max(0.5, stalled_after / 2))

    async def _stop_when_empty(self, worker: Worker) -> None:
        while await self.unfinished_jobs():
            await asyncio.sleep(0.5)
        worker.stop()  # type: ignore[no-untyped-call]


async def _cancel(tasks: Iterable[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def _ensure_schema(conninfo: str) -> None:
    """Create procrastinate's schema unless it is there, or bring it to the installed
    procrastinate's version, under an advisory lock (services and workers starting together
    create or migrate it once)."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as connection:
        await connection.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
        try:
            cursor = await connection.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
            row = await cursor.fetchone()
            available = migrations_available()
            if not (row and row[0]):
                log.info("ingest.queue_schema_created")
                async with connection.transaction():
                    await connection.execute(SchemaManager.get_schema())
                    await _record_migrations(connection, available)  # the schema has them all
            else:
                await _migrate(connection, available)
        finally:
            await connection.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))


# Which of procrastinate's migration files the queue's schema holds: one row per file in the
# table dicom_cloud_queue_migrations (name, applied).
#: The procrastinate version whose schema the queue was created with before the migrations it
#: holds were recorded (the first release with the queue shipped procrastinate 3.10).
_UNRECORDED_SCHEMA_VERSION: Final = (3, 10, 0)


def migration_version(name: str) -> tuple[int, ...]:
    """The procrastinate version a migration file belongs to: ``03.04.00_01_pre_x.sql`` is 3.4.0."""
    return tuple(int(part) for part in name.split("_", 1)[0].split("."))


def migrations_available() -> list[str]:
    """The installed procrastinate's migration files, in the order they apply (version, then the
    ``01_pre`` files before the ``50_post`` ones)."""
    return sorted(entry.name for entry in _migrations_folder().iterdir() if entry.name.endswith(".sql"))


def _migrations_folder() -> Traversable:
    return resources.files("procrastinate.sql.migrations")


def migrations_pending(applied: set[str], available: list[str]) -> list[str]:
    """The migration files to apply, in order. UsageError when the schema holds migrations the
    installed procrastinate does not know: a newer dicom-cloud made it, and this one must not run
    jobs on it."""
    unknown = sorted(applied - set(available))
    if unknown:
        raise UsageError(
            f"the ingest queue's tables in the index database are newer than this dicom-cloud "
            f"(procrastinate migration {unknown[-1]} is not known here)",
            hint="upgrade dicom-cloud on this machine to the version the other services and workers run",
        )
    return [name for name in available if name not in applied]


async def _record_migrations(connection: psycopg.AsyncConnection[Any], names: Iterable[str]) -> None:
    await connection.execute(
        "CREATE TABLE IF NOT EXISTS dicom_cloud_queue_migrations"
        " (name text PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())"
    )
    async with connection.cursor() as cursor:
        await cursor.executemany(
            "INSERT INTO dicom_cloud_queue_migrations (name) VALUES (%s) ON CONFLICT DO NOTHING",
            [(name,) for name in names],
        )


async def _migrate(connection: psycopg.AsyncConnection[Any], available: list[str]) -> None:
    """Apply the installed procrastinate's migrations the schema does not hold yet, each in its
    own transaction with its record (an interrupted upgrade continues where it stopped)."""
    cursor = await connection.execute("SELECT to_regclass('dicom_cloud_queue_migrations') IS NOT NULL")
    row = await cursor.fetchone()
    if not (row and row[0]):  # made before migrations were recorded: procrastinate 3.10's schema
        async with connection.transaction():
            await _record_migrations(
                connection, [n for n in available if migration_version(n) <= _UNRECORDED_SCHEMA_VERSION]
            )
    cursor = await connection.execute("SELECT name FROM dicom_cloud_queue_migrations")
    applied = {name for (name,) in await cursor.fetchall()}
    folder = _migrations_folder()
    for name in migrations_pending(applied, available):
        log.info("ingest.queue_schema_migrated", extra={"migration": name})
        async with connection.transaction():
            await connection.execute(folder.joinpath(name).read_text(encoding="utf-8"))  # type: ignore[arg-type]
            await _record_migrations(connection, [name])


__all__ = [
    "MAX_ATTEMPTS",
    "QUEUE",
    "IngestQueue",
    "IngestRetry",
    "WorkerMetrics",
    "backoff_seconds",
    "failure_reason",
    "migration_version",
    "migrations_available",
    "migrations_pending",
    "queue_conninfo",
]
