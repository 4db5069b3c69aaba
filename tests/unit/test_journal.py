"""The job journal (journal.py) and the sync rules that need no server (sync.py, treediff.py)."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from pathlib import Path

import pytest

from dicom_cloud import api
from dicom_cloud.errors import DeleteLimitError, JobLockedError, NotFoundError, UsageError
from dicom_cloud.journal import JobSpec, Journal, find_job, forget_job, list_jobs, state_dir
from dicom_cloud.sync import SyncOptions, _conflict_name, check_delete_limit, parse_max_delete
from dicom_cloud.treediff import Difference


def _spec(**changes: object) -> JobSpec:
    base = {
        "verb": "upload",
        "source": "file:///src/",
        "destination": "s3://b/p/",
        "options": {"tags": "A=1"},
    }
    base.update(changes)
    return JobSpec(argv=("upload", "src", "s3://b/p/", "-r"), cwd="/", **base)  # type: ignore[arg-type]


def test_job_identity_ignores_nothing_it_is_given() -> None:
    assert _spec().id == _spec().id
    assert _spec().id != _spec(options={"tags": "A=2"}).id
    assert _spec().id != _spec(destination="s3://b/q/").id
    assert len(_spec().id) == 16


def test_done_objects_survive_an_interruption_and_are_skipped_by_version(tmp_path: Path) -> None:
    journal = Journal.open(_spec(), tmp_path)
    journal.record_done("src/a.dcm", "etag:1", "p/a.dcm", 10, "0badcafe")
    journal.close()  # interrupted: the file stays
    again = Journal.open(_spec(), tmp_path)
    assert again.previously_done == 1
    assert again.is_done("src/a.dcm", "etag:1")
    assert not again.is_done("src/a.dcm", "etag:2"), "a changed source must be transferred again"
    assert not again.is_done("src/b.dcm", "etag:1")
    again.finish(failed=0)
    assert not list(tmp_path.iterdir()), "a complete transfer leaves nothing behind"


def test_journal_file_is_private_and_locked(tmp_path: Path) -> None:
    journal = Journal.open(_spec(), tmp_path)
    try:
        assert stat.S_IMODE(journal.path.stat().st_mode) == 0o600
        with pytest.raises(JobLockedError):
            Journal.open(_spec(), tmp_path)
        assert not journal.is_done("src/a.dcm", "etag:1")  # the first object planned
        [job] = list_jobs(tmp_path)
        assert job.running and job.status == "running"
        with pytest.raises(JobLockedError):
            forget_job(job.id, tmp_path)
    finally:
        journal.close()
    [job] = list_jobs(tmp_path)
    assert not job.running and job.status == "interrupted"


def test_failed_jobs_stay_listed_until_forgotten(tmp_path: Path) -> None:
    journal = Journal.open(_spec(), tmp_path)
    journal.record_done("src/a.dcm", "v", "p/a.dcm", 1, None)
    journal.finish(failed=2)
    [job] = list_jobs(tmp_path)
    assert (job.status, job.failed, job.done, job.argv) == (
        "failed",
        2,
        1,
        ["upload", "src", "s3://b/p/", "-r"],
    )
    assert find_job(job.id[:6], tmp_path).id == job.id
    forget_job(job.id[:6], tmp_path)
    assert list(list_jobs(tmp_path, include_complete=True)) == []
    with pytest.raises(NotFoundError):
        find_job("ffff", tmp_path)


def test_upload_sessions_are_kept_at_once(tmp_path: Path) -> None:
    journal = Journal.open(_spec(), tmp_path)
    journal.save("p/big.dcm", {"upload_id": "u1", "parts": 3})
    db = sqlite3.connect(journal.path)  # another reader sees it without waiting for a batch
    assert db.execute("SELECT state FROM sessions").fetchone()[0] == '{"upload_id": "u1", "parts": 3}'
    db.close()
    assert journal.load("p/big.dcm") == {"upload_id": "u1", "parts": 3}
    journal.clear("p/big.dcm")
    assert journal.load("p/big.dcm") is None
    journal.close()


def test_other_schema_versions_are_refused(tmp_path: Path) -> None:
    journal = Journal.open(_spec(), tmp_path)
    journal.record_done("src/a.dcm", "v", "p/a.dcm", 1, None)
    journal.db.execute("UPDATE job SET schema = 99")
    journal.close()
    with pytest.raises(UsageError, match="schema 99"):
        Journal.open(_spec(), tmp_path)


def test_a_dry_run_of_a_new_job_leaves_nothing(tmp_path: Path) -> None:
    Journal.open(_spec(), tmp_path, record=False).close()
    assert not list(tmp_path.iterdir())


def test_state_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DICOM_CLOUD_STATE_DIR", str(tmp_path / "s"))
    assert state_dir() == tmp_path / "s"
    monkeypatch.delenv("DICOM_CLOUD_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "x"))
    assert state_dir() == tmp_path / "x" / "dicom-cloud"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("1000", (1000, None)), ("50%", (None, 0.5)), (" 0 ", (0, None)), ("12.5%", (None, 0.125))],
)
def test_max_delete_values(text: str, parsed: tuple[int | None, float | None]) -> None:
    assert parse_max_delete(text) == parsed


@pytest.mark.parametrize("text", ["", "lots", "-1", "150%", "1.5", "50 %%"])
def test_max_delete_refuses_nonsense(text: str) -> None:
    with pytest.raises(UsageError):
        parse_max_delete(text)


def test_delete_limit() -> None:
    check_delete_limit(5, 10, "50%", "s3://b/")
    check_delete_limit(0, 0, "0", "s3://b/")
    with pytest.raises(DeleteLimitError, match="6 of the 10"):
        check_delete_limit(6, 10, "50%", "s3://b/")
    with pytest.raises(DeleteLimitError):
        check_delete_limit(11, 1000, "10", "s3://b/")


def test_conflict_names_keep_the_extension() -> None:
    assert _conflict_name("a/b/scan.dcm", "T") == "a/b/scan.conflict-T.dcm"
    assert _conflict_name("README", "T") == "README.conflict-T"


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_sync_between_local_directories(tmp_path: Path) -> None:
    a, b, state = tmp_path / "a", tmp_path / "b", tmp_path / "state"
    _tree(a, {"x/1.dcm": b"one", "x/2.dcm": b"two", "3.dcm": b""})
    job = api.JobRequest(options={}, directory=str(state))
    state.mkdir()
    first = asyncio.run(api.sync_async(str(a), str(b), job=job))
    assert (first.created, first.updated, first.unchanged) == (3, 0, 0)
    second = asyncio.run(api.sync_async(str(a), str(b), job=job))
    assert (second.created, second.updated, second.unchanged) == (0, 0, 3)
    (a / "x/2.dcm").write_bytes(b"TWO")  # same size, other bytes
    (b / "stray.dcm").write_bytes(b"s")
    third = asyncio.run(api.sync_async(str(a), str(b), sync=SyncOptions(delete=True), job=job))
    assert (third.updated, third.deleted, third.unchanged) == (1, 1, 2)
    assert (b / "x/2.dcm").read_bytes() == b"TWO" and not (b / "stray.dcm").exists()
    found: list[Difference] = []
    result = asyncio.run(api.verify_async(str(a), str(b), on_difference=found.append))
    assert (result.compared, result.differences, found) == (3, 0, [])


def test_sync_refuses_dicom_rewrites(tmp_path: Path) -> None:
    from dicom_cloud.dicom.upload import DicomPolicy
    from dicom_cloud.transfer import TransferOptions

    (tmp_path / "a").mkdir()
    job = api.JobRequest(options={}, directory=str(tmp_path))
    with pytest.raises(UsageError, match="--layout"):
        asyncio.run(
            api.sync_async(
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                options=TransferOptions(dicom=DicomPolicy()),
                job=job,
            )
        )


def test_sync_of_a_missing_source_directory_is_not_found(tmp_path: Path) -> None:
    job = api.JobRequest(options={}, directory=str(tmp_path))
    with pytest.raises(NotFoundError):
        asyncio.run(api.sync_async(str(tmp_path / "nope"), str(tmp_path / "b"), job=job))


def test_a_run_refused_before_planning_anything_is_not_a_job(tmp_path: Path) -> None:
    # A new job whose run stopped before its first object (a missing source, bad credentials...).
    Journal.open(_spec(), tmp_path).close()
    assert list(list_jobs(tmp_path, include_complete=True)) == []
    assert not list(tmp_path.iterdir())
    # An earlier interrupted run stays as it was, not "running again" nor renewed.
    journal = Journal.open(_spec(), tmp_path)
    journal.record_done("src/a.dcm", "v", "p/a.dcm", 1, None)
    journal.close()
    [before] = list_jobs(tmp_path)
    Journal.open(_spec(), tmp_path).close()
    [after] = list_jobs(tmp_path)
    assert after == before and after.status == "interrupted"
    # A completed sync's state is not turned into an interrupted job by a refused run.
    sync = Journal.open(_spec(verb="sync", options={}), tmp_path)
    sync.set_entry("a.dcm", "s1", "s2", None)
    sync.finish(failed=0, keep=True)
    Journal.open(_spec(verb="sync", options={}), tmp_path).close()
    assert {job.verb: job.status for job in list_jobs(tmp_path, include_complete=True)} == {
        "upload": "interrupted",
        "sync": "complete",
    }


def test_syncs_refused_by_max_delete_or_a_missing_source_leave_no_job(tmp_path: Path) -> None:
    a, b, state = tmp_path / "a", tmp_path / "b", tmp_path / "state"
    _tree(b, {f"{i}.dcm": b"x" for i in range(4)})
    a.mkdir()
    state.mkdir()
    job = api.JobRequest(options={}, directory=str(state))
    for _ in range(3):
        with pytest.raises(DeleteLimitError):
            asyncio.run(api.sync_async(str(a), str(b), sync=SyncOptions(delete=True), job=job))
        with pytest.raises(NotFoundError):
            asyncio.run(api.sync_async(str(tmp_path / "nope"), str(b), job=job))
    assert list(list_jobs(state, include_complete=True)) == []
    assert sorted(b.iterdir()) == sorted(b / f"{i}.dcm" for i in range(4))


def test_prune_removes_stale_jobs_and_keeps_the_rest(tmp_path: Path) -> None:
    jobs, src = tmp_path / "jobs", tmp_path / "src"
    jobs.mkdir()
    src.mkdir()

    def job(source: str, *, done: bool = True, **changes: object) -> str:
        journal = Journal.open(_spec(source=source, **changes), jobs)
        journal.is_done("k", "v")
        if done:
            journal.record_done("k", "v", "d", 1, None)
        journal.close()
        return journal.spec.id

    resumable = job(str(src))
    never_started = job(str(src), done=False, destination="s3://b/other/")
    source_gone = job(str(tmp_path / "gone"))
    old = job(str(src), destination="s3://b/old/")
    (jobs / "0123456789abcdef.sqlite").write_bytes(b"")  # a run killed before it recorded anything
    db = sqlite3.connect(jobs / f"{old}.sqlite")
    db.execute("UPDATE job SET updated = updated - 40 * 86400")
    db.commit()
    db.close()
    running = Journal.open(_spec(source=str(tmp_path / "also-gone"), destination="s3://b/r/"), jobs)
    running.is_done("k", "v")
    try:
        from dicom_cloud.journal import prune_jobs

        planned = prune_jobs(jobs, dry_run=True)
        assert {p.id: p.reason for p in planned} == {
            never_started: "nothing to continue from",
            source_gone: f"{tmp_path / 'gone'} no longer exists",
            "0123456789abcdef": "never started",
        }
        assert len(list(list_jobs(jobs))) == 5, "a dry run removed something"
        pruned = prune_jobs(jobs, older_than=30 * 86400)
        assert {p.id for p in pruned} == {never_started, source_gone, "0123456789abcdef", old}
        assert {j.id for j in list_jobs(jobs)} == {resumable, running.spec.id}
    finally:
        running.close()


def test_a_sync_whose_copies_all_fail_is_a_failed_job(tmp_path: Path) -> None:
    a, b, state = tmp_path / "a", tmp_path / "b", tmp_path / "state"
    _tree(a, {"x.dcm": b"data"})
    (b / "x.dcm").mkdir(parents=True)  # a directory where the file must go: its copy fails
    state.mkdir()
    job = api.JobRequest(options={}, directory=str(state))
    summary = asyncio.run(api.sync_async(str(a), str(b), job=job))
    assert len(summary.failed) == 1
    [listed] = list_jobs(state)
    assert (listed.verb, listed.status, listed.failed) == ("sync", "failed", 1)
