"""The index database: one SQLAlchemy engine per archive, the schema brought up by Alembic at open.

URLs: ``sqlite:///relative/or/absolute/path.db`` (the embedded default), ``sqlite://`` (in
memory, tests), ``postgresql://user:password@host:port/db`` (``postgres://`` too; psycopg 3 is
always the driver). Several service instances may open the same PostgreSQL database at once:
migrations run under an advisory lock, so exactly one of them upgrades the schema.

The ORM is synchronous; :meth:`Database.run` runs one unit of work (a function of a session,
committed when it returns, rolled back when it raises) in a worker thread, so the event loop
never waits on the database.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from ..errors import NetworkError, UsageError
from ..extras import require
from ..localio import PRIVATE_FILE_MODE, make_dirs

T = TypeVar("T")

#: Arbitrary, fixed: the advisory lock id taken while migrating a PostgreSQL index.
_MIGRATION_LOCK_ID = 0x0D1C0C10
_MIGRATIONS = Path(__file__).parent / "migrations"


def engine_url(url: str) -> str:
    """``url`` with the driver this project uses (psycopg 3 for PostgreSQL). UsageError when
    the URL is not SQLite or PostgreSQL."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UsageError(
            "the database URL is not valid", hint="use sqlite:///path/index.db or postgresql://user@host/db"
        ) from None
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        require("postgres", "an index database on PostgreSQL")
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if backend == "sqlite":
        return parsed.set(drivername="sqlite").render_as_string(hide_password=False)
    raise UsageError(
        f"unsupported database '{backend}'", hint="use sqlite:///path/index.db or postgresql://user@host/db"
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own transaction handling is off: SQLAlchemy's "begin" event emits BEGIN
    # IMMEDIATE instead (see _sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")  # writers from other threads wait, not fail
    _enable_wal(cursor)  # readers never block the writer (memory: ignored)
    # In WAL mode NORMAL syncs at checkpoints, not at every commit: a power loss may forget the
    # last commits but never corrupts the index. An fsync per commit cost more than the whole
    # insert of an instance's rows (objects are not fsynced either).
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")  # cascades from studies to labels etc.
    cursor.execute("PRAGMA case_sensitive_like=ON")  # LIKE as in PostgreSQL: QIDO text matching is exact
    cursor.close()


def _enable_wal(cursor: Any) -> None:
    """WAL mode, waiting for other processes: switching a new database file to WAL needs an
    exclusive lock, and SQLite answers "locked" at once there instead of calling the busy handler
    (several processes opening one new index together)."""
    deadline = time.monotonic() + _WAL_WAIT
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.01 + random.random() * 0.04)


#: Seconds a connection waits for another process to finish switching the index to WAL.
_WAL_WAIT = 30.0

#: Execution option of connections that only read (see :meth:`Database.read`).
_READ_ONLY = "dicom_cloud_read_only"


#: Execution option of connections that make one read statement (see :meth:`Database.lookup_sync`).
_ONE_READ = "dicom_cloud_one_read"


def _sqlite_begin(connection: Any) -> None:
    """Take the write lock when a transaction starts, waiting up to the busy timeout: a deferred
    transaction that turns into a write while another process commits fails at once instead.
    Read-only units begin a deferred transaction: in WAL mode they read a snapshot beside the
    writer. A single read statement begins none: SQLite runs it in a snapshot of its own."""
    options = connection.get_execution_options()
    if options.get(_ONE_READ):
        return
    if options.get(_READ_ONLY):
        connection.exec_driver_sql("BEGIN")
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_index_engine(url: str, *, private: bool = False) -> Engine:
    """The engine of the index at ``url``. A SQLite file is created with its directory first;
    ``private``: owner-only (0600, its directory 0700), which SQLite passes on to the -wal and
    -shm files it makes beside it."""
    full = engine_url(url)
    parsed = make_url(full)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):
            engine = create_engine(full, connect_args={"check_same_thread": False}, poolclass=StaticPool)
        else:
            path = Path(database)
            make_dirs(path.parent, private=private)
            if private:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE))  # kept if it exists
            # Connections are renewed after a while so that they pick up planner statistics that
            # another process refreshed (see refresh_statistics).
            engine = create_engine(
                full, connect_args={"check_same_thread": False, "timeout": 30}, pool_recycle=120
            )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(full, pool_pre_ping=True, pool_size=5, max_overflow=10)


def upgrade_schema(engine: Engine) -> None:
    """Bring the schema to the newest migration (Alembic, no alembic.ini needed)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def _translated(fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except (OperationalError, InterfaceError) as exc:
        # The driver's message may hold the host, user or password of the URL: not repeated.
        raise NetworkError(
            "the index database is unreachable or failed",
            hint="check the database URL, that the server runs, and its logs",
        ) from exc


#: Units of work between two refreshes of SQLite's planner statistics.
_STATISTICS_EVERY = 2000


class Database:
    """The index: an engine, a session factory, and a way to run work off the event loop."""

    def __init__(self, url: str, *, private: bool = False) -> None:
        self.engine = create_index_engine(url, private=private)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer at a time (across processes: BEGIN IMMEDIATE waits for it), and
        # an in-memory database is one shared connection: units of work on SQLite take turns.
        sqlite = self.engine.dialect.name == "sqlite"
        self._turns: AbstractContextManager[object] = threading.Lock() if sqlite else nullcontext()
        # Readers of a SQLite file need no turn: each has its own connection and, in WAL mode,
        # its own snapshot. An in-memory database is one connection: readers take turns too.
        shared = sqlite and self.engine.pool.__class__ is StaticPool
        self._read_turns: AbstractContextManager[object] = self._turns if shared else nullcontext()
        self._units = 0
        self._units_lock = threading.Lock()

    @classmethod
    async def open(cls, url: str, *, private: bool = False) -> Database:
        db = await asyncio.to_thread(lambda: cls(url, private=private))
        try:
            await asyncio.to_thread(_translated, upgrade_schema, db.engine)
            await asyncio.to_thread(db.refresh_statistics)
        except BaseException:
            db.engine.dispose()
            raise
        return db

    def run_sync(self, work: Callable[[Session], T], units: int = 1) -> T:
        """Run ``work(session)`` in one transaction. Connection failures become NetworkError
        (retryable); constraint violations stay sqlalchemy IntegrityError for the caller to judge.
        ``units``: the units of work it stands for (the instances of a batch), counted towards the
        next refresh of the statistics."""

        def unit() -> T:
            with self._turns, self.sessions.begin() as session:
                return work(session)

        result = _translated(unit)
        self._count_unit(units)
        return result

    def _count_unit(self, units: int = 1) -> None:
        """Count units of work (reads too: with several worker processes each sees only its share
        of the writes) and refresh the statistics every :data:`_STATISTICS_EVERY`. A batch counts
        as its instances: a fill by batches changes the index as much as one by one does."""
        with self._units_lock:
            before = self._units
            self._units += max(units, 1)
            due = self._units // _STATISTICS_EVERY != before // _STATISTICS_EVERY
        if due:
            self.refresh_statistics()

    def read_sync(self, work: Callable[[Session], T], units: int = 1) -> T:
        """Run ``work(session)``, which only reads, in one transaction that takes no write lock
        (SQLite: a deferred transaction beside the writer, not in turn with it)."""

        def unit() -> T:
            with self._read_turns, self.sessions.begin() as session:
                # The connection is taken here, with the option its "begin" event reads.
                session.connection(execution_options={_READ_ONLY: True})
                return work(session)

        result = _translated(unit)
        self._count_unit(units)
        return result

    async def read(self, work: Callable[[Session], T], units: int = 1) -> T:
        """:meth:`read_sync` in a worker thread."""
        return await asyncio.to_thread(self.read_sync, work, units)

    def lookup_sync(self, work: Callable[[Connection], T]) -> T:
        """Run ``work(connection)``, which makes ONE read statement, on a bare connection: no
        session, and on SQLite no BEGIN and COMMIT around it (the statement reads a snapshot of
        its own). For the lookups made on every request (an instance by its UIDs), where the
        session and the transaction's statements cost more than the query."""

        def unit() -> T:
            with self._read_turns, self.engine.connect() as connection:
                connection.execution_options(**{_ONE_READ: True, _READ_ONLY: True})
                return work(connection)

        result = _translated(unit)
        self._count_unit()
        return result

    def refresh_statistics(self) -> None:
        """SQLite: refresh the planner's statistics (sampled ANALYZE, milliseconds). Without them it
        takes every ``tenant = ?`` for a selective filter and walks a tenant's whole table of instances
        instead of reaching a patient, study or series by its index (100 ms against 1 ms at 100,000
        instances). PostgreSQL keeps its own statistics (autovacuum)."""
        if self.engine.dialect.name != "sqlite":
            return
        with self._turns, self.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA analysis_limit = 1000")
            connection.exec_driver_sql("ANALYZE")
            connection.commit()
        if self.engine.pool.__class__ is not StaticPool:
            # A connection reads the statistics when it loads the schema, not when another connection
            # (of this process or another worker's) refreshes them: pooled connections are replaced,
            # so that every reader plans with the newest ones.
            self.engine.dispose()

    async def run(self, work: Callable[[Session], T], units: int = 1) -> T:
        """Run ``work(session)`` in a worker thread, in one transaction (``units``: as
        :meth:`run_sync`)."""
        return await asyncio.to_thread(self.run_sync, work, units)

    def close(self) -> None:
        self.engine.dispose()
