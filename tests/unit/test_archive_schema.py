"""The Alembic migrations create exactly the schema the models declare; databases are opened once."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from dicom_cloud.archive.db import Database, engine_url, upgrade_schema
from dicom_cloud.archive.models import Base
from dicom_cloud.errors import UsageError


def schema_differences(database: Database) -> list[object]:
    with database.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def test_migrations_match_the_models(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/index.db")
    upgrade_schema(db.engine)
    assert schema_differences(db) == []
    upgrade_schema(db.engine)  # a second open finds the schema current
    assert set(inspect(db.engine).get_table_names()) >= {
        "patients", "studies", "series", "instances", "extra_attributes", "study_labels",
        "api_tokens", "share_links", "upload_sessions", "alembic_version",
    }  # fmt: skip
    db.close()


def test_tokens_of_a_0001_index_stay_valid_after_the_expiry_migration(tmp_path: Path) -> None:
    """An index made at revision 0001 (no token expiry) upgrades to head: its tokens keep working,
    without an expiry; new ones may have one."""
    from alembic import command
    from alembic.config import Config

    from dicom_cloud.archive import Archive, ArchiveSettings
    from dicom_cloud.archive.access import token_hash
    from dicom_cloud.archive.db import _MIGRATIONS

    url = f"sqlite:///{tmp_path}/index.db"
    db = Database(url)
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        assert "expires" not in {c["name"] for c in inspect(connection).get_columns("api_tokens")}
        connection.execute(
            text(
                "INSERT INTO api_tokens (tenant, name, token_hash, scopes, created)"
                " VALUES ('acme', 'old', :hash, 'read', '2026-01-01 00:00:00')"
            ),
            {"hash": token_hash("dcat_" + "a" * 43)},
        )
    db.close()

    async def check() -> None:
        async with await Archive.open(ArchiveSettings(f"file://{tmp_path}/objects", url)) as archive:
            old = await archive.authenticate("dcat_" + "a" * 43)
            assert old is not None and old.name == "old" and old.expires is None
            _, new = await archive.create_token("acme", "new", ["read"], timedelta(days=30))
            assert new.expires is not None

    asyncio.run(check())
    db = Database(url)
    assert schema_differences(db) == []
    db.close()


def test_sqlite_file_is_created_with_its_directory(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/deep/dir/index.db")
    upgrade_schema(db.engine)
    assert (tmp_path / "deep" / "dir" / "index.db").exists()
    db.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@h:5/db", "postgresql+psycopg://u:p@h:5/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_engine_urls(url: str, expected: str) -> None:
    assert engine_url(url) == expected


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url", "http://x"])
def test_unsupported_database_urls(url: str) -> None:
    with pytest.raises(UsageError):
        engine_url(url)


def test_unreachable_database_is_a_network_error() -> None:
    import asyncio

    from dicom_cloud.errors import NetworkError

    with pytest.raises(NetworkError) as exc:
        asyncio.run(Database.open("postgresql://nobody:secret@127.0.0.1:1/none?connect_timeout=2"))
    assert "secret" not in str(exc.value) and exc.value.retryable


_WRITER = """
import asyncio, sys
from archive_helpers import make_instance
from dicom_cloud.archive import Archive, ArchiveSettings

async def main(storage, database, first):
    archive = await Archive.open(ArchiveSettings(storage, database))
    try:
        for n in range(first, first + 15):
            await archive.store_instance("acme", make_instance("4.4", "4.4.1", f"4.4.1.{n}"))
    finally:
        await archive.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def test_processes_sharing_one_sqlite_file(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from archive_helpers import opened
    from dicom_cloud.archive import Archive, ArchiveSettings

    storage, database = str(tmp_path / "data"), f"sqlite:///{tmp_path}/index.db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, storage, database, str(first)], env=env)
        for first in (0, 100, 200)
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0]
    with opened(ArchiveSettings(storage, database)) as (a, run):
        assert isinstance(a, Archive)
        assert len(run(a.search_instances("acme", {"limit": "100"}))) == 45
        assert len(run(a.search_series("acme", {}))) == 1
