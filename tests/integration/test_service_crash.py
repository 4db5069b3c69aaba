"""A service process killed with SIGKILL in the middle of a STOW-RS leaves objects that no index row
points at; the scheduled sweep of a restarted service removes them, and the empty staging folders of
finished uploads, and leaves every indexed object alone."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx

from archive_helpers import make_instance
from live_service import start_service_process

INSTANCES = 50
ATTEMPTS = 5
#: The parts of one request are stored in batches of up to half of stow_part_memory_bytes, each
#: one index transaction: 1 MiB held parts and instances of about 80 KB make batches of six, so
#: that a kill can fall after one batch's rows are committed and amid the next one's writes.
PART_MEMORY = {"DICOM_CLOUD_SERVICE_STOW_PART_MEMORY_BYTES": str(1024 * 1024)}
SIDE = 200
#: Moments of one request at which the service is frozen and looked at.
SAMPLES = 500


def _related(parts: list[bytes]) -> tuple[bytes, str]:
    body = b"".join(b"--B\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
    return body + b"--B--\r\n", 'multipart/related; type="application/dicom"; boundary=B'


def _files(objects: Path) -> set[str]:
    """Keys of the instances and sidecars in the tenant's directory (partial files aside)."""
    return {
        str(p.relative_to(objects.parent))
        for kind in ("instances", "metadata")
        for p in (objects / kind).rglob("*")
        if p.is_file() and p.suffix in (".dcm", ".json")
    }


def _indexed(database: Path) -> set[str]:
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT object_key, sidecar_key FROM instances").fetchall()
    return {key for row in rows for key in row}


def _stow_in_background(url: str, token: str, body: bytes, content_type: str) -> threading.Thread:
    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the service is killed under it
            httpx.post(
                url + "/studies",
                content=body,
                headers={"Content-Type": content_type, "Authorization": f"Bearer {token}"},
                timeout=60,
            )

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_kill_during_stow_leaves_orphans_the_scheduled_sweep_removes(tmp_path: Path) -> None:
    work = tmp_path / "work"
    data = work / "data"
    objects = data / "objects" / "default"
    orphans: set[str] = set()
    for attempt in range(ATTEMPTS):
        # One process, so that the process frozen and killed is the one writing.
        service = start_service_process(work, extra_args=("--workers", "1"), env=PART_MEMORY)
        try:
            before = len(_indexed(data / "index.sqlite"))
            instances = [
                make_instance(
                    f"1.2.826.{attempt}", f"1.2.826.{attempt}.1", f"1.2.826.{attempt}.1.{n}", side=SIDE
                )
                for n in range(INSTANCES)
            ]
            stow = _stow_in_background(service.url, service.token, *_related(instances))
            # Once a batch of this request is indexed, the service is frozen (SIGSTOP) at moments
            # of its work until one falls between an object write and its row's commit; it is
            # killed there, in the middle of the request. Freezing first makes that moment likely
            # however fast one batch is stored.
            deadline = time.monotonic() + 60
            while len(_indexed(data / "index.sqlite")) <= before:
                assert time.monotonic() < deadline, "the STOW indexed nothing"
                time.sleep(0.002)
            for _ in range(SAMPLES):
                os.kill(service.pid, signal.SIGSTOP)
                if _files(objects) - _indexed(data / "index.sqlite"):
                    break
                os.kill(service.pid, signal.SIGCONT)
                time.sleep(0.001)
            os.kill(service.pid, signal.SIGKILL)
            stow.join(timeout=60)
        finally:
            service.stop()
        orphans = _files(objects) - _indexed(data / "index.sqlite")
        if orphans:
            break
    assert orphans, f"no kill in {ATTEMPTS} fell between an object write and its row's commit"
    indexed = _indexed(data / "index.sqlite")
    assert indexed and indexed <= _files(objects)

    config = work / "sweep.toml"
    config.write_text("orphan_sweep_interval_seconds = 1\norphan_grace_seconds = 1\n")
    service = start_service_process(work, extra_args=("--config", str(config)))
    try:
        deadline = time.monotonic() + 60
        while _files(objects) & orphans:
            assert time.monotonic() < deadline, f"orphans still there: {sorted(_files(objects) & orphans)}"
            time.sleep(0.2)
        assert _files(objects) == indexed  # every indexed object (instance and sidecar) is still there
        with httpx.Client(
            base_url=service.url, headers={"Authorization": f"Bearer {service.token}"}, timeout=60
        ) as http:
            stored = http.get("/instances", params={"limit": 1000}).json()
            assert len(stored) == len(indexed) // 2
            first = stored[0]
            path = "/studies/{}/series/{}/instances/{}".format(
                *(first[tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018"))
            )
            assert http.get(path).status_code == 200

            # A finished upload leaves an empty staging folder on a local store: swept as well.
            instance = make_instance("1.2.826.99", "1.2.826.99.1", "1.2.826.99.1.1")
            declared = [{"name": "one.dcm", "size": len(instance), "content_type": "application/dicom"}]
            session = http.post("/uploads", json={"files": declared}).json()
            target = session["files"][0]
            assert httpx.put(target["url"], content=instance, headers=target["headers"]).status_code in (
                200,
                204,
            )
            folder = objects / "staging" / session["id"]
            assert folder.is_dir()
            assert http.post(f"/uploads/{session['id']}/complete").json()["accepted"]
            deadline = time.monotonic() + 60
            while folder.exists():
                assert time.monotonic() < deadline, "the empty staging folder is still there"
                time.sleep(0.2)
            assert (objects / "staging").is_dir()
    finally:
        service.stop()
