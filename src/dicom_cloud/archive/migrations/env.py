"""Alembic environment: migrations always run on the connection ``archive.db`` hands over."""

from __future__ import annotations

from alembic import context

from dicom_cloud.archive.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reached by a hand-run `alembic` command
    raise RuntimeError("run migrations through dicom_cloud.archive.db.upgrade_schema")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
)
with context.begin_transaction():
    context.run_migrations()
