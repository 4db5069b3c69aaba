"""The ingest queue on the real servers: the service (ingest_queue on) and ``dicom-cloud worker``
processes on one PostgreSQL database, objects in SeaweedFS (S3), uploads by presigned URLs.

What only the real thing shows: jobs taken by several worker processes at once, a worker killed
with SIGKILL in the middle of its jobs (its jobs put back by the other after its heartbeats stop),
and in the end an index and a bucket that agree exactly: every instance row's objects present, no
object without its row, nothing left in staging, every upload done.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from test_interrupts import BOUND as SIGNAL_BOUND  # 2 s is required; the bound allows a busy machine

from archive_helpers import make_instance
from dicom_cloud.archive import Archive
from dicom_cloud.service.app import archive_settings
from dicom_cloud.service.settings import ServiceSettings, load_settings
from live_service import LiveService, start_service
from servers import S3Server

#: Upload sessions of one small file each (about 1 KB: the queue's overhead, not the bytes). 400
#: keep the test near a minute and a half on a busy two-core machine; INGEST_WORKERS_UPLOADS=2000
#: (with pytest -o timeout=1000) took 5.5 minutes there.
UPLOADS = int(os.environ.get("INGEST_WORKERS_UPLOADS", "400"))
STALLED_AFTER = 3
STUDY = "1.2.826.0.1.3680043.9.7"
CLI = [sys.executable, "-c", "from dicom_cloud.cli.main import run; run()"]


@pytest.fixture
def s3_env(seaweedfs: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    return seaweedfs


@pytest.fixture
def queued_service(s3_env: S3Server, s3_bucket: str, database: str, tmp_path: Path) -> Iterator[LiveService]:
    settings = _settings(s3_bucket, database, tmp_path)
    service = start_service(settings)
    yield service
    service.stop()


def _settings(bucket: str, database: str, tmp_path: Path, **more: Any) -> ServiceSettings:
    return load_settings(
        {
            "data_dir": tmp_path / "data",
            "storage": f"s3://{bucket}/archive",
            "database": database,
            "ingest_queue": True,
            **more,
        },
        environ={},
    )


def _start_worker(bucket: str, database: str, *extra: str) -> subprocess.Popen[bytes]:
    argv = [
        *CLI,
        "worker",
        "--storage",
        f"s3://{bucket}/archive",
        "--database",
        database,
        "--stalled-after",
        str(STALLED_AFTER),
        "--log-level",
        "warning",
        *extra,
    ]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))


def _instance(i: int) -> bytes:
    return make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.{i + 1}", side=4)


async def _upload_and_complete(
    url: str, token: str | None, files: list[tuple[str, bytes]], parallel: int = 16
) -> list[httpx.Response]:
    """One upload session per file: declare, PUT to the presigned URL, complete. The answers to
    the completions, in order."""
    headers = {"Authorization": f"Bearer {token}"}
    gate = asyncio.Semaphore(parallel)
    async with (
        httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http,
        httpx.AsyncClient(timeout=60) as bucket,
    ):

        async def one(name: str, data: bytes) -> httpx.Response:
            async with gate:
                created = await _sent(
                    http.post, "/uploads", json={"files": [{"name": name, "size": len(data)}]}
                )
                assert created.status_code == 201, created.text
                target = created.json()["files"][0]
                put = await _sent(bucket.put, target["url"], content=data, headers=target["headers"])
                assert put.status_code in (200, 204), put.text
                return await _sent(http.post, f"/uploads/{created.json()['id']}/complete")

        return list(await asyncio.gather(*(one(name, data) for name, data in files)))


async def _sent(request: Any, *args: Any, **kwargs: Any) -> httpx.Response:
    """One request, sent again if a kept-alive connection was closed under it (a busy machine
    lets connections idle past the servers' keep-alive timeouts)."""
    for attempt in range(3):
        try:
            response: httpx.Response = await request(*args, **kwargs)
            return response
        except (httpx.ReadError, httpx.RemoteProtocolError):
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _count(database: str, sql: str, *params: Any) -> int:
    with psycopg.connect(database, autocommit=True) as connection:
        row = connection.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


def _index_and_bucket(settings: ServiceSettings) -> tuple[set[str], set[str]]:
    """The object keys the index rows point at, and the keys in the archive's bucket prefix."""

    async def look() -> tuple[set[str], set[str]]:
        async with await Archive.open(archive_settings(settings)) as archive:
            with psycopg.connect(settings.database_url, autocommit=True) as connection:
                rows = connection.execute("SELECT object_key, sidecar_key FROM instances").fetchall()
            indexed = {archive.store_key(key) for row in rows for key in row}
            stored = {info.key async for info in archive.store.list(archive.store_key(""))}
            return indexed, stored

    return asyncio.run(look())


def test_two_workers_one_killed_index_and_objects_agree(
    queued_service: LiveService, s3_bucket: str, database: str, tmp_path: Path
) -> None:
    """UPLOADS presigned uploads queued; two workers; one SIGKILLed while it holds jobs; the other
    puts them back after STALLED_AFTER seconds and drains the queue (--until-empty)."""
    files = [(f"f{i}.dcm", _instance(i)) for i in range(UPLOADS)]
    answers = asyncio.run(_upload_and_complete(queued_service.url, queued_service.admin_token, files))
    assert {a.status_code for a in answers} == {202}
    sessions = [a.json()["id"] for a in answers]
    assert all(
        a.headers["location"].endswith(f"/uploads/{s}") for a, s in zip(answers, sessions, strict=True)
    )

    doomed = _start_worker(s3_bucket, database, "--concurrency", "4")
    survivor: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 60
        while not (doomed_id := _count(database, "SELECT coalesce(max(id), 0) FROM procrastinate_workers")):
            assert time.monotonic() < deadline and doomed.poll() is None, "the first worker did not start"
            time.sleep(0.05)
        survivor = _start_worker(s3_bucket, database, "--concurrency", "4", "--until-empty")
        deadline = time.monotonic() + 120
        while (
            _count(database, "SELECT count(*) FROM upload_sessions WHERE state = 'completed'") < UPLOADS // 4
        ):
            assert time.monotonic() < deadline, "the workers did not get a quarter done in time"
            assert doomed.poll() is None and survivor.poll() is None, "a worker ended early"
            time.sleep(0.05)
        held = _count(
            database,
            "SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing' AND worker_id = %s",
            doomed_id,
        )
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        assert held > 0, "the killed worker held no job"
        _, errors = survivor.communicate(timeout=300)
        assert survivor.returncode == 0, errors.decode(errors="replace")[-3000:]
    finally:
        for worker in (doomed, survivor):
            if worker is not None and worker.poll() is None:
                worker.kill()
                worker.wait()

    states = {
        s: _count(database, "SELECT count(*) FROM upload_sessions WHERE id = %s AND state = 'completed'", s)
        for s in sessions
    }
    assert set(states.values()) == {1}, "every upload is done"
    with httpx.Client(
        base_url=queued_service.url, headers={"Authorization": f"Bearer {queued_service.admin_token}"}
    ) as http:
        for session in sessions[:: UPLOADS // 20]:  # a sample of the status URLs
            status = http.get(f"/uploads/{session}").json()
            assert status["status"] == "done"
            assert len(status["outcome"]["accepted"]) == 1 and not status["outcome"]["rejected"]
    assert _count(database, "SELECT count(DISTINCT sop_instance_uid) FROM instances") == UPLOADS
    assert _count(database, "SELECT count(*) FROM instances") == UPLOADS
    assert _count(database, "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'") == 0
    indexed, stored = _index_and_bucket(_settings(s3_bucket, database, tmp_path))
    assert not indexed - stored, "rows whose objects are missing"
    assert not [k for k in stored - indexed], "objects no row points at (staging, quarantine, orphans)"


def test_complete_answers_202_and_the_status_url_follows_the_job(
    queued_service: LiveService, s3_bucket: str, database: str
) -> None:
    """202 + Location; queued until a worker runs it; then done with the same outcome shape as an
    in-request completion (a refused file listed with its reason); completing again answers it."""
    headers = {"Authorization": f"Bearer {queued_service.admin_token}"}
    good, junk = _instance(0), b"not a DICOM file at all" * 20
    with httpx.Client(base_url=queued_service.url, headers=headers, timeout=60) as http:
        created = http.post(
            "/uploads",
            json={"files": [{"name": "good.dcm", "size": len(good)}, {"name": "junk", "size": len(junk)}]},
        ).json()
        for target, data in zip(created["files"], (good, junk), strict=True):
            assert httpx.put(target["url"], content=data, headers=target["headers"]).status_code in (200, 204)
        completed = http.post(f"/uploads/{created['id']}/complete")
        assert completed.status_code == 202, completed.text
        status_url = completed.headers["location"]
        assert completed.json() == {"id": created["id"], "status": "queued", "status_url": status_url}
        assert http.get(status_url).json()["status"] == "queued"
        assert http.post(f"/uploads/{created['id']}/complete").status_code == 202  # still queued

        worker = _start_worker(s3_bucket, database, "--until-empty")
        _, errors = worker.communicate(timeout=120)
        assert worker.returncode == 0, errors.decode(errors="replace")[-3000:]

        status = http.get(status_url).json()
        assert (status["status"], status["state"], status["error"]) == ("done", "completed", None)
        outcome = status["outcome"]
        assert [a["name"] for a in outcome["accepted"]] == ["good.dcm"]
        assert outcome["accepted"][0]["sop_instance_uid"] == f"{STUDY}.1.1"
        assert [(r["name"], r["index"]) for r in outcome["rejected"]] == [("junk", 1)]
        again = http.post(f"/uploads/{created['id']}/complete")
        assert again.status_code == 200 and again.json() == outcome


def test_worker_stops_within_two_seconds_and_its_jobs_go_back(
    queued_service: LiveService, s3_bucket: str, database: str
) -> None:
    """SIGTERM in the middle of jobs: the worker ends (143) within 2 s, and what it held is queued
    again, not lost (another worker finishes it)."""
    files = [(f"f{i}.dcm", _instance(i)) for i in range(100)]
    asyncio.run(_upload_and_complete(queued_service.url, queued_service.admin_token, files))
    worker = _start_worker(s3_bucket, database, "--concurrency", "4")
    try:
        deadline = time.monotonic() + 60
        while not _count(database, "SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'"):
            assert time.monotonic() < deadline and worker.poll() is None, "the worker took no job"
            time.sleep(0.02)
        worker.send_signal(signal.SIGTERM)
        asked = time.monotonic()
        worker.wait(10)
        seconds = time.monotonic() - asked
        print(f"worker ended {seconds:.2f} s after SIGTERM")
        assert seconds < SIGNAL_BOUND, f"{seconds:.2f} s after SIGTERM"
        assert worker.returncode == 143
    finally:
        if worker.poll() is None:
            worker.kill()
    # Nothing left running for a dead worker: the jobs went back (todo) or were finished.
    assert _count(database, "SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'") == 0
    drain = _start_worker(s3_bucket, database, "--until-empty")
    _, errors = drain.communicate(timeout=120)
    assert drain.returncode == 0, errors.decode(errors="replace")[-3000:]
    assert _count(database, "SELECT count(*) FROM upload_sessions WHERE state = 'completed'") == len(files)
    assert _count(database, "SELECT count(*) FROM instances") == len(files)


def test_sqlite_index_with_ingest_queue_is_refused(tmp_path: Path) -> None:
    """The queue lives in PostgreSQL: serve --ingest-queue and worker refuse a SQLite index with a
    sentence saying so (exit 2, no traceback)."""
    env = {**os.environ, "DICOM_CLOUD_SERVICE_DATA_DIR": str(tmp_path / "data")}
    for argv in (["serve", "--ingest-queue", "--port", "0"], ["worker", "--until-empty"]):
        done = subprocess.run([*CLI, *argv], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 2, (argv, done.stderr)
        assert "PostgreSQL index" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_worker_metrics_count_its_jobs_and_the_queue(
    queued_service: LiveService, s3_bucket: str, database: str
) -> None:
    """``--metrics-port``: Prometheus text with the jobs this worker ran by result, the files it
    ingested by outcome, and the queue's depth; a port already taken is a clear error (exit 2)."""
    files = [("a.dcm", _instance(0)), ("b.dcm", _instance(1))]
    completed = asyncio.run(_upload_and_complete(queued_service.url, queued_service.admin_token, files))
    assert [c.status_code for c in completed] == [202, 202]
    port = _free_port()
    worker = _start_worker(s3_bucket, database, "--metrics-port", str(port))
    try:
        deadline = time.monotonic() + 90
        text = ""
        while 'dicom_cloud_ingest_jobs_total{result="done"} 2.0' not in text:
            assert time.monotonic() < deadline and worker.poll() is None, text[-2000:]
            time.sleep(0.2)
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except httpx.TransportError:
                continue  # not listening yet
        assert 'dicom_cloud_ingest_instances_total{outcome="accepted"} 2.0' in text
        assert "dicom_cloud_ingest_job_duration_seconds_count 2.0" in text
        assert 'dicom_cloud_ingest_queue_jobs{status="todo"}' in text
        taken = _start_worker(s3_bucket, database, "--metrics-port", str(port))
        _, errors = taken.communicate(timeout=60)
        assert taken.returncode == 2 and b"cannot serve metrics" in errors, errors[-2000:]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _related(*parts: bytes) -> tuple[bytes, str]:
    boundary = "queued-stow-boundary"
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
        for part in parts
    )
    return (
        body + b"--" + boundary.encode() + b"--\r\n",
        f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


def test_a_large_stow_is_staged_queued_and_ingested_by_a_worker(
    s3_env: S3Server, s3_bucket: str, database: str, tmp_path: Path
) -> None:
    """With stow_queue_bytes under the body's length: 202 + status URL, nothing indexed until a
    worker runs; then every part's outcome (a junk part refused with its reason), the instances
    found by QIDO, and nothing left in staging. A body cut short is 400 and stages nothing; a
    request naming its study is still stored in the request."""
    settings = _settings(s3_bucket, database, tmp_path, stow_queue_bytes=1024)
    service = start_service(settings)
    try:
        headers = {"Authorization": f"Bearer {service.admin_token}"}
        body, content_type = _related(_instance(0), _instance(1), b"junk, not DICOM" * 10, _instance(2))
        with httpx.Client(base_url=service.url, headers=headers, timeout=60) as http:
            stored = http.post("/studies", content=body, headers={"Content-Type": content_type})
            assert stored.status_code == 202, stored.text
            status_url = stored.headers["location"]
            assert stored.json()["status"] == "queued" and stored.json()["status_url"] == status_url
            assert _count(database, "SELECT count(*) FROM instances") == 0

            cut = http.post(
                "/studies", content=body[: len(body) // 2], headers={"Content-Type": content_type}
            )
            assert cut.status_code == 400, cut.text

            worker = _start_worker(s3_bucket, database, "--until-empty")
            _, errors = worker.communicate(timeout=120)
            assert worker.returncode == 0, errors.decode(errors="replace")[-3000:]
            status = http.get(status_url).json()
            assert status["status"] == "done", status
            accepted = sorted(a["sop_instance_uid"] for a in status["outcome"]["accepted"])
            assert accepted == sorted(f"{STUDY}.1.{i}" for i in (1, 2, 3))
            assert [(r["name"], r["index"]) for r in status["outcome"]["rejected"]] == [("part-3", 2)]
            found = http.get(f"/studies/{STUDY}/instances").json()
            assert len(found) == 3

            small, small_type = _related(_instance(3))
            direct = http.post(f"/studies/{STUDY}", content=small, headers={"Content-Type": small_type})
            assert direct.status_code == 200, direct.text
        indexed, in_bucket = _index_and_bucket(settings)
        unindexed = sorted(in_bucket - indexed)
        assert all("/quarantine/" in key for key in unindexed), unindexed  # only the refused part, kept
        assert len(unindexed) == 2, unindexed  # its bytes and its reason
        assert _count(database, "SELECT count(*) FROM upload_sessions") == 1  # the cut request recorded none
    finally:
        service.stop()
