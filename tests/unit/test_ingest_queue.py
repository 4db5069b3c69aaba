"""The ingest queue's rules without a queue: the session states a queued completion goes through,
its idempotent job (run again after a crash at its worst moments), the statuses reported, the
retry policy, and the refusal of a SQLite index."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import get_args

import pytest
from procrastinate.jobs import Job

from archive_helpers import Run, make_instance, opened
from dicom_cloud.archive import Archive, ArchiveSettings, DeclaredFile
from dicom_cloud.archive.queue import (
    BACKOFF_CAP,
    MAX_ATTEMPTS,
    IngestRetry,
    backoff_seconds,
    failure_reason,
    queue_conninfo,
)
from dicom_cloud.archive.records import UploadState
from dicom_cloud.errors import NetworkError, NotFoundError, UsageError
from dicom_cloud.service.routes.uploads import upload_status
from dicom_cloud.service.settings import load_settings

STUDY = "1.2.826.0.1.3680043.9.8"


@pytest.fixture
def archive(mem_bucket: str) -> Iterator[tuple[Archive, Run]]:
    with opened(ArchiveSettings(f"memory://{mem_bucket}", "sqlite://")) as pair:
        yield pair


def _session(a: Archive, run: Run, files: list[bytes]) -> str:
    upload = run(a.create_upload("acme", [DeclaredFile(f"f{i}", len(d)) for i, d in enumerate(files)]))
    for i, data in enumerate(files):
        run(a.write_staging("acme", upload.id, i, data))
    return upload.id


def test_a_queued_session_goes_queued_completing_completed(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    good = make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.1")
    session_id = _session(a, run, [good, b"junk" * 40])
    session, queued = run(a.queue_upload("acme", session_id))
    assert (session.state, queued) == ("queued", True)
    assert run(a.queue_upload("acme", session_id))[1] is False  # queued once
    outcome = run(a.run_queued_upload("acme", session_id))
    assert outcome is not None
    assert [f.name for f in outcome.accepted] == ["f0"] and [f.name for f in outcome.rejected] == ["f1"]
    assert run(a.get_upload("acme", session_id)).state == "completed"
    assert run(a.run_queued_upload("acme", session_id)) is None  # a job run again: nothing to do
    assert run(a.complete_upload("acme", session_id)) == outcome


def test_a_job_run_again_after_a_crash_stores_nothing_twice(archive: tuple[Archive, Run]) -> None:
    """The worst moments: a file ingested (row committed) and one refused (moved to quarantine)
    before the outcome was recorded. The next attempt finds the first in staging again (stored
    as a duplicate), the second's refusal in quarantine, and ingests the third."""
    a, run = archive
    files = [make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.{i}") for i in (1, 2)]
    session_id = _session(a, run, [files[0], b"junk" * 40, files[1]])
    run(a.queue_upload("acme", session_id))
    upload = run(a.get_upload("acme", session_id))
    run(a.set_upload_state("acme", session_id, "completing"))  # the dead worker's claim
    run(a._ingest_file(upload, 0, keep_staging=True))
    run(a._ingest_file(upload, 1, keep_staging=True))
    outcome = run(a.run_queued_upload("acme", session_id))
    assert outcome is not None
    assert [(f.index, f.created) for f in outcome.accepted] == [(0, False), (2, True)]
    assert [f.index for f in outcome.rejected] == [1]
    assert outcome.rejected[0].quarantine_key is not None
    assert outcome.rejected[0].reason != "not uploaded"
    assert len(run(a.search_instances("acme", {}))) == 2
    assert run(_keys(a, "acme/staging/")) == []


async def _keys(a: Archive, prefix: str) -> list[str]:
    return [info.key async for info in a.store.list(a.store_key(prefix))]


def test_a_failed_session_keeps_its_progress_and_can_be_queued_again(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    session_id = _session(a, run, [make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.9")])
    run(a.queue_upload("acme", session_id))
    run(a.fail_queued_upload("acme", session_id, "the store is unreachable"))
    failed = run(a.get_upload("acme", session_id))
    assert failed.state == "failed" and failed.result is not None
    assert failed.result["error"] == "the store is unreachable"
    assert run(a.queue_upload("acme", session_id))[1] is True
    outcome = run(a.run_queued_upload("acme", session_id))
    assert outcome is not None and len(outcome.accepted) == 1


def test_every_session_state_has_a_status() -> None:
    statuses = {state: upload_status(state) for state in get_args(UploadState)}
    assert statuses == {
        "pending": "pending",
        "queued": "queued",
        "completing": "running",
        "completed": "done",
        "failed": "failed",
        "expired": "expired",
    }


def _job(attempts: int) -> Job:
    return Job(id=1, queue="q", lock=None, queueing_lock=None, task_name="t", attempts=attempts)


def test_retries_back_off_and_stop() -> None:
    retry = IngestRetry()
    assert retry.get_retry_decision(exception=NetworkError("down"), job=_job(0)) is not None
    assert retry.get_retry_decision(exception=NetworkError("down"), job=_job(MAX_ATTEMPTS - 1)) is None
    assert retry.get_retry_decision(exception=UsageError("bad"), job=_job(0)) is None
    assert retry.get_retry_decision(exception=NotFoundError("gone"), job=_job(0)) is None
    # A worker stopping puts its jobs back at once, however often it happened.
    assert retry.get_retry_decision(exception=asyncio.CancelledError(), job=_job(MAX_ATTEMPTS)) is not None
    rng = random.Random(7)
    waits = [backoff_seconds(n, rng) for n in range(20) for _ in range(50)]
    assert min(waits) >= 1.0 and max(waits) <= BACKOFF_CAP


def test_failure_reasons_never_quote_foreign_messages() -> None:
    assert failure_reason(NetworkError("the store is unreachable")) == "the store is unreachable"
    assert failure_reason(ValueError("Key (uid)=(1.2.3) already exists")) == "internal error (ValueError)"


def test_the_queue_needs_postgresql(tmp_path: object) -> None:
    assert queue_conninfo("postgresql+psycopg://u:p@db:5432/x") == "postgresql://u:p@db:5432/x"
    with pytest.raises(UsageError, match="PostgreSQL"):
        queue_conninfo("sqlite:///index.sqlite")
    with pytest.raises(UsageError, match="ingest_queue needs a PostgreSQL index"):
        load_settings({"ingest_queue": True}, environ={})
    assert load_settings({"ingest_queue": True, "database": "postgresql://db/x"}, environ={}).ingest_queue


def test_queue_migrations_apply_in_version_then_pre_post_order() -> None:
    from dicom_cloud.archive.queue import migration_version, migrations_pending

    available = [
        "03.03.00_01_pre_priority.sql",
        "03.04.00_01_pre_retry.sql",
        "03.04.00_50_post_retry.sql",
        "03.10.00_01_pre_next.sql",
    ]
    assert migration_version("03.04.00_50_post_retry.sql") == (3, 4, 0)
    assert migration_version("03.10.00_01_pre_next.sql") > migration_version("03.04.00_01_pre_retry.sql")
    applied = {"03.03.00_01_pre_priority.sql", "03.04.00_01_pre_retry.sql"}
    pending = migrations_pending(applied, available)
    assert pending == ["03.04.00_50_post_retry.sql", "03.10.00_01_pre_next.sql"]
    assert migrations_pending(set(available), available) == []
    with pytest.raises(UsageError, match="newer than this dicom-cloud"):
        migrations_pending({*available, "04.00.00_01_pre_future.sql"}, available)
