"""Errors are classified by exception type and HTTP status, never by the object's name.

The servers' real answers (SeaweedFS, Azurite) about objects whose names hold every word,
provider code and phrase the classification knows: the name appears in the error text (in the
request URL, in the XML body, in the message), and must not change what the error is.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dicom_cloud.backends import StoreConfig, open_store
from dicom_cloud.errors import (
    AuthenticationError,
    BucketNotFoundError,
    DicomCloudError,
    NotFoundError,
    PermissionDeniedError,
    UsageError,
)
from dicom_cloud.store import Store
from servers import AzureServer, S3Server

#: Every code and phrase an error's text could be searched for, in one object name.
TRAP = (
    "NoSuchBucket ContainerNotFound ContainerBeingDeleted InvalidAccessKeyId SignatureDoesNotMatch "
    "ExpiredToken AuthenticationFailed Server failed to authenticate the request NoSuchUpload "
    "InvalidBlockList SlowDown ServerBusy Throttling AccessDenied <Code>NoSuchBucket</Code> "
    "status code: 503 status: 401, connection reset error sending request connectors timed out "
    "credentials invalid path Debug source"
)
KEYS = [f"{TRAP}/a.dcm", "connectors/a.dcm", "credentials/a.dcm", "SlowDown/status code: 500/a.dcm"]
_CONFIG = StoreConfig(max_retries=0, connect_timeout=5)

_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in _CREDENTIAL_ENV:
        monkeypatch.delenv(var, raising=False)


def run(url: str, body: Callable[[Store], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        store = open_store(url, _CONFIG)
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def raised(call: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[type[DicomCloudError]]]:
    async def catch() -> type[DicomCloudError]:
        try:
            await call()
        except DicomCloudError as exc:
            return type(exc)
        raise AssertionError("no error raised")

    return catch


def test_s3_missing_objects_are_not_found_whatever_their_names(
    seaweedfs: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in seaweedfs.env().items():
        monkeypatch.setenv(var, value)

    async def body(store: Store) -> None:
        for key in KEYS:
            assert await raised(lambda k=key: store.stat(k))() is NotFoundError, key  # type: ignore[misc]
            assert await raised(lambda k=key: store.get(k))() is NotFoundError, key  # type: ignore[misc]
            assert await raised(lambda k=key: store.get_range(k, 0, 4))() is NotFoundError, key  # type: ignore[misc]

    run(f"s3://{s3_bucket}", body)


def test_s3_refusals_keep_their_class_whatever_the_names(
    seaweedfs: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in seaweedfs.env().items():
        monkeypatch.setenv(var, value)

    async def setup(store: Store) -> None:
        for key in KEYS:
            await store.put(key, b"0123456789")

    run(f"s3://{s3_bucket}", setup)

    async def bad_range(store: Store) -> None:
        # 416: a request refused as invalid, not a network fault nor a credential problem.
        for key in KEYS:
            assert await raised(lambda k=key: store.get_range(k, 20, 30))() is UsageError, key  # type: ignore[misc]

    run(f"s3://{s3_bucket}", bad_range)

    for var, value in seaweedfs.env(readonly=True).items():
        monkeypatch.setenv(var, value)

    async def read_only(store: Store) -> None:
        # 403 AccessDenied on a write: a missing permission, neither throttling nor bad credentials.
        for key in KEYS:
            assert await raised(lambda k=key: store.put(k, b"x"))() is PermissionDeniedError, key  # type: ignore[misc]

    run(f"s3://{s3_bucket}", read_only)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + uuid.uuid4().hex)

    async def bad_secret(store: Store) -> None:
        for key in KEYS:
            assert await raised(lambda k=key: store.get(k))() is AuthenticationError, key  # type: ignore[misc]

    run(f"s3://{s3_bucket}", bad_secret)


def test_s3_missing_bucket_is_still_recognised(seaweedfs: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in seaweedfs.env().items():
        monkeypatch.setenv(var, value)

    async def body(store: Store) -> None:
        for key in KEYS:
            assert await raised(lambda k=key: store.get(k))() is BucketNotFoundError, key  # type: ignore[misc]

    run(f"s3://missing-{uuid.uuid4().hex[:12]}", body)


def test_azure_errors_whatever_the_names(
    azurite: AzureServer, azure_container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in azurite.env().items():
        monkeypatch.setenv(var, value)

    async def missing(store: Store) -> None:
        for key in KEYS:
            assert await raised(lambda k=key: store.get(k))() is NotFoundError, key  # type: ignore[misc]
            assert await raised(lambda k=key: store.stat(k))() is NotFoundError, key  # type: ignore[misc]

    run(f"azure://{azure_container}", missing)

    async def missing_container(store: Store) -> None:
        for key in KEYS:
            assert await raised(lambda k=key: store.get(k))() is BucketNotFoundError, key  # type: ignore[misc]

    run(f"azure://missing-{uuid.uuid4().hex[:12]}", missing_container)

    connection = azurite.env()["AZURE_STORAGE_CONNECTION_STRING"]
    wrong_key = "AccountKey=" + base64.b64encode(b"w" * 64).decode() + ";"
    parts = [
        wrong_key if part.startswith("AccountKey=") else part + ";" for part in connection.split(";") if part
    ]
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "".join(parts))

    async def bad_key(store: Store) -> None:
        for key in KEYS:
            assert await raised(lambda k=key: store.get(k))() is AuthenticationError, key  # type: ignore[misc]

    run(f"azure://{azure_container}", bad_key)
