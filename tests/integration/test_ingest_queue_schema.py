"""The ingest queue's schema on a real PostgreSQL: created once, brought up to the installed
procrastinate by its own migration files (from a schema an older procrastinate created), and
refused when a newer dicom-cloud migrated it.

The old schema is procrastinate 3.3.0's own ``schema.sql`` (tests/vectors): the upgrade applies the
3.4.0 migrations to it, and a job then goes through the queue's functions they changed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from dicom_cloud.archive.queue import IngestQueue, migration_version, migrations_available
from dicom_cloud.errors import UsageError

OLD_SCHEMA = Path(__file__).parent.parent / "vectors" / "procrastinate-3.3.0-schema.sql"


def _applied(url: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as connection:
        return [
            row[0]
            for row in connection.execute("SELECT name FROM dicom_cloud_queue_migrations ORDER BY name")
        ]


async def _open_and_queue(url: str) -> dict[str, int]:
    async with await IngestQueue.open(url) as queue:
        await queue.enqueue("default", "session-1")
        return await queue.job_counts()


def test_a_new_database_gets_the_schema_with_every_migration_recorded(database: str) -> None:
    assert asyncio.run(_open_and_queue(database)) == {"todo": 1, "doing": 0}
    assert _applied(database) == migrations_available()
    assert (
        asyncio.run(_open_and_queue(database))["todo"] == 1
    )  # opened again: nothing to do, one job per session


def test_an_older_procrastinate_schema_is_migrated_then_works(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as connection:
        connection.execute(OLD_SCHEMA.read_text(encoding="utf-8"))  # type: ignore[arg-type]
        connection.execute(
            "CREATE TABLE dicom_cloud_queue_migrations (name text PRIMARY KEY, applied timestamptz)"
        )
        with connection.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO dicom_cloud_queue_migrations (name) VALUES (%s)",
                [(n,) for n in migrations_available() if migration_version(n) <= (3, 3, 0)],
            )
    pending = [n for n in migrations_available() if migration_version(n) > (3, 3, 0)]
    assert pending, "the installed procrastinate has no migration after 3.3.0: the test proves nothing"
    assert asyncio.run(_open_and_queue(database)) == {"todo": 1, "doing": 0}
    assert _applied(database) == migrations_available()
    with psycopg.connect(database, autocommit=True) as connection:
        row = connection.execute("SELECT to_regproc('procrastinate_retry_job_v2') IS NOT NULL").fetchone()
    assert row is not None and row[0], "the 3.4.0 migration's function is missing"


def test_a_schema_from_before_migrations_were_recorded_counts_as_procrastinate_3_10(database: str) -> None:
    from procrastinate.schema import SchemaManager

    with psycopg.connect(database, autocommit=True) as connection:
        connection.execute(SchemaManager.get_schema())
    asyncio.run(_open_and_queue(database))
    assert _applied(database) == migrations_available()


def test_a_schema_a_newer_dicom_cloud_migrated_is_refused(database: str) -> None:
    asyncio.run(_open_and_queue(database))
    with psycopg.connect(database, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO dicom_cloud_queue_migrations (name) VALUES ('99.00.00_01_pre_future.sql')"
        )
    with pytest.raises(UsageError, match="newer than this dicom-cloud"):
        asyncio.run(_open_and_queue(database))
