"""The resumable-upload driver's decisions, over an in-process implementation of the interface."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dicom_cloud.budget import ByteBudget
from dicom_cloud.checksum import crc32c_file
from dicom_cloud.errors import IntegrityError, NotFoundError, UsageError
from dicom_cloud.resumable import (
    IncompleteUpload,
    MemoryStateStore,
    PartRecord,
    ResumableResult,
    abandon,
    begin_marker,
    fit_part_size,
    part_range,
    streamed_upload,
    upload_file_resumable,
)
from dicom_cloud.store import CHECKSUM_METADATA_KEY, ObjectInfo, PutOptions

PART = 1000


class InProcessUploads:
    """Sessions and parts in dicts; reports each part's MD5 like S3's ListParts."""

    min_part_size = 1
    max_parts = 100

    def __init__(self, *, sequential: bool = False, reports_md5: bool = True) -> None:
        self.sequential = sequential
        self.reports_md5 = reports_md5
        self.sessions: dict[str, dict[int, bytes]] = {}
        self.keys: dict[str, str] = {}
        self.options: dict[str, PutOptions] = {}
        self.objects: dict[str, tuple[bytes, PutOptions]] = {}
        self.sent: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.fail_after: int | None = None

    async def begin(self, key: str, size: int, part_size: int, options: PutOptions) -> dict[str, Any]:
        upload_id = f"u{len(self.sessions)}"
        self.sessions[upload_id] = {}
        self.keys[upload_id] = key
        self.options[upload_id] = options
        return {"upload_id": upload_id}

    async def uploaded_parts(self, state: dict[str, Any]) -> dict[int, PartRecord]:
        if state["upload_id"] not in self.sessions:
            raise NotFoundError("gone")
        return {
            n: PartRecord(n, len(d), md5=hashlib.md5(d).hexdigest() if self.reports_md5 else None)  # noqa: S324
            for n, d in self.sessions[state["upload_id"]].items()
        }

    async def upload_part(self, state: dict[str, Any], number: int, data: bytes | memoryview) -> PartRecord:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise ConnectionError("network down")
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.001)
        self.in_flight -= 1
        self.sessions[state["upload_id"]][number] = bytes(data)
        self.sent.append(number)
        return PartRecord(number, len(data))

    async def complete(self, state: dict[str, Any], parts: list[PartRecord]) -> ObjectInfo:
        held = self.sessions.pop(state["upload_id"])
        assert [p.number for p in parts] == sorted(held)
        data = b"".join(held[p.number] for p in parts)
        options = self.options[state["upload_id"]]
        self.objects[state["key"]] = (data, options)
        return ObjectInfo(key=state["key"], size=len(data), metadata=dict(options.metadata))

    async def abort(self, state: dict[str, Any]) -> None:
        self.sessions.pop(state["upload_id"], None)

    async def incomplete(self, prefix: str = "") -> AsyncIterator[IncompleteUpload]:
        for upload_id in list(self.sessions):
            if self.keys[upload_id].startswith(prefix):
                yield IncompleteUpload(self.keys[upload_id], upload_id)

    async def abort_incomplete(self, upload: IncompleteUpload) -> None:
        self.sessions.pop(upload.upload_id, None)

    async def close(self) -> None:
        pass


def upload(
    uploads: InProcessUploads, path: Path, states: MemoryStateStore, budget: int = 10 * PART
) -> ResumableResult:
    return asyncio.run(
        upload_file_resumable(
            uploads,
            path,
            "k",
            part_size=PART,
            options=PutOptions(content_type="application/dicom", metadata={"a": "b"}),
            state_store=states,
            budget=ByteBudget(budget),
        )
    )


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(7 * PART + 123))  # 8 parts
    return path


def crash(uploads: InProcessUploads, path: Path, after: int) -> MemoryStateStore:
    states = MemoryStateStore()
    uploads.fail_after = after
    with pytest.raises(ConnectionError):
        upload(uploads, path, states, budget=PART)  # one part at a time: the crash point is exact
    uploads.fail_after = None
    # Only what survives a process: the state as JSON.
    fresh = MemoryStateStore()
    fresh.states = json.loads(json.dumps(states.states))
    return fresh


def test_whole_upload_carries_crc32c_and_options(data_file: Path) -> None:
    uploads = InProcessUploads()
    states = MemoryStateStore()
    result = upload(uploads, data_file, states)
    data, options = uploads.objects["k"]
    assert data == data_file.read_bytes()
    assert options.metadata == {"a": "b", CHECKSUM_METADATA_KEY: crc32c_file(data_file)}
    assert options.content_type == "application/dicom"
    assert (result.parts_total, result.parts_sent, result.parts_reused) == (8, 8, 0)
    assert states.states == {}


def test_resume_sends_only_missing_parts(data_file: Path) -> None:
    uploads = InProcessUploads()
    states = crash(uploads, data_file, after=3)
    uploads.sent.clear()
    result = upload(uploads, data_file, states)
    assert sorted(uploads.sent) == [4, 5, 6, 7, 8]
    assert result.resumed and result.parts_reused == 3
    assert uploads.objects["k"][0] == data_file.read_bytes()


def test_part_with_other_bytes_is_sent_again(data_file: Path) -> None:
    uploads = InProcessUploads()
    states = crash(uploads, data_file, after=3)
    session = next(iter(uploads.sessions.values()))
    session[2] = os.urandom(PART)  # same size, other bytes
    session[3] = b"short"  # wrong size
    uploads.sent.clear()
    result = upload(uploads, data_file, states)
    assert sorted(uploads.sent) == [2, 3, 4, 5, 6, 7, 8]
    assert result.parts_rejected == 2
    assert uploads.objects["k"][0] == data_file.read_bytes()


def test_session_gone_starts_over(data_file: Path) -> None:
    uploads = InProcessUploads()
    states = crash(uploads, data_file, after=3)
    uploads.sessions.clear()  # expired on the server
    uploads.sent.clear()
    result = upload(uploads, data_file, states)
    assert sorted(uploads.sent) == list(range(1, 9)) and not result.resumed


def test_changed_file_aborts_old_session_and_starts_over(data_file: Path) -> None:
    uploads = InProcessUploads()
    states = crash(uploads, data_file, after=3)
    old = next(iter(uploads.sessions))
    data_file.write_bytes(os.urandom(7 * PART + 123))
    uploads.sent.clear()
    upload(uploads, data_file, states)
    assert old not in uploads.sessions
    assert sorted(uploads.sent) == list(range(1, 9))
    assert uploads.objects["k"][0] == data_file.read_bytes()


def test_sequential_provider_continues_after_contiguous_parts(data_file: Path) -> None:
    uploads = InProcessUploads(sequential=True, reports_md5=False)
    states = crash(uploads, data_file, after=3)
    del next(iter(uploads.sessions.values()))[2]  # a hole: parts after it cannot be kept
    uploads.sent.clear()
    result = upload(uploads, data_file, states)
    assert uploads.sent == [2, 3, 4, 5, 6, 7, 8]
    assert result.parts_reused == 1


def test_parallel_sends_are_bounded_by_the_budget(data_file: Path) -> None:
    uploads = InProcessUploads()
    upload(uploads, data_file, MemoryStateStore(), budget=2 * PART)
    assert uploads.most_in_flight == 2


def test_limits_are_checked(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(UsageError):
        upload(InProcessUploads(), empty, MemoryStateStore())
    big = tmp_path / "big"
    big.write_bytes(b"x" * (101 * PART))
    with pytest.raises(UsageError, match="parts"):
        upload(InProcessUploads(), big, MemoryStateStore())


def test_file_changing_during_upload_is_refused(data_file: Path) -> None:
    uploads = InProcessUploads()
    original = uploads.upload_part

    async def touching(state: dict[str, Any], number: int, data: bytes | memoryview) -> PartRecord:
        if number == 8:
            stat = data_file.stat()
            os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        return await original(state, number, data)

    uploads.upload_part = touching  # type: ignore[method-assign]
    with pytest.raises(IntegrityError, match="changed"):
        upload(uploads, data_file, MemoryStateStore())
    assert "k" not in uploads.objects


def test_part_range() -> None:
    assert part_range(1, 2500, 1000) == (0, 1000)
    assert part_range(3, 2500, 1000) == (2000, 2500)


def test_a_failed_part_raises_its_own_error_not_a_group(data_file: Path) -> None:
    uploads = InProcessUploads()
    uploads.fail_after = 2
    with pytest.raises(ConnectionError):
        upload(uploads, data_file, MemoryStateStore(), budget=4 * PART)


def test_fit_part_size() -> None:
    uploads = InProcessUploads()  # min 1 byte, at most 100 parts
    quantum = 256 * 1024
    assert fit_part_size(10, 1, uploads) == quantum
    assert fit_part_size(10, quantum + 1, uploads) == 2 * quantum
    assert fit_part_size(1000 * quantum, quantum, uploads) == 10 * quantum  # 100 parts
    uploads.min_part_size = 5 * 1024 * 1024
    assert fit_part_size(10, quantum, uploads) == 5 * 1024 * 1024


class DyingStateStore(MemoryStateStore):
    """The process dies on the n-th save (a kill between the server's answer and the record)."""

    def __init__(self, dies_on: int) -> None:
        super().__init__()
        self.saves = 0
        self.dies_on = dies_on

    def save(self, key: str, state: dict[str, Any]) -> None:
        self.saves += 1
        if self.saves == self.dies_on:
            raise KeyboardInterrupt
        super().save(key, state)


def test_an_upload_begun_but_never_recorded_is_removed_by_the_next_run(data_file: Path) -> None:
    uploads = InProcessUploads()
    dying = DyingStateStore(dies_on=2)  # the marker is saved, the session is not
    with pytest.raises(KeyboardInterrupt):
        upload(uploads, data_file, dying)
    assert len(uploads.sessions) == 1  # begun on the server, unknown to the journal
    states = MemoryStateStore()
    states.states = json.loads(json.dumps(dying.states))
    assert states.load("k") == begin_marker("k")
    result = upload(uploads, data_file, states)
    assert not result.resumed and result.parts_sent == 8
    assert uploads.sessions == {}  # the orphan aborted, the new upload completed
    assert uploads.objects["k"][0] == data_file.read_bytes()


def test_abandon_a_marker_aborts_the_uploads_at_exactly_its_key() -> None:
    uploads = InProcessUploads()
    for key in ("k", "k", "k2", "other"):
        asyncio.run(uploads.begin(key, 10, 10, PutOptions()))
    assert asyncio.run(abandon(uploads, begin_marker("k"), "k")) == 2
    assert sorted(uploads.keys[u] for u in uploads.sessions) == ["k2", "other"]
    # A recorded session is aborted by its id alone.
    session = next(u for u in uploads.sessions if uploads.keys[u] == "k2")
    assert asyncio.run(abandon(uploads, {"upload_id": session}, "k2")) == 1
    assert [uploads.keys[u] for u in uploads.sessions] == ["other"]


def test_a_streamed_upload_removes_what_an_earlier_one_left_and_its_own_on_failure() -> None:
    uploads, states = InProcessUploads(), MemoryStateStore()

    async def attempt(outcome: BaseException | None) -> None:
        async with streamed_upload(uploads, states, "k"):
            await uploads.begin("k", 10, 10, PutOptions())  # what the stream's store does
            assert states.load("k") == begin_marker("k")
            if outcome is not None:
                raise outcome

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(attempt(asyncio.CancelledError()))  # interrupted: upload and marker stay
    assert len(uploads.sessions) == 1 and states.load("k") == begin_marker("k")
    with pytest.raises(ConnectionError):
        asyncio.run(attempt(ConnectionError("down")))  # the earlier upload, then its own, aborted
    assert uploads.sessions == {} and states.load("k") is None
    asyncio.run(attempt(None))
    assert len(uploads.sessions) == 1 and states.load("k") is None  # (completed, in a real store)
