"""Batched ingest (``Archive.store_instances``, the parts of one STOW-RS request): the outcome of
each instance is what storing them one by one gives, with one index transaction for the batch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from archive_helpers import Run, make_instance, opened
from dicom_cloud.archive import Archive, ArchiveSettings, StoredInstance
from dicom_cloud.archive import db as db_module
from dicom_cloud.archive.db import Database
from dicom_cloud.errors import ConflictError, DicomFormatError, NetworkError, UsageError

STUDY, SERIES = "1.2.3.4", "1.2.3.4.1"


@pytest.fixture
def archive(mem_bucket: str) -> Iterator[tuple[Archive, Run]]:
    with opened(ArchiveSettings(f"memory://{mem_bucket}/root", "sqlite://")) as pair:
        yield pair


def _keys(a: Archive, run: Run) -> list[str]:
    async def listing() -> list[str]:
        return sorted([o.key async for o in a.store.list("")])

    return run(listing())


def _sop(i: int) -> str:
    return f"{SERIES}.{i}"


def test_a_batch_of_new_instances_is_indexed_in_one_transaction(
    archive: tuple[Archive, Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, run = archive
    transactions: list[int] = []
    real = Database.run_sync

    def counted(self: Database, work, units=1):  # type: ignore[no-untyped-def]
        transactions.append(units)
        return real(self, work, units)

    monkeypatch.setattr(Database, "run_sync", counted)
    parts = [make_instance(STUDY, SERIES, _sop(i), InstanceNumber=i) for i in range(20)]
    results = run(a.store_instances("acme", parts))
    assert all(isinstance(r, StoredInstance) and r.created for r in results)
    assert [r.record.sop_instance_uid for r in results if isinstance(r, StoredInstance)] == [
        _sop(i) for i in range(20)
    ]
    assert transactions == [20]
    assert len(run(a.search_instances("acme", {}))) == 20
    assert len(_keys(a, run)) == 40  # an object and a sidecar each
    again = run(a.store_instances("acme", parts))
    assert all(isinstance(r, StoredInstance) and not r.created for r in again)
    assert transactions == [20]  # all found stored: no write at all


def test_each_outcome_is_what_storing_one_by_one_gives(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    stored_before = make_instance(STUDY, SERIES, _sop(0), PatientName="A^B")
    run(a.store_instance("acme", stored_before))
    parts = [
        make_instance(STUDY, SERIES, _sop(1)),  # new
        stored_before,  # stored already, same bytes
        make_instance(STUDY, SERIES, _sop(0), PatientName="C^D"),  # stored already, other bytes
        b"\0" * 128 + b"DICM" + b"\0" * 64,  # not DICOM
        make_instance(STUDY, SERIES, _sop(2)),  # new ...
        make_instance(STUDY, SERIES, _sop(2)),  # ... and the same again in this batch
        make_instance(STUDY, SERIES, _sop(3), PatientName="E^F"),  # new ...
        make_instance(STUDY, SERIES, _sop(3), PatientName="G^H"),  # ... and other bytes in this batch
    ]
    results = run(a.store_instances("acme", parts))
    kinds = [
        ("created" if r.created else "same") if isinstance(r, StoredInstance) else type(r).__name__
        for r in results
    ]
    assert kinds == [
        "created",
        "same",
        "ConflictError",
        "DicomFormatError",
        "created",
        "same",
        "created",
        "ConflictError",
    ]
    assert isinstance(results[3], DicomFormatError) and results[3].reason
    assert len(run(a.search_instances("acme", {}))) == 4
    assert len(_keys(a, run)) == 8  # nothing kept of the refused ones


def test_a_series_under_another_study_falls_back_to_one_by_one(archive: tuple[Archive, Run]) -> None:
    """The batch's transaction fails whole: each instance is indexed on its own, and only the
    inconsistent one is refused (as it is when stored alone)."""
    a, run = archive
    run(a.store_instance("acme", make_instance(STUDY, SERIES, _sop(0))))
    parts = [
        make_instance(STUDY, SERIES, _sop(1)),
        make_instance("1.2.3.5", SERIES, "1.2.3.5.1.1"),  # SERIES is filed under STUDY
        make_instance(STUDY, SERIES, _sop(2)),
    ]
    results = run(a.store_instances("acme", parts))
    assert isinstance(results[0], StoredInstance) and results[0].created
    assert isinstance(results[1], ConflictError)
    assert isinstance(results[2], StoredInstance) and results[2].created
    assert len(run(a.search_instances("acme", {}))) == 3
    assert len(_keys(a, run)) == 6


def test_too_large_instances_of_a_batch_are_refused_alone(mem_bucket: str) -> None:
    settings = ArchiveSettings(f"memory://{mem_bucket}/root", "sqlite://", max_instance_size=4000)
    with opened(settings) as (a, run):
        parts = [make_instance(STUDY, SERIES, _sop(1)), make_instance(STUDY, SERIES, _sop(2), side=64)]
        results = run(a.store_instances("acme", parts))
        assert isinstance(results[0], StoredInstance) and isinstance(results[1], UsageError)


def test_a_store_that_is_down_fails_the_batch_and_leaves_nothing(
    archive: tuple[Archive, Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, run = archive
    real_put = a.store.put
    calls = 0

    async def failing_put(key, data, options=None):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 5:
            raise NetworkError("the store is unreachable")
        return await real_put(key, data, options) if options else await real_put(key, data)

    monkeypatch.setattr(a.store, "put", failing_put)
    parts = [make_instance(STUDY, SERIES, _sop(i)) for i in range(6)]
    with pytest.raises(NetworkError):
        run(a.store_instances("acme", parts))
    monkeypatch.setattr(a.store, "put", real_put)
    assert run(a.search_instances("acme", {})) == []
    assert _keys(a, run) == []


def test_a_batch_counts_as_its_instances_towards_the_planner_statistics(
    archive: tuple[Archive, Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's statistics are refreshed every so many units of work: a fill by batches of 25
    must refresh them as often as 25 stores one by one would, not once per 25."""
    a, run = archive
    refreshed = 0
    real = Database.refresh_statistics

    def counted(self: Database) -> None:
        nonlocal refreshed
        refreshed += 1
        real(self)

    monkeypatch.setattr(db_module, "_STATISTICS_EVERY", 10)
    monkeypatch.setattr(Database, "refresh_statistics", counted)
    run(a.store_instances("acme", [make_instance(STUDY, SERIES, _sop(i)) for i in range(25)]))
    assert refreshed >= 2  # the lookup of 25 and the insert of 25: each crosses a multiple of 10


def test_levels_shared_by_a_batch_end_as_stored_one_by_one(mem_bucket: str) -> None:
    """The patient, study and series rows a batch shares are looked up once per transaction: the
    values they end with (a patient's latest, a study's and a series' first seen) are what storing
    the same instances one request at a time leaves."""
    parts = [
        make_instance(STUDY, SERIES, _sop(0), PatientID="P", PatientName="A^A"),
        make_instance(
            STUDY, SERIES, _sop(1), PatientID="P", PatientName="B^B",
            StudyDescription="first", SeriesDescription="s1",
        ),
        make_instance(
            STUDY, SERIES, _sop(2), PatientID="P", PatientName="C^C",
            StudyDescription="second", SeriesDescription="s2", AccessionNumber="A7",
        ),
    ]  # fmt: skip
    found = []
    for batched in (True, False):
        with opened(ArchiveSettings(f"memory://{mem_bucket}/b{batched}", "sqlite://")) as (a, run):
            if batched:
                results = run(a.store_instances("acme", parts))
            else:
                results = [r for part in parts for r in run(a.store_instances("acme", [part]))]
            assert all(isinstance(r, StoredInstance) and r.created for r in results)
            wanted = {"includefield": "all"}
            found.append((run(a.search_studies("acme", wanted)), run(a.search_series("acme", wanted))))
    assert found[0] == found[1]
    studies, series = found[0]
    assert studies[0]["00100010"]["Value"] == [{"Alphabetic": "C^C"}]  # the patient's latest name
    assert studies[0]["00081030"]["Value"] == ["first"]  # the study's first description
    assert studies[0]["00080050"]["Value"] == ["A7"]  # filled where it was missing
    assert series[0]["0008103E"]["Value"] == ["s1"]
