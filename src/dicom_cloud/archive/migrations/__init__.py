"""Alembic migrations of the index schema (run by ``archive.db.upgrade_schema``)."""
