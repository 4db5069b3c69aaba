"""Shared fixtures: real storage servers (started once per session) and fresh buckets per test.

A server that cannot start makes its tests fail, never skip: the servers are part of the test
environment (``scripts/install-test-servers`` plus the dev extras install them).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from servers import (
    AzureServer,
    GCSServer,
    S3Server,
    start_azurite,
    start_fake_gcs,
    start_seaweedfs,
    unique_name,
)

_INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _INTEGRATION_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


def _start(name: str, start, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    try:
        return start(tmp_path_factory.mktemp(name))
    except RuntimeError as e:
        pytest.fail(f"{name} could not start: {e}", pytrace=False)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    # With its STS: the tests of AWS profiles that assume a role use it (test_cli.py).
    server = _start("seaweedfs", partial(start_seaweedfs, sts=True), tmp_path_factory)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureServer]:
    server = _start("azurite", start_azurite, tmp_path_factory)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GCSServer]:
    server = _start("fake-gcs", start_fake_gcs, tmp_path_factory)
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(seaweedfs: S3Server) -> str:
    name = unique_name("s3")
    seaweedfs.create_bucket(name)
    return name


@pytest.fixture
def azure_container(azurite: AzureServer) -> str:
    name = unique_name("az")
    azurite.create_container(name)
    return name


@pytest.fixture
def gcs_bucket(fake_gcs: GCSServer) -> str:
    name = unique_name("gs")
    fake_gcs.create_bucket(name)
    return name


@pytest.fixture
def local_root(tmp_path: Path) -> Path:
    root = tmp_path / "local-root"
    root.mkdir()
    return root


@pytest.fixture
def database() -> Iterator[str]:
    """The URL of a new, empty database on the local PostgreSQL, dropped afterwards."""
    import psycopg

    from live_service import fresh_postgres_database

    try:
        with fresh_postgres_database() as url:
            yield url
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at 127.0.0.1:5432: {exc}", pytrace=False)
