"""Ingest (STOW path): Part 10 only, preamble sanitised, write order, idempotence, sidecars."""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread

from archive_helpers import Run, all_test_files, make_instance, mutated_instances, opened, read_test_file
from dicom_cloud.archive import Archive, ArchiveSettings
from dicom_cloud.archive.parsing import BULK_DATA_THRESHOLD
from dicom_cloud.crypto.envelope import ClientEncryption
from dicom_cloud.crypto.keys import KeyRing, MasterKey
from dicom_cloud.dicom.header import REASON_META_MISMATCH
from dicom_cloud.errors import (
    ConflictError,
    DicomCloudError,
    DicomFormatError,
    IntegrityError,
    NotSupportedError,
    UsageError,
)

STUDY, SERIES, SOP = "1.2.3.4", "1.2.3.4.1", "1.2.3.4.1.1"


@pytest.fixture
def archive(mem_bucket: str) -> Iterator[tuple[Archive, Run]]:
    with opened(ArchiveSettings(f"memory://{mem_bucket}/root", "sqlite://")) as pair:
        yield pair


def _expected_ok(path: Path) -> bool:
    """Whether pydicom reads the file as a Part 10 object with the four identity UIDs."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(BytesIO(data))
        # A file meta naming another SOP Instance UID does not matter: stored with a warning.
        return all(
            k in ds for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID")
        )
    except Exception:
        return False


def test_every_pydicom_test_file_is_stored_or_refused_cleanly(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    stored, refused = [], {}
    # One tenant per file: several test files are the same instance in other encodings.
    for i, path in enumerate(all_test_files()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run(a.store_instance(f"f{i}", path.read_bytes()))
            stored.append(path.name)
            assert len(run(a.search_instances(f"f{i}", {}))) == 1
        except DicomFormatError as exc:
            refused[path.name] = exc.reason
    # Non-DICOM, headless and truncated files are refused; the well-formed ones are stored.
    for name in ("README.txt", "crayons.icc", "ExplVR_LitEndNoMeta.dcm", "MR_truncated.dcm"):
        assert name in refused, name
    for name in (
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "JPEG2000.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "waveform_ecg.dcm",
        "rtplan.dcm",
        "rtdose.dcm",
    ):
        assert name in stored, name
    well_formed = {p.name for p in all_test_files() if _expected_ok(p)}
    assert len(stored) >= 50
    assert set(stored) <= well_formed, set(stored) - well_formed
    assert not (well_formed - set(stored)) - {"MR_truncated.dcm"}, {
        n: refused[n] for n in well_formed - set(stored)
    }


@pytest.mark.parametrize(
    "data",
    [b"", b"hello", b"\0" * 200, b"\0" * 128 + b"DICM", b"\0" * 128 + b"DICM" + b"\xff" * 64],
    ids=["empty", "text", "zeros", "marker-only", "junk-meta"],
)
def test_non_dicom_bodies_are_refused(archive: tuple[Archive, Run], data: bytes) -> None:
    a, run = archive
    with pytest.raises(DicomFormatError) as exc:
        run(a.store_instance("acme", data))
    assert exc.value.http_status == 422
    assert run(a.search_studies("acme", {})) == []


def test_bare_dataset_without_part10_header_is_refused(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    with pytest.raises(DicomFormatError, match="no DICM marker"):
        run(a.store_instance("acme", read_test_file("ExplVR_LitEndNoMeta.dcm")))


@pytest.mark.parametrize("cut", [140, 300, 600])
def test_truncated_instances_are_refused(archive: tuple[Archive, Run], cut: int) -> None:
    a, run = archive
    data = make_instance(STUDY, SERIES, SOP)
    with pytest.raises(DicomFormatError):
        run(a.store_instance("acme", data[:cut]))
    with pytest.raises(DicomFormatError, match="truncated in the pixel data"):
        run(a.store_instance("acme", data[:-10]))


def test_preamble_is_zeroed(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    polyglot = b"MZ\x90\x00" + b"This program cannot be run in DOS mode" + bytes(86)
    data = make_instance(STUDY, SERIES, SOP, preamble=polyglot)
    stored = run(a.store_instance("acme", data))
    assert stored.preamble_sanitised and stored.created
    raw = run(a.store.get(a.store_key(stored.record.object_key)))
    assert bytes(raw[:128]) == bytes(128)
    assert bytes(raw[128:]) == data[128:]
    assert run(a.read_instance(stored.record)) == bytes(raw)


def test_object_names_hold_no_uid_or_patient_data(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    stored = run(a.store_instance("acme", make_instance(STUDY, SERIES, SOP, PatientID="SECRET-ID")))
    keys = [o.key for o in run(_listing(a))]
    assert len(keys) == 2
    for key in keys:
        assert key.startswith("root/acme/")
        assert STUDY not in key and SOP not in key and "SECRET" not in key
    assert stored.record.object_key.startswith("acme/instances/")
    assert stored.record.sidecar_key.startswith("acme/metadata/")


async def _listing(a: Archive) -> list:  # type: ignore[type-arg]
    return [o async for o in a.store.list("")]


def test_same_instance_twice_is_idempotent(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    data = make_instance(STUDY, SERIES, SOP)
    first = run(a.store_instance("acme", data))
    again = run(a.store_instance("acme", data))
    assert first.created and not again.created
    assert again.record == first.record
    assert len(run(a.search_instances("acme", {}))) == 1


def test_same_uid_with_other_content_is_a_conflict_and_changes_nothing(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    first = run(a.store_instance("acme", make_instance(STUDY, SERIES, SOP, PatientName="A^B")))
    before = sorted(o.key for o in run(_listing(a)))
    with pytest.raises(ConflictError) as exc:
        run(a.store_instance("acme", make_instance(STUDY, SERIES, SOP, PatientName="C^D")))
    assert exc.value.http_status == 409
    assert sorted(o.key for o in run(_listing(a))) == before
    assert run(a.read_instance(first.record)) == make_instance(STUDY, SERIES, SOP, PatientName="A^B")


def test_series_filed_under_another_study_is_refused(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    run(a.store_instance("acme", make_instance(STUDY, SERIES, SOP)))
    before = sorted(o.key for o in run(_listing(a)))
    with pytest.raises(ConflictError):
        run(a.store_instance("acme", make_instance("1.2.3.5", SERIES, "1.2.3.5.1.1")))
    assert sorted(o.key for o in run(_listing(a))) == before  # the refused instance's objects are removed


def test_sidecar_equals_the_instance_header(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    for name in (
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "waveform_ecg.dcm",
        "test-SR.dcm",
    ):
        data = read_test_file(name)
        stored = run(a.store_instance("acme", data)).record
        sidecar = run(a.metadata("acme", stored.study_instance_uid, sop_instance_uid=stored.sop_instance_uid))
        assert len(sidecar) == 1
        ds = dcmread(BytesIO(data))
        expected = ds.to_json_dict(
            bulk_data_threshold=BULK_DATA_THRESHOLD,
            bulk_data_element_handler=lambda e: f"bulkdata/{int(e.tag):08X}",
        )
        expected = {k: v for k, v in expected.items() if k <= "7FE00010"}  # trailing padding is dropped
        if "7FE00010" in expected:
            assert sidecar[0]["7FE00010"]["BulkDataURI"] == "bulkdata/7FE00010"
            expected["7FE00010"] = sidecar[0]["7FE00010"]
        assert sidecar[0] == json.loads(json.dumps(expected)), name


def test_metadata_bulk_data_uris_can_be_absolute(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    r = run(a.store_instance("acme", make_instance(STUDY, SERIES, SOP))).record
    meta = run(a.metadata("acme", STUDY, base_url="https://pacs.example/dicomweb/"))
    assert meta[0]["7FE00010"]["BulkDataURI"] == (
        f"https://pacs.example/dicomweb/studies/{STUDY}/series/{SERIES}/instances/{r.sop_instance_uid}"
        "/bulkdata/7FE00010"
    )


def test_failed_object_write_leaves_no_index_row(
    archive: tuple[Archive, Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, run = archive
    calls: list[str] = []
    real_put = a.store.put

    async def failing_put(key, data, options=None):  # type: ignore[no-untyped-def]
        calls.append(key)
        if "/metadata/" in key:
            raise OSError("disk full")
        return await real_put(key, data, options) if options else await real_put(key, data)

    monkeypatch.setattr(a.store, "put", failing_put)
    with pytest.raises(OSError):
        run(a.store_instance("acme", make_instance(STUDY, SERIES, SOP)))
    assert "/instances/" in calls[0] and "/metadata/" in calls[1]  # data first, then sidecar
    assert run(a.search_instances("acme", {})) == []
    assert run(_listing(a)) == []  # the instance object written first is removed again


def test_client_side_encryption_of_every_object(mem_bucket: str) -> None:
    ring = KeyRing(MasterKey(7, bytes(range(32))))
    settings = ArchiveSettings(
        f"memory://{mem_bucket}", "sqlite://", encryption=ClientEncryption(ring=ring, encrypt_as="DC2")
    )
    with opened(settings) as (a, run):
        data = make_instance(STUDY, SERIES, SOP)
        record = run(a.store_instance("acme", data)).record
        assert record.encrypted
        for key in (record.object_key, record.sidecar_key):
            info, raw = run(a.store.read(a.store_key(key)))
            assert info.metadata["dicom_cloud_encryption"] == "DC2"
            assert b"DICM" not in bytes(raw) and b"Doe" not in bytes(raw)
        assert run(a.read_instance(record)) == data
        assert run(a.metadata("acme", STUDY))[0]["00100010"]["Value"] == [{"Alphabetic": "Doe^John"}]
        rendered = run(a.rendered("acme", STUDY, SERIES, SOP, media_type="image/png"))
        derived = [o.key for o in run(_listing(a)) if "/derived/" in o.key]
        assert len(derived) == 1
        assert rendered.data not in bytes(run(a.store.get(derived[0])))


def test_tampered_object_is_an_integrity_error(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    record = run(a.store_instance("acme", make_instance(STUDY, SERIES, SOP))).record
    key = a.store_key(record.object_key)
    data = bytearray(run(a.store.get(key)))
    data[-1] ^= 0xFF
    run(a.store.put(key, bytes(data)))
    with pytest.raises(IntegrityError):
        run(a.read_instance(record))


@pytest.mark.parametrize("tenant", ["", "Acme", "a/b", "../x", "x" * 64, "a b"])
def test_bad_tenant_names_are_refused(archive: tuple[Archive, Run], tenant: str) -> None:
    a, run = archive
    with pytest.raises(UsageError):
        run(a.store_instance(tenant, make_instance(STUDY, SERIES, SOP)))


def test_too_large_instance_is_refused(mem_bucket: str) -> None:
    settings = ArchiveSettings(f"memory://{mem_bucket}", "sqlite://", max_instance_size=1000)
    with opened(settings) as (a, run), pytest.raises(UsageError, match="larger than"):
        run(a.store_instance("acme", make_instance(STUDY, SERIES, SOP, frames=20)))


def test_ingests_beyond_the_memory_budget_wait_their_turn(mem_bucket: str) -> None:
    settings = ArchiveSettings(f"memory://{mem_bucket}", "sqlite://", ingest_memory=1000)
    with opened(settings) as (a, run):
        datas = [make_instance(STUDY, SERIES, f"{SERIES}.{n}") for n in range(6)]

        async def all_at_once() -> list[bool]:
            return [s.created for s in await asyncio.gather(*(a.store_instance("acme", d) for d in datas))]

        assert run(all_at_once()) == [True] * 6
        assert a._budget.used == 0


@pytest.mark.filterwarnings("ignore")
def test_mutated_instances_are_stored_or_refused_with_typed_errors(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    outcomes = {"stored": 0, "refused": 0}
    for i, data in enumerate(mutated_instances(seed=7, count=150)):
        tenant = f"m{i}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                record = run(a.store_instance(tenant, data)).record
        except DicomFormatError:
            outcomes["refused"] += 1
            continue
        outcomes["stored"] += 1
        uids = (record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid)
        for call in (
            a.frames(tenant, *uids, [1]),
            a.rendered(tenant, *uids, media_type="image/png"),
            a.metadata(tenant, *uids),
            a.bulkdata(tenant, *uids, "7FE00010"),
        ):
            try:
                run(call)
            except DicomCloudError as exc:
                assert exc.http_status < 500 or isinstance(exc, NotSupportedError), exc
    assert outcomes["stored"] > 20 and outcomes["refused"] > 20, outcomes


@pytest.mark.parametrize("name", ["rtplan.dcm", "rtdose.dcm"])
def test_file_meta_naming_another_instance_is_stored_under_the_dataset_uid_with_a_warning(
    archive: tuple[Archive, Run], name: str, caplog: pytest.LogCaptureFixture
) -> None:
    a, run = archive
    data = read_test_file(name)
    ds = dcmread(BytesIO(data))
    assert ds.file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID
    with caplog.at_level("WARNING", logger="dicom_cloud.archive"):
        stored = run(a.store_instance("acme", data))
    assert stored.created and stored.warnings == (REASON_META_MISMATCH,)
    assert stored.record.sop_instance_uid == ds.SOPInstanceUID
    found = run(a.search_instances("acme", {"SOPInstanceUID": ds.SOPInstanceUID}))
    assert [f["00080018"]["Value"] for f in found] == [[ds.SOPInstanceUID]]
    assert run(a.search_instances("acme", {"SOPInstanceUID": ds.file_meta.MediaStorageSOPInstanceUID})) == []
    assert run(a.read_instance(stored.record)) == data  # the bytes are kept as sent
    # Logged without UIDs or any other value of the instance.
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert REASON_META_MISMATCH in logged
    assert ds.SOPInstanceUID not in logged and ds.file_meta.MediaStorageSOPInstanceUID not in logged
    # Stored again: the same idempotent answer, with the same warning.
    again = run(a.store_instance("acme", data))
    assert not again.created and again.warnings == (REASON_META_MISMATCH,)
    assert not run(a.store_instance("acme", read_test_file("CT_small.dcm"))).warnings


def test_an_instance_is_read_by_pydicom_once(
    archive: tuple[Archive, Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The strict checks, the indexed attributes and the sidecar come from one read of the header
    (none by pydicom for an instance of the plain shape that the archive reads itself)."""
    from dicom_cloud.dicom import header

    reads: list[int] = []
    original = header.read_partial

    def counted(*args: object, **kwargs: object) -> object:
        reads.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(header, "read_partial", counted)
    monkeypatch.setattr("dicom_cloud.archive.parsing.dcmread", None)  # the second read there is gone
    a, run = archive
    stored = run(a.store_instance("acme", make_instance(STUDY, SERIES, SOP)))
    assert stored.created and len(reads) == 0
    not_ascii = make_instance(
        STUDY, SERIES, SOP + ".2", SpecificCharacterSet="ISO_IR 192", InstitutionName="Caf\u00e9"
    )
    stored = run(a.store_instance("acme", not_ascii))
    assert stored.created and len(reads) == 1


def test_reads_of_the_index_do_not_wait_for_the_writer(tmp_path: Path) -> None:
    """Searches and lookups read a snapshot beside a write in progress (SQLite, WAL)."""
    import threading

    from sqlalchemy import select

    from dicom_cloud.archive.db import Database, upgrade_schema
    from dicom_cloud.archive.models import Instance

    db = Database(f"sqlite:///{tmp_path}/index.db")
    upgrade_schema(db.engine)
    writing, done = threading.Event(), threading.Event()

    def long_write(session: object) -> None:
        writing.set()
        done.wait(60)

    writer = threading.Thread(target=db.run_sync, args=(long_write,))
    writer.start()
    try:
        assert writing.wait(30)
        assert db.read_sync(lambda s: list(s.scalars(select(Instance.id)))) == []
    finally:
        done.set()
        writer.join(60)
        db.close()
