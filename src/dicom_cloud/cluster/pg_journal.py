"""The finished objects and upload sessions of a job in PostgreSQL, shared by workers on any
number of machines (``--journal postgresql://...``, required with a remote cluster).

It is the journal's interface (``is_done``, ``record_done``, and the upload session store of
resumable uploads) over two tables keyed by the job id. The job itself (its command line for
``resume``, its lock, its status) stays in the client's job file (journal.py): only the client
runs the job; the workers report into it. Each row is one autocommitted statement, so a worker
killed at any moment loses nothing it reported done. The tables are created by the client before
any task starts; a job that completes without failures has its rows removed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import extras
from ..errors import UsageError
from ..journal import JobSpec, Journal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dicom_cloud_job_done (
    job_id TEXT NOT NULL,
    src_key TEXT NOT NULL,
    version TEXT NOT NULL,
    dst_key TEXT NOT NULL,
    size BIGINT NOT NULL,
    crc32c TEXT,
    PRIMARY KEY (job_id, src_key)
);
CREATE TABLE IF NOT EXISTS dicom_cloud_job_sessions (
    job_id TEXT NOT NULL,
    dst_key TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (job_id, dst_key)
)
"""


def check_journal_url(url: str) -> None:
    if not url.startswith(("postgresql://", "postgres://")):
        raise UsageError(
            f"--journal {url!r} is not a PostgreSQL URL",
            hint="--journal postgresql://USER@HOST:5432/DATABASE (the password in PGPASSWORD or ~/.pgpass)",
        )
    extras.require("postgres", "--journal postgresql://")


def _connect(url: str) -> Any:
    import psycopg

    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise UsageError(
            f"cannot connect to the journal database: {str(exc).strip().splitlines()[0]}",
            hint="check --journal, and that the database is reachable from here and from every worker",
        ) from None


def create_tables(url: str) -> None:
    """Make the tables (once, by the client, before any worker writes)."""
    with _connect(url) as db:
        db.execute("SELECT pg_advisory_lock(hashtext('dicom_cloud_job_tables'))")
        try:
            for statement in _SCHEMA.split(";"):
                db.execute(statement)
        finally:
            db.execute("SELECT pg_advisory_unlock(hashtext('dicom_cloud_job_tables'))")


class PostgresJournal(Journal):
    """One job's finished objects and upload sessions, in PostgreSQL."""

    def __init__(self, url: str, spec: JobSpec) -> None:  # no SQLite file, no lock
        self.path = Path()
        self.spec = spec
        self.record = False
        self.started = True
        self._lock_fd = -1
        self._pg = _connect(url)
        row = self._pg.execute(
            "SELECT count(*) FROM dicom_cloud_job_done WHERE job_id = %s", (spec.id,)
        ).fetchone()
        self.previously_done = row[0]

    def begin(self) -> None:
        return None  # the client's job file records the run

    def is_done(self, src_key: str, version: str) -> bool:
        row = self._pg.execute(
            "SELECT version FROM dicom_cloud_job_done WHERE job_id = %s AND src_key = %s",
            (self.spec.id, src_key),
        ).fetchone()
        return row is not None and row[0] == version

    def record_done(self, src_key: str, version: str, dst_key: str, size: int, crc32c: str | None) -> None:
        self._pg.execute(
            "INSERT INTO dicom_cloud_job_done (job_id, src_key, version, dst_key, size, crc32c)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (job_id, src_key) DO UPDATE SET"
            " version = excluded.version, dst_key = excluded.dst_key, size = excluded.size,"
            " crc32c = excluded.crc32c",
            (self.spec.id, src_key, version, dst_key, size, crc32c),
        )

    def load(self, key: str) -> dict[str, Any] | None:
        row = self._pg.execute(
            "SELECT state FROM dicom_cloud_job_sessions WHERE job_id = %s AND dst_key = %s",
            (self.spec.id, key),
        ).fetchone()
        return json.loads(row[0]) if row else None

    def save(self, key: str, state: Mapping[str, Any]) -> None:
        self._pg.execute(
            "INSERT INTO dicom_cloud_job_sessions (job_id, dst_key, state) VALUES (%s, %s, %s)"
            " ON CONFLICT (job_id, dst_key) DO UPDATE SET state = excluded.state",
            (self.spec.id, key, json.dumps(dict(state))),
        )

    def clear(self, key: str) -> None:
        self._pg.execute(
            "DELETE FROM dicom_cloud_job_sessions WHERE job_id = %s AND dst_key = %s", (self.spec.id, key)
        )

    def flush(self) -> None:
        return None  # every statement is committed as it is made

    def finish(self, *, failed: int, keep: bool = False) -> None:
        """A job with no failures is complete: its rows are removed."""
        if not failed and not keep:
            self._pg.execute("DELETE FROM dicom_cloud_job_done WHERE job_id = %s", (self.spec.id,))
            self._pg.execute("DELETE FROM dicom_cloud_job_sessions WHERE job_id = %s", (self.spec.id,))
        self.close()

    def close(self) -> None:
        self._pg.close()
