"""``dicom-cloud cleanup`` against real servers: orphans listed, aborted, dry runs touch nothing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from dicom_cloud.backends import StoreConfig, open_store
from dicom_cloud.localio import PARTIAL_SUFFIX
from dicom_cloud.resumable import IncompleteUpload
from dicom_cloud.store import PutOptions
from servers import AzureServer, GCSServer, S3Server

CLI = Path(sys.executable).parent / "dicom-cloud"
_DROP_PREFIXES = ("AWS_", "AZURE_", "GOOGLE_", "DICOM_CLOUD_")


def cli(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(_DROP_PREFIXES)}
    base.pop("STORAGE_EMULATOR_HOST", None)
    base["AWS_CONFIG_FILE"] = base["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent/dicom-cloud-tests"
    return subprocess.run(
        [str(CLI), *args], env={**base, **env}, capture_output=True, text=True, timeout=120, check=False
    )


def orphans(url: str, env: Mapping[str, str], keys: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Start uploads of ``keys`` and leave them unfinished (one part each)."""
    for var, value in env.items():
        monkeypatch.setenv(var, value)

    async def main() -> None:
        store = open_store(url, StoreConfig())
        uploads = store.resumable_uploads()
        assert uploads is not None
        for key in keys:
            state = await uploads.begin(key, 10, 10, PutOptions())
            await uploads.upload_part({**state, "part_size": 10}, 1, b"0123456789")
        await store.close()

    asyncio.run(main())


def listed(url: str, prefix: str = "") -> list[IncompleteUpload]:
    async def main() -> list[IncompleteUpload]:
        store = open_store(url, StoreConfig())
        uploads = store.resumable_uploads()
        assert uploads is not None
        try:
            return [u async for u in uploads.incomplete(prefix)]
        finally:
            await store.close()

    return asyncio.run(main())


@pytest.mark.parametrize("provider", ["s3", "azure"])
def test_cleanup_lists_and_aborts_orphans(
    provider: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    server: S3Server | AzureServer
    if provider == "s3":
        server, bucket = request.getfixturevalue("seaweedfs"), request.getfixturevalue("s3_bucket")
        url = f"s3://{bucket}"
    else:
        server, bucket = request.getfixturevalue("azurite"), request.getfixturevalue("azure_container")
        url = f"azure://{bucket}"
    env = server.env()
    orphans(url, env, ["a/one.dcm", "a/two é.dcm", "b/three.dcm"], monkeypatch)

    # Too recent for the default threshold (1 day): left alone.
    result = cli("cleanup", f"{url}/", env=env)
    assert result.returncode == 0, result.stderr
    assert "Removed 0 leftovers; 3 more too recent to touch" in result.stderr

    # A dry run lists, removes nothing.
    result = cli("cleanup", f"{url}/a/", "--older-than", "0", "--dry-run", "--json", env=env)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["url"] for r in records) == [f"{url}/a/one.dcm", f"{url}/a/two é.dcm"]
    assert {r["event"] for r in records} == {"would_remove"}
    assert len(listed(url)) == 3

    result = cli("cleanup", f"{url}/a/", "--older-than", "0", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("removing") == 2
    assert [u.key for u in listed(url)] == ["b/three.dcm"]


def test_cleanup_gcs_says_it_cannot(fake_gcs: GCSServer, gcs_bucket: str) -> None:
    result = cli("cleanup", f"gs://{gcs_bucket}/", env=fake_gcs.env())
    assert result.returncode == 10
    assert "cannot be listed" in result.stderr and "one week" in result.stderr


def test_cleanup_wrong_credentials_is_exit_4(seaweedfs: S3Server, s3_bucket: str) -> None:
    env: dict[str, Any] = {**seaweedfs.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    result = cli("cleanup", f"s3://{s3_bucket}/", env=env)
    assert result.returncode == 4, result.stderr


def test_cleanup_local_partial_files(tmp_path: Path) -> None:
    old = tmp_path / "study" / f".a.dcm.0123abcd{PARTIAL_SUFFIX}"
    young = tmp_path / f".b.dcm.89abcdef{PARTIAL_SUFFIX}"
    keep = tmp_path / "study" / "a.dcm"
    old.parent.mkdir()
    for path in (old, young, keep):
        path.write_bytes(b"x" * 100)
    past = time.time() - 3 * 86400
    os.utime(old, (past, past))

    result = cli("cleanup", str(tmp_path), "--older-than", "2d", "--dry-run", env={})
    assert result.returncode == 0, result.stderr
    assert str(old) in result.stdout and str(young) not in result.stdout
    assert old.exists()

    result = cli("cleanup", str(tmp_path), "--older-than", "2d", env={})
    assert result.returncode == 0, result.stderr
    assert not old.exists() and young.exists() and keep.exists()

    result = cli("cleanup", str(tmp_path / "missing"), env={})
    assert result.returncode == 2
