"""Group commit of the DIMSE face's C-STOREs (``dimse/store.py`` GroupCommitter): instances sent at
once by several associations are stored in groups through ``Archive.store_instances``, and each
sender gets its own instance's outcome, as if it had been stored alone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

import pytest

from archive_helpers import Run, make_instance, opened
from dicom_cloud.archive import Archive, ArchiveSettings, StoredInstance
from dicom_cloud.dimse.store import GroupCommitter
from dicom_cloud.errors import ConflictError, DicomCloudError, DicomFormatError, NetworkError

STUDY, SERIES = "1.2.826.0.1.3680043.2.1", "1.2.826.0.1.3680043.2.1.1"


@pytest.fixture
def archive(mem_bucket: str) -> Iterator[tuple[Archive, Run]]:
    with opened(ArchiveSettings(f"memory://{mem_bucket}/root", "sqlite://")) as pair:
        yield pair


def _instance(n: int, **attributes: object) -> bytes:
    return make_instance(STUDY, SERIES, f"{SERIES}.{n}", InstanceNumber=n, **attributes)


def _recorded_groups(archive: Archive, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each group the committer hands to the archive (the real method runs)."""
    sizes: list[int] = []
    real = archive.store_instances

    async def recording(
        tenant: str, parts: Sequence[bytes | memoryview]
    ) -> list[StoredInstance | DicomCloudError]:
        sizes.append(len(parts))
        return await real(tenant, parts)

    monkeypatch.setattr(archive, "store_instances", recording)
    return sizes


async def _store_all(
    committer: GroupCommitter, sends: list[tuple[str, bytes]]
) -> list[StoredInstance | BaseException]:
    """Every send at once (as many associations would), while the committer runs."""
    committing = asyncio.create_task(committer.run())
    try:
        return await asyncio.gather(
            *(committer.store(tenant, data) for tenant, data in sends), return_exceptions=True
        )
    finally:
        committing.cancel()
        await asyncio.gather(committing, return_exceptions=True)


def test_concurrent_stores_grouped_each_with_its_own_outcome(
    archive: tuple[Archive, Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, run = archive
    run(a.store_instance("default", _instance(1)))
    sizes = _recorded_groups(a, monkeypatch)
    malformed = make_instance("", "", f"{SERIES}.99")  # no study or series UID: refused
    sends = [
        ("default", _instance(2)),
        ("default", _instance(1, PatientName="Other^Bytes")),  # UID stored with other bytes
        ("default", _instance(3)),
        ("default", malformed),
        ("default", _instance(1)),  # the very same instance again: success
        ("other", _instance(4)),  # another tenant in the same group
        ("default", _instance(5)),
    ]
    outcomes = run(_store_all(GroupCommitter(a, group_max=32), sends))

    assert isinstance(outcomes[0], StoredInstance) and outcomes[0].created
    assert isinstance(outcomes[1], ConflictError)
    assert isinstance(outcomes[2], StoredInstance) and outcomes[2].created
    assert isinstance(outcomes[3], DicomFormatError)
    assert isinstance(outcomes[4], StoredInstance) and not outcomes[4].created
    assert isinstance(outcomes[5], StoredInstance) and outcomes[5].created
    assert isinstance(outcomes[6], StoredInstance) and outcomes[6].created
    # All were waiting when the committer started: one group, split by tenant (6 + 1).
    assert sorted(sizes) == [1, 6]
    found = run(a.search_instances("default", {"StudyInstanceUID": STUDY}))
    assert sorted(r["00080018"]["Value"][0] for r in found) == [f"{SERIES}.{n}" for n in (1, 2, 3, 5)]
    assert run(a.search_instances("default", {"SOPInstanceUID": f"{SERIES}.99"})) == []
    assert len(run(a.search_instances("other", {}))) == 1


def test_groups_are_bounded(archive: tuple[Archive, Run], monkeypatch: pytest.MonkeyPatch) -> None:
    a, run = archive
    sizes = _recorded_groups(a, monkeypatch)
    outcomes = run(_store_all(GroupCommitter(a, group_max=4), [("default", _instance(n)) for n in range(10)]))
    assert all(isinstance(o, StoredInstance) and o.created for o in outcomes)
    assert sizes == [4, 4, 2]


def test_a_store_that_is_down_fails_the_whole_group(
    archive: tuple[Archive, Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, run = archive

    async def down(
        tenant: str, parts: Sequence[bytes | memoryview]
    ) -> list[StoredInstance | DicomCloudError]:
        raise NetworkError("the store cannot be reached")

    monkeypatch.setattr(a, "store_instances", down)
    outcomes = run(_store_all(GroupCommitter(a), [("default", _instance(n)) for n in range(3)]))
    assert all(isinstance(o, NetworkError) for o in outcomes)


def test_stopping_tells_whoever_still_waits(
    archive: tuple[Archive, Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The face stops while a group is being stored and another waits: all are told (failed)."""
    a, run = archive
    storing = asyncio.Event()

    async def stuck(
        tenant: str, parts: Sequence[bytes | memoryview]
    ) -> list[StoredInstance | DicomCloudError]:
        storing.set()
        await asyncio.Event().wait()
        raise AssertionError("never reached")

    monkeypatch.setattr(a, "store_instances", stuck)

    async def scenario() -> list[BaseException | StoredInstance]:
        committer = GroupCommitter(a)
        committing = asyncio.create_task(committer.run())
        first = asyncio.ensure_future(committer.store("default", _instance(1)))
        await storing.wait()
        second = asyncio.ensure_future(committer.store("default", _instance(2)))
        await asyncio.sleep(0)  # queued behind the group being stored
        committing.cancel()
        await asyncio.gather(committing, return_exceptions=True)
        return await asyncio.gather(first, second, return_exceptions=True)

    outcomes = run(scenario())
    assert all(isinstance(o, NetworkError) for o in outcomes), outcomes
