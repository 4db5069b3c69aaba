"""What the completion of a direct upload checks beyond size and CRC32C (the stores' signatures
may not bind them): content type, write time against the URL's expiry; larger-than-declared
objects deleted rather than quarantined; staging objects of finished sessions swept."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from archive_helpers import Run, make_instance, opened
from dicom_cloud.archive import Archive, ArchiveSettings, DeclaredFile
from dicom_cloud.archive.bucket import BucketLayout
from dicom_cloud.store import PutOptions

STUDY = "1.2.7"


@pytest.fixture
def archive(mem_bucket: str) -> Iterator[tuple[Archive, Run]]:
    with opened(ArchiveSettings(f"memory://{mem_bucket}", "sqlite://")) as pair:
        yield pair


async def _keys(a: Archive) -> list[str]:
    return [o.key async for o in a.store.list("")]


def test_content_type_write_time_and_oversize(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    data = [make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.{n}") for n in range(5)]
    future = datetime.now(UTC) + timedelta(minutes=10)
    past = datetime.now(UTC) - timedelta(minutes=10)
    files = [
        DeclaredFile("typed.dcm", len(data[0]), content_type="application/dicom", put_by=future),
        DeclaredFile("other-type.dcm", len(data[1]), content_type="application/dicom", put_by=future),
        DeclaredFile("late.dcm", len(data[2]), content_type="application/dicom", put_by=past),
        DeclaredFile("larger.dcm", len(data[3]) - 1, content_type="application/dicom"),
        DeclaredFile("untyped.dcm", len(data[4]), content_type="application/dicom"),
    ]
    upload = run(a.create_upload("acme", files))
    # Declarations survive the round trip through the session row.
    assert run(a.get_upload("acme", upload.id)).files == upload.files == tuple(files)
    types = [
        "application/dicom; charset=binary",
        "text/plain",
        "application/dicom",
        "application/dicom",
        None,
    ]
    for key, body, content_type in zip(upload.staging_keys, data, types, strict=True):
        run(a.store.put(a.store_key(key), body, PutOptions(content_type=content_type)))
    outcome = run(a.complete_upload("acme", upload.id))
    assert sorted(f.name for f in outcome.accepted) == ["typed.dcm", "untyped.dcm"]
    rejected = {f.name: (f.reason, f.quarantine_key) for f in outcome.rejected}
    assert rejected["other-type.dcm"][0] == "stored with another content type than declared"
    assert rejected["late.dcm"][0] == "written after its upload URL expired"
    assert rejected["larger.dcm"] == ("size differs from the declared size", None)  # deleted
    keys = run(_keys(a))
    assert not [k for k in keys if "/staging/" in k]
    assert len([k for k in keys if "/quarantine/" in k and not k.endswith(".json")]) == 2


def test_staging_objects_of_finished_sessions_are_swept(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    data = make_instance(STUDY, f"{STUDY}.2", f"{STUDY}.2.1")
    done = run(a.create_upload("acme", [DeclaredFile("a.dcm", len(data))]))
    run(a.store.put(a.store_key(done.staging_keys[0]), data))
    run(a.complete_upload("acme", done.id))
    # A URL used again after completion writes a staging object no session will ingest.
    run(a.store.put(a.store_key(done.staging_keys[0]), data))
    open_ = run(a.create_upload("acme", [DeclaredFile("b.dcm", len(data))]))
    run(a.store.put(a.store_key(open_.staging_keys[0]), data))
    # What a crash leaves of a STOW-RS request's staged parts: objects of no session at all.
    run(a.store.put(a.store_key(BucketLayout.staging_key("acme", "stow-0123456789ab", 0)), data))
    sweep = run(a.sweep_orphans(older_than=timedelta(0)))
    assert sweep.orphans == sweep.removed == 2
    staged = [k for k in run(_keys(a)) if "/staging/" in k]
    assert staged == [a.store_key(open_.staging_keys[0])]  # the open session's object stays
    dry = run(a.collect_orphans("acme", older_than=timedelta(0), dry_run=True))
    assert dry.orphans == 0
