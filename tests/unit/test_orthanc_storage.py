"""The plugin's storage area, pending removals and moves, without Orthanc (memory:// and local stores)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import uuid as uuid_module
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from dicom_cloud.backends import open_store
from dicom_cloud.crypto import a1
from dicom_cloud.crypto.keys import KeyRing, MasterKey
from dicom_cloud.errors import NetworkError, NotFoundError, UsageError
from dicom_cloud.orthanc.config import PluginConfig, parse_configuration
from dicom_cloud.orthanc.move import (
    MoveJob,
    MoveRequest,
    MoveWorker,
    parse_move_request,
    run_move,
)
from dicom_cloud.orthanc.removals import PendingRemovals
from dicom_cloud.orthanc.storage import LoopThread, StorageArea, local_store
from dicom_cloud.store import MultipartPlan, ObjectInfo, PutOptions, PutResult, Store


class Flaky(Store):
    """A memory store that can be told to fail writes or deletes, as a store that went away."""

    def __init__(self, name: str) -> None:
        self.inner = open_store(f"memory://{name}")
        self.scheme, self.bucket = "memory", name
        self.fail_puts = self.fail_deletes = False
        self.puts: list[tuple[str, PutOptions]] = []

    async def stat(self, key: str) -> ObjectInfo:
        return await self.inner.stat(key)

    def list(self, prefix: str = "", *, recursive: bool = True) -> AsyncIterator[ObjectInfo]:
        return self.inner.list(prefix, recursive=recursive)

    async def get(self, key: str) -> bytes | memoryview:
        return await self.inner.get(key)

    async def get_range(self, key: str, start: int, end: int) -> bytes | memoryview:
        return await self.inner.get_range(key, start, end)

    def stream(self, key: str, **kw: Any) -> AsyncIterator[bytes | memoryview]:
        return self.inner.stream(key, **kw)

    async def put(self, key: str, data: bytes | memoryview, options: PutOptions = PutOptions()) -> PutResult:
        if self.fail_puts:
            raise NetworkError("store unreachable")
        self.puts.append((key, options))
        return await self.inner.put(key, data)

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes | memoryview],
        options: PutOptions = PutOptions(),
        plan: MultipartPlan = MultipartPlan(),
    ) -> PutResult:
        raise NotImplementedError

    async def delete(self, keys: Sequence[str]) -> None:
        if self.fail_deletes:
            raise NetworkError("store unreachable")
        await self.inner.delete(keys)

    def keys(self) -> list[str]:
        async def collect() -> list[str]:
            return [i.key async for i in self.inner.list("")]

        return sorted(asyncio.run(collect()))


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


def make_key(tmp_path: Path, key_id: int = 4) -> Path:
    path = tmp_path / f"k{key_id}.key"
    path.write_text(base64.b64encode(os.urandom(32)).decode())
    return path


def configure(tmp_path: Path, **keys: Any) -> PluginConfig:
    config = parse_configuration(
        {
            "StorageDirectory": str(tmp_path / "fs"),
            "DicomCloudLocalStorage": {"Directory": str(tmp_path / "objects"), **keys},
        }
    )
    assert config is not None
    return config


def area(tmp_path: Path, loop: LoopThread, **keys: Any) -> tuple[StorageArea, Flaky]:
    config = configure(tmp_path, **keys)
    store = Flaky(uuid_module.uuid4().hex)
    fs = local_store(config.storage_directory) if config.hybrid_mode.value != "Disabled" else None
    return StorageArea(
        config, store, PendingRemovals(config.pending_removals_file), file_system=fs, loop=loop
    ), store


U1 = "0a1b2c3d-0000-4000-8000-000000000001"
U2 = "0a1b2c3d-0000-4000-8000-000000000002"


def test_create_read_remove_plain(tmp_path: Path, loop: LoopThread) -> None:
    storage, store = area(tmp_path, loop, Tags={"a": "b"})
    storage.create(U1, 1, b"dicom")
    storage.create(U2, 3, b"head")
    assert store.keys() == [f"{U1}.dcm", f"{U2}.dcm.head"]
    assert storage.read(U1, 1) == b"dicom"
    storage.remove(U1, 1)
    assert store.keys() == [f"{U2}.dcm.head"]
    with pytest.raises(NotFoundError, match=U1):
        storage.read(U1, 1)


def test_tags_and_storage_class_reach_the_store(tmp_path: Path, loop: LoopThread) -> None:
    config = parse_configuration(
        {"AwsS3Storage": {"BucketName": "b", "Region": "r", "Tags": {"t": "v"}, "StorageClass": "GLACIER_IR"}}
    )
    assert config is not None
    store = Flaky("tags")
    storage = StorageArea(config, store, PendingRemovals(tmp_path / "p.jsonl"), loop=loop)
    storage.create(U1, 1, b"x")
    options = store.puts[0][1]
    assert dict(options.tags) == {"t": "v"} and options.storage_class == "GLACIER_IR"


def test_encrypted_objects_are_a1_and_read_with_previous_keys(tmp_path: Path, loop: LoopThread) -> None:
    old, new = make_key(tmp_path, 1), make_key(tmp_path, 2)
    storage, store = area(tmp_path, loop, StorageEncryption={"MasterKey": [1, str(old)]})
    storage.create(U1, 1, b"secret dicom")
    blob = asyncio.run(store.inner.get(f"{U1}.dcm.enc"))
    assert bytes(blob)[:2] == b"A1" and a1.header_key_id(blob) == 1
    assert a1.decrypt(blob, KeyRing(MasterKey.from_file(1, old))) == b"secret dicom"
    # Rotated: new key current, old one previous; the same bucket still reads.
    rotated = StorageArea(
        configure(
            tmp_path, StorageEncryption={"MasterKey": [2, str(new)], "PreviousMasterKeys": [[1, str(old)]]}
        ),
        store,
        PendingRemovals(tmp_path / "p2.jsonl"),
        loop=loop,
    )
    assert rotated.read(U1, 1) == b"secret dicom"
    rotated.create(U2, 1, b"newer")
    assert a1.header_key_id(asyncio.run(store.inner.get(f"{U2}.dcm.enc"))) == 2


def test_max_concurrent_input_size_refuses_larger_inputs(tmp_path: Path, loop: LoopThread) -> None:
    storage, _ = area(
        tmp_path,
        loop,
        StorageEncryption={"MasterKey": [1, str(make_key(tmp_path))], "MaxConcurrentInputSize": 1},
    )
    storage.create(U1, 1, b"x" * 1000)
    with pytest.raises(UsageError, match="MaxConcurrentInputSize"):
        storage.create(U2, 1, b"x" * (1024 * 1024 + 1))


def test_legacy_unknown_files_read_and_removed(tmp_path: Path, loop: LoopThread) -> None:
    storage, store = area(tmp_path, loop, EnableLegacyUnknownFiles=True)
    asyncio.run(store.inner.put(f"{U1}.unk", b"old head"))
    assert storage.read(U1, 3) == b"old head"
    storage.remove(U1, 3)
    assert store.keys() == []


def test_failed_remove_is_recorded_durably_and_retried(tmp_path: Path, loop: LoopThread) -> None:
    storage, store = area(tmp_path, loop)
    storage.create(U1, 1, b"a")
    store.fail_deletes = True
    storage.remove(U1, 1)
    entries = PendingRemovals(storage.config.pending_removals_file).entries()  # what a restart sees
    assert [(e.storage, e.key) for e in entries] == [("object-storage", f"{U1}.dcm")]
    assert "NetworkError" in entries[0].error
    assert storage.retry_removals() == (0, 1)
    assert storage.removals.entries()[0].attempts == 2
    store.fail_deletes = False
    assert storage.retry_removals() == (1, 0)
    assert store.keys() == []
    assert storage.config.pending_removals_file.read_text() == ""


def test_a_key_written_again_is_no_longer_to_remove(tmp_path: Path, loop: LoopThread) -> None:
    storage, store = area(tmp_path, loop)
    storage.create(U1, 1, b"a")
    store.fail_deletes = True
    storage.remove(U1, 1)
    store.fail_deletes = False
    storage.create(U1, 1, b"again")
    assert len(storage.removals) == 0
    assert storage.read(U1, 1) == b"again"


def test_failed_create_leaves_no_dicom_file_behind(tmp_path: Path, loop: LoopThread) -> None:
    storage, store = area(tmp_path, loop)
    storage.create(U1, 1, b"dicom")  # Orthanc writes the DICOM file, then its head
    store.fail_puts = True
    with pytest.raises(NetworkError):
        storage.create(U2, 3, b"head")
    assert store.keys() == []  # the DICOM file of the instance Orthanc will not index is gone
    # A failed DICOM create on another thread does not touch this thread's files.
    store.fail_puts = False
    storage.create(U1, 1, b"dicom")
    store.fail_puts = True
    errors: list[BaseException] = []

    def other() -> None:
        try:
            storage.create(U2, 3, b"head")
        except NetworkError as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert errors and store.keys() == [f"{U1}.dcm"]


def test_pending_removals_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(UsageError, match="line 1"):
        PendingRemovals(bad)


# -- hybrid mode and moves ---------------------------------------------------------------------


def test_hybrid_write_to_file_system(tmp_path: Path, loop: LoopThread) -> None:
    storage, store = area(tmp_path, loop, HybridMode="WriteToFileSystem")
    storage.create(U1, 1, b"recent")
    on_disk = tmp_path / "fs" / U1[0:2] / U1[2:4] / U1
    assert on_disk.read_bytes() == b"recent" and store.keys() == []
    asyncio.run(store.inner.put(f"{U2}.dcm", b"archived"))
    assert storage.read(U2, 1) == b"archived"  # fallback to the secondary side
    assert storage.move(U1, 1, "object-storage") is True
    assert not on_disk.exists() and store.keys() == [f"{U1}.dcm", f"{U2}.dcm"]
    assert storage.move(U1, 1, "object-storage") is False  # already there
    assert storage.move(U2, 1, "file-system") is True
    assert storage.read(U2, 1) == b"archived"
    storage.remove(U2, 1)
    storage.remove(U1, 1)
    assert store.keys() == [] and not any((tmp_path / "fs").rglob("0a1b*"))
    with pytest.raises(NotFoundError):
        storage.move(U1, 1, "file-system")


def test_hybrid_migration_encrypts_plain_files(tmp_path: Path, loop: LoopThread) -> None:
    key = make_key(tmp_path)
    storage, store = area(
        tmp_path, loop, HybridMode="WriteToObjectStorage", StorageEncryption={"MasterKey": [4, str(key)]}
    )
    plain = tmp_path / "fs" / U1[0:2] / U1[2:4] / U1
    plain.parent.mkdir(parents=True)
    plain.write_bytes(b"written by Orthanc itself")
    assert storage.read(U1, 1) == b"written by Orthanc itself"
    assert storage.move(U1, 1, "object-storage") is True
    blob = asyncio.run(store.inner.get(f"{U1}.dcm.enc"))
    assert a1.decrypt(blob, KeyRing(MasterKey.from_file(4, key))) == b"written by Orthanc itself"
    assert storage.read(U1, 1) == b"written by Orthanc itself"


def test_move_requires_hybrid_mode(tmp_path: Path, loop: LoopThread) -> None:
    storage, _ = area(tmp_path, loop)
    with pytest.raises(UsageError, match="not in use"):
        storage.move(U1, 1, "file-system")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"TargetStorage": "file-system"}', "Resources"),
        (b'{"Resources": ["a"], "TargetStorage": "disk"}', "TargetStorage"),
        (b'{"Resources": ["a"], "TargetStorage": "file-system", "Priority": "high"}', "Priority"),
        (b'{"Resources": ["a"], "TargetStorage": "file-system", "Asynchronous": 1}', "Asynchronous"),
    ],
)
def test_move_request_errors(body: bytes, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_move_request(body)


def test_move_request_defaults() -> None:
    request = parse_move_request(b'{"Resources": ["a"], "TargetStorage": "object-storage"}')
    assert request == MoveRequest(("a",), "object-storage", False, 0)
    assert parse_move_request(
        b'{"Resources": [], "TargetStorage": "file-system", "Synchronous": false}'
    ).asynchronous


class FakeOrthanc:
    """Orthanc's REST answers for one study with two instances (each with its DICOM attachment)."""

    def __init__(self, attachments: dict[str, str]) -> None:
        self.attachments = attachments  # instance id -> attachment uuid

    def get_json(self, uri: str) -> Any:
        parts = uri.split("?")[0].strip("/").split("/")
        if parts[0] == "studies" and parts[1] == "study":
            return [{"ID": i} for i in self.attachments] if len(parts) == 3 else {"ID": "study"}
        if parts[0] == "instances" and parts[1] in self.attachments:
            if len(parts) == 2:
                return {"ID": parts[1]}
            if len(parts) == 3:
                return {"dicom": 1}
            return {"Uuid": self.attachments[parts[1]], "ContentType": 1}
        raise NotFoundError(uri)


def test_move_jobs(tmp_path: Path, loop: LoopThread) -> None:
    storage, store = area(tmp_path, loop, HybridMode="WriteToFileSystem")
    storage.create(U1, 1, b"one")
    storage.create(U2, 1, b"two")
    api = FakeOrthanc({"i1": U1, "i2": U2})
    job = MoveJob(MoveRequest(("study",), "object-storage"))
    run_move(job, api, storage)
    assert (job.state, job.moved, job.skipped, job.instances) == ("Success", 2, 0, 2)
    assert store.keys() == [f"{U1}.dcm", f"{U2}.dcm"]
    unknown = MoveJob(MoveRequest(("nope",), "file-system"))
    run_move(unknown, api, storage)
    assert unknown.state == "Failure" and "unknown Orthanc resource" in unknown.errors[0]

    worker = MoveWorker(api, storage)
    try:
        submitted = worker.submit(MoveRequest(("i1", "i2"), "file-system", True, 3))
        assert submitted.finished.wait(10)
        status = worker.get(submitted.id).status()
        assert status["State"] == "Success" and status["Progress"] == 100
        assert status["Content"]["AttachmentsMoved"] == 2
        assert json.dumps(status)
        assert [j.id for j in worker.jobs()] == [submitted.id]
        with pytest.raises(NotFoundError):
            worker.get("missing")
    finally:
        worker.stop()
    assert store.keys() == []


def test_reads_objects_of_the_a1_test_vectors(tmp_path: Path, loop: LoopThread) -> None:
    """A bucket written elsewhere in A1 (the format's fixed vectors) reads through the storage area."""
    vectors = json.loads((Path(__file__).parents[1] / "vectors" / "a1.json").read_text())["vectors"]
    for number, vector in enumerate(vectors):
        key = tmp_path / f"vector-{number}.key"
        key.write_text(vector["master_key_file"])
        storage, store = area(
            tmp_path / str(number), loop, StorageEncryption={"MasterKey": [vector["master_key_id"], str(key)]}
        )
        asyncio.run(store.inner.put(f"{U1}.dcm.enc", bytes.fromhex(vector["object"])))
        assert storage.read(U1, 1) == bytes.fromhex(vector["plaintext"]), vector["name"]
