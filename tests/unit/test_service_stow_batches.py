"""STOW-RS parts stored in batches: the answer names every part as storing them one by one did,
and one request of new instances is one index transaction."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from test_service_app import CT, MR, make_client, stow_body

from archive_helpers import make_instance
from dicom_cloud.archive.db import Database
from dicom_cloud.errors import NetworkError

REFERENCED, FAILED, REASON, SOP_UID = "00081199", "00081198", "00081197", "00081155"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    c, tokens = make_client(tmp_path)
    with c:
        c.headers["Authorization"] = f"Bearer {tokens[0]}"
        yield c


def _uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)


def test_refused_duplicate_and_conflicting_parts_among_batched_ones(client: TestClient) -> None:
    changed = bytearray(CT)
    changed[-1] ^= 0xFF
    parts = (CT, b"not dicom at all", MR, CT, bytes(changed))
    answer = client.post("/studies", content=stow_body(*parts)[0], headers=stow_body()[1])
    assert answer.status_code == 202
    body = answer.json()
    assert [item[SOP_UID]["Value"][0] for item in body[REFERENCED]["Value"]] == [_uid(CT), _uid(MR), _uid(CT)]
    failed = body[FAILED]["Value"]
    assert [item[REASON]["Value"][0] for item in failed] == [0xC000, 0x0111]
    assert failed[1][SOP_UID]["Value"] == [_uid(CT)]  # a refused part is named
    assert len(client.get("/instances").json()) == 2


def test_one_request_of_new_instances_is_one_index_transaction(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    transactions = 0
    real = Database.run_sync

    def counted(self: Database, work, units=1):  # type: ignore[no-untyped-def]
        nonlocal transactions
        transactions += 1
        return real(self, work, units)

    monkeypatch.setattr(Database, "run_sync", counted)
    parts = [make_instance("1.2.3", "1.2.3.1", f"1.2.3.1.{i}") for i in range(30)]
    answer = client.post("/studies", content=stow_body(*parts)[0], headers=stow_body()[1])
    assert answer.status_code == 200 and len(answer.json()[REFERENCED]["Value"]) == 30
    assert transactions == 1


def test_a_store_that_fails_mid_batch_fails_the_request_and_leaves_nothing(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    archive = client.app.state.archive  # type: ignore[attr-defined]
    store = archive._objects.store
    # A local store writes a batch's objects in one worker-thread trip (put_many), each by _put_now.
    real_put = store._put_now
    calls = 0

    def failing_put(path, data, options):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 7:
            raise NetworkError("the store is unreachable")
        return real_put(path, data, options)

    first = [make_instance("1.2.4", "1.2.4.1", "1.2.4.1.0")]
    assert client.post("/studies", content=stow_body(*first)[0], headers=stow_body()[1]).status_code == 200
    monkeypatch.setattr(store, "_put_now", failing_put)
    parts = [make_instance("1.2.3", "1.2.3.1", f"1.2.3.1.{i}") for i in range(10)]
    answer = client.post("/studies", content=stow_body(*first, *parts)[0], headers=stow_body()[1])
    assert answer.status_code >= 500
    monkeypatch.setattr(store, "_put_now", real_put)
    stored = client.get("/instances").json()
    assert len(stored) == 1  # the instance stored before is untouched; none of this request's
    objects = [
        f for kind in ("instances", "metadata") for f in (tmp_path / "objects").rglob(f"{kind}/**/*.*")
    ]
    assert len([f for f in objects if f.suffix in (".dcm", ".json")]) == 2  # its object and sidecar


def test_a_request_of_new_instances_writes_its_objects_in_one_store_call(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = client.app.state.archive._objects.store  # type: ignore[attr-defined]
    real = store.put_many
    calls: list[int] = []

    async def counted(items):  # type: ignore[no-untyped-def]
        calls.append(len(items))
        return await real(items)

    monkeypatch.setattr(store, "put_many", counted)
    parts = [make_instance("1.2.5", "1.2.5.1", f"1.2.5.1.{i}") for i in range(12)]
    answer = client.post("/studies", content=stow_body(*parts)[0], headers=stow_body()[1])
    assert answer.status_code == 200 and len(answer.json()[REFERENCED]["Value"]) == 12
    assert calls == [24]  # each instance's object and sidecar


def test_a_whole_study_is_answered_with_its_length(client: TestClient) -> None:
    """Parts sent as stored: the streamed answer carries a Content-Length equal to its body."""
    parts = [make_instance("1.2.6", "1.2.6.1", f"1.2.6.1.{i}") for i in range(5)]
    assert client.post("/studies", content=stow_body(*parts)[0], headers=stow_body()[1]).status_code == 200
    answer = client.get("/studies/1.2.6", headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert answer.status_code == 200
    assert int(answer.headers["content-length"]) == len(answer.content)
    assert "transfer-encoding" not in answer.headers
    boundary = answer.headers["content-type"].rpartition("boundary=")[2]
    pieces = (b"\r\n" + answer.content).split(b"\r\n--" + boundary.encode())
    assert pieces[-1] == b"--\r\n"
    assert sorted(p.split(b"\r\n\r\n", 1)[1] for p in pieces[1:-1]) == sorted(parts)
