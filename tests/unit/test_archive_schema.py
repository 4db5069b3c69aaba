"""The Alembic migrations create exactly the schema the models declare; databases are opened once."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

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
