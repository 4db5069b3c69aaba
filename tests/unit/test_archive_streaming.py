"""Presigned uploads above the stream threshold: ingested as streams, read back as streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from archive_helpers import Run, make_instance, opened, read_test_file
from dicom_cloud.archive import Archive, ArchiveSettings, InstanceRecord
from dicom_cloud.checksum import crc32c_hex
from dicom_cloud.crypto.envelope import ClientEncryption
from dicom_cloud.crypto.keys import KeyRing, MasterKey
from dicom_cloud.errors import ConflictError, DicomFormatError, IntegrityError, RejectedObjectError
from dicom_cloud.store import PutOptions

STUDY, SERIES = "1.2.7", "1.2.7.1"
RING = KeyRing(MasterKey(9, bytes(range(100, 132))))


def _settings(bucket: str, fmt: str | None = None) -> ArchiveSettings:
    encryption = ClientEncryption(RING, fmt) if fmt else None  # type: ignore[arg-type]
    return ArchiveSettings(f"memory://{bucket}", "sqlite://", stream_threshold=1000, encryption=encryption)


@pytest.fixture(params=[None, "A1", "DC2"], ids=["plain", "A1", "DC2"])
def archive(request: pytest.FixtureRequest, mem_bucket: str) -> Iterator[tuple[Archive, Run]]:
    with opened(_settings(mem_bucket, request.param)) as pair:
        yield pair


def _stage(a: Archive, run: Run, data: bytes, name: str = "0") -> str:
    key = f"acme/staging/s1/{name}"
    run(a.store.put(a.store_key(key), data))
    return key


async def _streamed(a: Archive, record: InstanceRecord, chunk_size: int = 1000) -> bytes:
    return b"".join([chunk async for chunk in a.stream_instance(record, chunk_size=chunk_size)])


def test_streamed_ingest_equals_the_in_memory_one(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    data = make_instance(STUDY, SERIES, f"{SERIES}.1", preamble=b"MZ" + bytes(126), frames=40, side=64)
    assert len(data) > 300_000
    stored = run(a.ingest_object("acme", _stage(a, run, data), len(data), crc32c_hex(data)))
    assert stored.created and stored.preamble_sanitised
    expected = bytes(128) + data[128:]
    assert stored.record.size == len(expected) and stored.record.crc32c == crc32c_hex(expected)
    assert run(a.read_instance(stored.record)) == expected
    assert run(_streamed(a, stored.record)) == expected
    assert run(_streamed(a, stored.record, chunk_size=64 * 1024)) == expected
    # The same instance stored in memory by STOW gives the same sidecar and the same record.
    other = run(a.store_instance("beta", data)).record
    assert run(a.metadata("acme", STUDY)) == run(a.metadata("beta", STUDY))
    assert (other.object_key.split("/", 1)[1], other.crc32c) == (
        stored.record.object_key.split("/", 1)[1],
        stored.record.crc32c,
    )
    frames = run(a.frames("acme", STUDY, SERIES, f"{SERIES}.1", [40]))
    assert frames.frames == [bytes([39, 0]) * 64 * 64]
    # Uploading it again is idempotent; staging is emptied each time.
    again = run(a.ingest_object("acme", _stage(a, run, data, "1"), len(data)))
    assert not again.created
    assert not [o for o in run(_listing(a)) if "/staging/" in o.key]


def test_streamed_refusals_are_quarantined(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    data = make_instance(STUDY, SERIES, f"{SERIES}.1", frames=10, side=32)
    with pytest.raises(RejectedObjectError, match="CRC32C differs"):
        run(a.ingest_object("acme", _stage(a, run, data, "0"), len(data), "00000000"))
    with pytest.raises(RejectedObjectError, match="truncated in the pixel data"):
        run(a.ingest_object("acme", _stage(a, run, data[:-100], "1"), len(data) - 100))
    truncated = read_test_file("MR_truncated.dcm")
    with pytest.raises(RejectedObjectError, match="truncated"):
        run(a.ingest_object("acme", _stage(a, run, truncated, "2")))
    with pytest.raises(RejectedObjectError, match="no DICM"):
        run(a.ingest_object("acme", _stage(a, run, b"x" * 5000, "3")))
    run(a.ingest_object("acme", _stage(a, run, data, "4")))
    changed = make_instance(STUDY, SERIES, f"{SERIES}.1", frames=10, side=32, PatientName="Other^Name")
    with pytest.raises(RejectedObjectError, match="another instance"):
        run(a.ingest_object("acme", _stage(a, run, changed, "5")))
    keys = [o.key for o in run(_listing(a))]
    assert not [k for k in keys if "/staging/" in k]
    assert len([k for k in keys if "/quarantine/" in k and not k.endswith(".json")]) == 5
    assert len(run(a.search_instances("acme", {}))) == 1


async def _listing(a: Archive) -> list:  # type: ignore[type-arg]
    return [o async for o in a.store.list("")]


def test_stream_instance_detects_tampering(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    data = make_instance(STUDY, SERIES, f"{SERIES}.1", frames=10, side=32)
    record = run(a.ingest_object("acme", _stage(a, run, data), len(data))).record
    key = a.store_key(record.object_key)
    info, blob = run(a.store.read(key))
    tampered = bytearray(blob)
    tampered[len(tampered) // 2] ^= 1
    run(a.store.put(key, bytes(tampered), PutOptions(metadata=dict(info.metadata))))
    with pytest.raises(IntegrityError):
        run(_streamed(a, record))


def _header_of(data: bytes) -> bytes:
    return data[: data.index(b"\xe0\x7f\x10\x00")]


def test_junk_after_a_valid_header_is_refused_before_parsing(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    junk = _header_of(make_instance(STUDY, SERIES, f"{SERIES}.1")) + bytes(200_000)
    with pytest.raises(RejectedObjectError, match="unreadable header"):
        run(a.ingest_object("acme", _stage(a, run, junk)))


async def _chunks(data: bytes, size: int = 7000, fail_after: int | None = None) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        if fail_after is not None and start >= fail_after:
            raise MalformedInput("the body was cut short")
        yield data[start : start + size]


class MalformedInput(Exception):
    pass


def test_store_instance_stream_stores_what_store_instance_stores(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    data = make_instance(STUDY, SERIES, f"{SERIES}.1", preamble=b"MZ" + bytes(126), frames=20, side=64)
    streamed = run(a.store_instance_stream("acme", _chunks(data)))
    held = run(a.store_instance("beta", data))
    assert streamed.created and streamed.preamble_sanitised
    assert (streamed.record.size, streamed.record.crc32c) == (held.record.size, held.record.crc32c)
    assert run(a.read_instance(streamed.record)) == bytes(128) + data[128:]
    assert not run(a.store_instance_stream("acme", _chunks(data))).created
    # Refusals keep nothing: no quarantine copy, no staging object.
    with pytest.raises(DicomFormatError, match="unreadable header"):
        run(a.store_instance_stream("acme", _chunks(_header_of(data) + bytes(100_000))))
    with pytest.raises(DicomFormatError, match="truncated in the pixel data"):
        run(a.store_instance_stream("acme", _chunks(make_instance(STUDY, SERIES, "1.2.7.1.2")[:-100])))
    with pytest.raises(ConflictError):
        changed = make_instance(STUDY, SERIES, f"{SERIES}.1", frames=20, side=64, PatientName="Other^Name")
        run(a.store_instance_stream("acme", _chunks(changed)))
    # A stream that fails stores nothing.
    with pytest.raises(MalformedInput):
        run(
            a.store_instance_stream(
                "acme",
                _chunks(make_instance(STUDY, SERIES, "1.2.7.1.3", frames=10, side=32), 500, fail_after=1000),
            )
        )
    keys = [o.key for o in run(_listing(a))]
    assert not [k for k in keys if "/staging/" in k or "/quarantine/" in k]
    assert len(run(a.search_instances("acme", {}))) == 1
