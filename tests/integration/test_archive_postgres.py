"""The archive on the real servers: PostgreSQL for the index, SeaweedFS (S3) for the objects.

Each test gets a fresh PostgreSQL database (dropped afterwards) and a fresh bucket. Covers what
SQLite or memory:// cannot show: the PostgreSQL dialect (LIKE, JSON, locks, migrations under the
advisory lock), concurrent writers racing on the same rows, presigned uploads with real signed
URLs, ranged header reads and server-side copies into quarantine.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from io import BytesIO

import httpx
import psycopg
import pytest
from PIL import Image

from archive_helpers import (
    QIDO_EXTRA_TAGS,
    STUDY_MATCHING_CASES,
    Run,
    all_test_files,
    load_qido_corpus,
    make_instance,
    mutated_instances,
    opened,
    random_queries,
    read_test_file,
)
from dicom_cloud.archive import Archive, ArchiveSettings, DeclaredFile
from dicom_cloud.archive.db import Database
from dicom_cloud.backends import StoreConfig
from dicom_cloud.checksum import Crc32c, crc32c_hex
from dicom_cloud.crypto.envelope import ClientEncryption
from dicom_cloud.crypto.keys import KeyRing, MasterKey
from dicom_cloud.errors import ConflictError, DicomFormatError, NotFoundError, UsageError
from servers import S3Server

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
STUDY = "1.2.826.0.1.3680043.9.1"


@contextmanager
def fresh_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped on exit."""
    name = f"dc_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at 127.0.0.1:5432: {exc}", pytrace=False)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="module")
def qido_archive() -> Iterator[tuple[Archive, Run]]:
    """The QIDO corpus of the unit tests, indexed in PostgreSQL (objects in memory)."""
    with fresh_database() as url:
        settings = ArchiveSettings("memory://qido-postgres", url, extra_query_tags=QIDO_EXTRA_TAGS)
        with opened(settings) as (a, run):
            load_qido_corpus(a, run)
            yield a, run


@pytest.mark.parametrize(("params", "expected"), STUDY_MATCHING_CASES)
def test_study_matching_on_postgresql(
    qido_archive: tuple[Archive, Run], params: dict[str, object], expected: list[str]
) -> None:
    a, run = qido_archive
    found = run(a.search_studies("acme", params))  # type: ignore[arg-type]
    assert [r["0020000D"]["Value"][0] for r in found] == expected


@pytest.fixture
def s3_settings(seaweedfs: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> StoreConfig:
    for var, value in seaweedfs.env().items():
        monkeypatch.setenv(var, value)
    return StoreConfig(endpoint=seaweedfs.endpoint, region=seaweedfs.region)


@pytest.fixture
def archive(pg_url: str, s3_bucket: str, s3_settings: StoreConfig) -> Iterator[tuple[Archive, Run]]:
    settings = ArchiveSettings(
        f"s3://{s3_bucket}/archive",
        pg_url,
        store_config=s3_settings,
        extra_query_tags=["InstitutionName", "00180015"],
    )
    with opened(settings) as pair:
        yield pair


async def _keys(a: Archive) -> list[str]:
    return [o.key async for o in a.store.list("")]


def test_random_queries_on_postgresql(qido_archive: tuple[Archive, Run]) -> None:
    """PostgreSQL refuses what SQLite takes (NUL in text, out-of-range integers): never a 500."""
    a, run = qido_archive
    for i, params in enumerate(random_queries(seed=2, count=300)):
        search = (a.search_studies, a.search_series, a.search_instances)[i % 3]
        with contextlib.suppress(UsageError):
            run(search("acme", params))


@pytest.mark.filterwarnings("ignore")
def test_mutated_instances_on_postgresql(pg_url: str) -> None:
    settings = ArchiveSettings("memory://mutated-postgres", pg_url, extra_query_tags=["BodyPartExamined"])
    with opened(settings) as (a, run):
        stored = 0
        for i, data in enumerate(mutated_instances(seed=11, count=120)):
            try:
                run(a.store_instance(f"m{i}", data))
                stored += 1
            except DicomFormatError:
                pass
        assert stored > 10


def test_migrations_match_the_models_on_postgresql(pg_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from dicom_cloud.archive.db import upgrade_schema
    from dicom_cloud.archive.models import Base

    db = Database(pg_url)
    upgrade_schema(db.engine)
    upgrade_schema(db.engine)
    with db.engine.connect() as conn:
        assert (
            compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
            == []
        )
    db.close()


def test_concurrent_opens_migrate_once(pg_url: str, s3_bucket: str, s3_settings: StoreConfig) -> None:
    settings = ArchiveSettings(f"s3://{s3_bucket}", pg_url, store_config=s3_settings)

    async def main() -> None:
        archives = await asyncio.gather(*(Archive.open(settings) for _ in range(4)))
        for a in archives:
            await a.close()

    asyncio.run(main())


def test_pydicom_files_round_trip(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    stored = 0
    for i, path in enumerate(all_test_files()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                record = run(a.store_instance(f"t{i}", path.read_bytes())).record
        except DicomFormatError:
            continue
        stored += 1
        assert run(a.read_instance(record))[128:] == path.read_bytes()[128:]
        [found] = run(a.search_instances(f"t{i}", {"includefield": "all"}))
        assert found["00080018"]["Value"] == [record.sop_instance_uid]
        assert len(run(a.metadata(f"t{i}", record.study_instance_uid))) == 1
        # One instance by its three UIDs (per-instance WADO-RS): the textual lookup on PostgreSQL.
        uids = (record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid)
        assert run(a.instances(f"t{i}", *uids)) == [record]
        found_record, data = run(a.instance_with_bytes(f"t{i}", *uids, max_size=1 << 30))
        assert found_record == record and data == run(a.read_instance(record))
    assert stored >= 50


def test_queries_on_postgresql(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    rows = [
        ("1", "Doe^John", "20200115", "093000", "CT", "St Mary"),
        ("2", "DOE^JANE", "20201231", "1430", "MR", "General Hospital"),
        ("3", "Roe^R", "20210601", "", "CT", "50%_off clinic"),
    ]
    for n, name, date, time, modality, institution in rows:
        extra = {"StudyTime": time} if time else {}
        run(
            a.store_instance(
                "acme",
                make_instance(
                    f"{STUDY}.{n}",
                    f"{STUDY}.{n}.1",
                    f"{STUDY}.{n}.1.1",
                    PatientID=f"P{n}",
                    PatientName=name,
                    StudyDate=date,
                    Modality=modality,
                    InstitutionName=institution,
                    **extra,
                ),
            )
        )
    run(a.store_instance("other", make_instance(f"{STUDY}.1", f"{STUDY}.1.1", f"{STUDY}.1.1.1")))

    def uids(**params: str) -> list[str]:
        return [r["0020000D"]["Value"][0][-1] for r in run(a.search_studies("acme", params))]

    assert uids() == ["1", "2", "3"]
    assert uids(PatientName="doe*") == ["1", "2"]
    assert uids(PatientName="DOE^JOHN") == ["1"]
    assert uids(StudyDate="20200101-20201231") == ["1", "2"]
    assert uids(StudyDate="20210101-") == ["3"]
    assert uids(StudyTime="1400-1500") == ["2"]
    assert uids(ModalitiesInStudy="CT") == ["1", "3"]
    assert uids(StudyInstanceUID=f"{STUDY}.1\\{STUDY}.3") == ["1", "3"]
    assert uids(InstitutionName="*%*") == ["3"]
    assert uids(InstitutionName="st mary") == []  # case-sensitive as on SQLite
    assert uids(limit="1", offset="1") == ["2"]
    assert uids(PatientID="' OR 1=1 --") == []
    [s] = run(a.search_studies("acme", {"PatientName": "Roe*", "includefield": "00080080"}))
    assert s["00080080"]["Value"] == ["50%_off clinic"]
    assert s["00201208"]["Value"] == [1]
    run(a.set_labels("acme", f"{STUDY}.2", tags=["review"], description="Check the MR"))
    assert uids(label="review") == ["2"]
    assert uids(labeldescription="*mr*") == ["2"]
    assert len(run(a.search_studies("other", {}))) == 1
    with pytest.raises(NotFoundError):
        run(a.get_labels("other", f"{STUDY}.2"))


def test_racing_writers_store_each_instance_once(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    series = [make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.{n}", InstanceNumber=n) for n in range(6)]

    async def race() -> list[bool]:
        # The same six instances sent three times at once: study, series and instance rows race.
        results = await asyncio.gather(*(a.store_instance("acme", d) for d in series * 3))
        return [r.created for r in results]

    created = run(race())
    assert sum(created) == 6
    assert len(run(a.search_instances("acme", {}))) == 6
    assert len(run(a.search_studies("acme", {}))) == 1
    assert len(run(_keys(a))) == 12

    async def conflict() -> list[object]:
        other = [make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.9", PatientName=f"N^{i}") for i in range(4)]
        return await asyncio.gather(*(a.store_instance("acme", d) for d in other), return_exceptions=True)

    outcomes = run(conflict())
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 1
    assert all(isinstance(o, ConflictError) for o in outcomes if isinstance(o, BaseException))
    assert len(run(_keys(a))) == 14  # the losers' objects are removed


def test_presigned_upload_with_quarantine(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    good = make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.1", preamble=b"II*\x00" + bytes(124))
    junk = b"GIF89a" + bytes(500)
    files = [DeclaredFile("good.dcm", len(good), crc32c_hex(good)), DeclaredFile("junk.gif", len(junk))]
    upload = run(a.create_upload("acme", files))
    urls = run(a.upload_urls(upload))
    for url, data in zip(urls, (good, junk), strict=True):
        response = httpx.put(url, content=data, timeout=30)
        assert response.status_code in (200, 201), response.text
    outcome = run(a.complete_upload("acme", upload.id))
    assert [f.name for f in outcome.accepted] == ["good.dcm"]
    [rejected] = outcome.rejected
    assert rejected.reason == "not DICOM (no DICM marker)"
    keys = run(_keys(a))
    assert f"archive/{rejected.quarantine_key}" in keys
    assert f"archive/{rejected.quarantine_key}.reason.json" in keys
    assert not [k for k in keys if "/staging/" in k]
    [record] = run(a.instances("acme", STUDY))
    assert run(a.read_instance(record))[:128] == bytes(128)
    assert run(a.complete_upload("acme", upload.id)) == outcome
    sweep = run(a.collect_orphans("acme", older_than=timedelta(0)))  # keys under the archive/ root
    assert (sweep.scanned, sweep.orphans) == (2, 0)


def test_retrieve_render_delete_with_encryption(
    pg_url: str, s3_bucket: str, s3_settings: StoreConfig
) -> None:
    ring = KeyRing(MasterKey(3, bytes(range(32, 64))))
    settings = ArchiveSettings(
        f"s3://{s3_bucket}", pg_url, store_config=s3_settings, encryption=ClientEncryption(ring, "A1")
    )
    with opened(settings) as (a, run):
        data = read_test_file("MR_small_RLE.dcm")
        record = run(a.store_instance("acme", data)).record
        raw = bytes(run(a.store.get(record.object_key)))
        assert raw[:2] == b"A1" and b"DICM" not in raw
        assert run(a.read_instance(record))[128:] == data[128:]
        uids = (record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid)
        frames = run(a.frames("acme", *uids, [1]))
        assert frames.encapsulated and frames.transfer_syntax_uid == "1.2.840.10008.1.2.5"
        png = run(a.rendered("acme", *uids, media_type="image/png"))
        with Image.open(BytesIO(png.data)) as image:
            assert image.size == (64, 64)
        assert run(a.rendered("acme", *uids, media_type="image/png")).cached
        token, _ = run(a.create_token("acme", "viewer", ["read"]))
        assert run(a.authenticate(token)) is not None
        share, link = run(a.create_share("acme", record.study_instance_uid, timedelta(hours=1)))
        assert run(a.resolve_share(share)) == link
        result = run(a.delete("acme", record.study_instance_uid))
        assert (result.studies, result.instances) == (1, 1)
        assert run(_keys(a)) == []


def test_large_presigned_upload_is_streamed_in_parts(
    pg_url: str, s3_bucket: str, s3_settings: StoreConfig
) -> None:
    """A 21 MB instance above the stream threshold: copied into place as a multipart upload
    (8 MiB parts), DC2-encrypted on the way, and read back as a stream."""
    ring = KeyRing(MasterKey(4, bytes(range(64, 96))))
    settings = ArchiveSettings(
        f"s3://{s3_bucket}/big",
        pg_url,
        store_config=s3_settings,
        encryption=ClientEncryption(ring, "DC2"),
        stream_threshold=1024 * 1024,
    )
    data = make_instance(
        STUDY, f"{STUDY}.1", f"{STUDY}.1.1", frames=40, side=512, preamble=b"\x7fELF" + bytes(124)
    )
    with opened(settings) as (a, run):
        upload = run(a.create_upload("acme", [DeclaredFile("big.dcm", len(data), crc32c_hex(data))]))
        [url] = run(a.upload_urls(upload))
        assert httpx.put(url, content=data, timeout=120).status_code in (200, 201)
        outcome = run(a.complete_upload("acme", upload.id))
        assert [f.name for f in outcome.accepted] == ["big.dcm"], outcome
        [record] = run(a.instances("acme", STUDY))
        expected = bytes(128) + data[128:]
        assert (record.size, record.crc32c) == (len(expected), crc32c_hex(expected))
        info = run(a.store.stat(a.store_key(record.object_key)))
        assert info.metadata["dicom_cloud_encryption"] == "DC2" and info.size > len(data)

        async def streamed() -> tuple[int, str]:
            crc, size = Crc32c(), 0
            async for chunk in a.stream_instance(record):
                crc.update(chunk)
                size += len(chunk)
            return size, crc.hexdigest()

        assert run(streamed()) == (record.size, record.crc32c)
        assert run(a.metadata("acme", STUDY))[0]["00280008"]["Value"] == [40]
        assert not [k for k in run(_keys(a)) if "/staging/" in k]
