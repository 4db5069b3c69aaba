"""The service in-process (TestClient) over a real archive on a local directory and SQLite: STOW
answers, error bodies, CORS, OIDC JWTs through the routes, tenants from claims."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from sqlalchemy import update
from test_service_oidc import Issuer

from dicom_cloud.archive.access import TOKEN_PREFIX
from dicom_cloud.archive.models import ApiTokenRow
from dicom_cloud.service import stow
from dicom_cloud.service.app import create_app
from dicom_cloud.service.auth import Principal
from dicom_cloud.service.credential_cache import CredentialCache
from dicom_cloud.service.settings import load_settings

CT = Path(get_testdata_file("CT_small.dcm")).read_bytes()  # type: ignore[arg-type]
MR = Path(get_testdata_file("MR_small.dcm")).read_bytes()  # type: ignore[arg-type]


def stow_body(*parts: bytes) -> tuple[bytes, dict[str, str]]:
    body = (
        b"".join(b"--B\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
        + b"--B--\r\n"
    )
    return body, {"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'}


def make_client(tmp_path: Path, **values: Any) -> tuple[TestClient, list[str]]:
    tokens: list[str] = []
    settings = load_settings({"data_dir": tmp_path, **values}, environ={})
    return TestClient(create_app(settings, announce_token=tokens.append)), tokens


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    c, tokens = make_client(tmp_path, cors_origins="https://viewer.example")
    with c:
        c.headers["Authorization"] = f"Bearer {tokens[0]}"
        yield c


def test_stow_answer_is_ps3_18(client: TestClient) -> None:
    body, headers = stow_body(CT)
    answer = client.post("/studies", content=body, headers=headers)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/dicom+json"
    sop = answer.json()["00081199"]["Value"][0]
    assert sop["00081150"]["Value"] == ["1.2.840.10008.5.1.4.1.1.2"]
    assert sop["00081190"]["Value"][0].startswith("http://testserver/studies/")
    # The same instance again: an idempotent success.
    assert client.post("/studies", content=body, headers=headers).status_code == 200
    # The same SOP Instance UID with other bytes: refused with 0x0111, nothing changes.
    changed = bytearray(CT)
    changed[-1] ^= 0xFF
    body, headers = stow_body(bytes(changed))
    answer = client.post("/studies", content=body, headers=headers)
    assert answer.status_code == 409
    assert answer.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0111]


RTPLAN = Path(get_testdata_file("rtplan.dcm")).read_bytes()  # type: ignore[arg-type]


def test_stow_failures_carry_a_readable_error_comment(client: TestClient) -> None:
    """Each FailedSOPSequence item has its FailureReason and, beside it, an ErrorComment (LO) that
    tells why, free of patient data."""
    changed = bytearray(CT)
    changed[-1] ^= 0xFF
    assert client.post("/studies", content=stow_body(CT)[0], headers=stow_body(CT)[1]).status_code == 200
    body = (
        b"--B\r\nContent-Type: application/dicom\r\n\r\n" + b"not DICOM at all" + b"\r\n"
        b"--B\r\nContent-Type: application/dicom\r\n\r\n" + bytes(changed) + b"\r\n"
        b"--B\r\nContent-Type: text/plain\r\n\r\n" + b"hello" + b"\r\n"
        b"--B\r\nContent-Type: application/dicom\r\n\r\n" + CT[:2000] + b"\r\n"
        b"--B--\r\n"
    )
    answer = client.post("/studies", content=body, headers=stow_body()[1])
    assert answer.status_code == 409
    failed = answer.json()["00081198"]["Value"]
    got = [(f["00081197"]["Value"][0], f["00000902"]) for f in failed]
    assert [code for code, _ in got] == [0xC000, 0x0111, 0xC000, 0xC000]
    comments = [c["Value"][0] for _, c in got]
    assert all(c["vr"] == "LO" for _, c in got)
    assert all(0 < len(c) <= 64 and "\\" not in c for c in comments)
    assert comments[0] == "not DICOM (no DICM marker)"
    assert "SOP Instance UID" in comments[1] and "other content" in comments[1]
    assert comments[2] == "the part is text/plain, not application/dicom"
    assert comments[3].startswith("truncated")
    assert not any("CompressedSamples" in c or "1CT1" in c for c in comments)  # no patient data
    # A study named by the path: instances of another study say so.
    answer = client.post("/studies/1.2.3", content=stow_body(MR)[0], headers=stow_body(MR)[1])
    [item] = answer.json()["00081198"]["Value"]
    assert item["00081197"]["Value"] == [0xA900]
    assert item["00000902"]["Value"] == ["the instance is of another study"]


def test_stow_reads_an_identity_only_to_name_a_refused_part(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored part is answered from the archive's own parse, which also checks the study of a
    URL naming one; the route reads an identity only to name a malformed part in the answer."""
    read: list[int] = []
    real = stow.read_identity

    def counted(data: Any, **options: Any) -> Any:
        read.append(len(data))
        return real(data, **options)

    monkeypatch.setattr(stow, "read_identity", counted)
    ct_sop = pydicom.dcmread(io.BytesIO(CT)).SOPInstanceUID
    answer = client.post("/studies", content=stow_body(CT, MR)[0], headers=stow_body()[1])
    assert answer.status_code == 200 and len(answer.json()["00081199"]["Value"]) == 2
    assert read == []
    changed = bytearray(CT)
    changed[-1] ^= 0xFF
    answer = client.post("/studies", content=stow_body(bytes(changed))[0], headers=stow_body()[1])
    [item] = answer.json()["00081198"]["Value"]
    assert item["00081155"]["Value"] == [ct_sop] and item["00081197"]["Value"] == [0x0111]
    assert len(read) == 1
    study = pydicom.dcmread(io.BytesIO(CT)).StudyInstanceUID
    answer = client.post(f"/studies/{study}", content=stow_body(CT, MR)[0], headers=stow_body()[1])
    assert answer.status_code == 202 and len(read) == 1
    [stored] = answer.json()["00081199"]["Value"]
    [other] = answer.json()["00081198"]["Value"]
    assert stored["00081155"]["Value"] == [ct_sop] and other["00081197"]["Value"] == [0xA900]
    assert other["00081155"]["Value"] == [pydicom.dcmread(io.BytesIO(MR)).SOPInstanceUID]


def test_stow_of_an_instance_whose_file_meta_names_another_uid_is_stored_with_a_warning(
    client: TestClient,
) -> None:
    """pydicom's rtplan.dcm (file meta: another SOP Instance UID) is stored under its dataset's
    UID; the answer is 202 with WarningReason B007 and the reason in ErrorComment."""
    body, headers = stow_body(RTPLAN, CT)
    answer = client.post("/studies", content=body, headers=headers)
    assert answer.status_code == 202
    assert "00081198" not in answer.json()
    plan, ct = answer.json()["00081199"]["Value"]
    assert plan["00081155"]["Value"] == ["1.2.777.777.77.7.7777.7777.20030903150023"]
    assert plan["00081196"] == {"vr": "US", "Value": [0xB007]}
    assert plan["00000902"]["Value"] == ["file meta and dataset disagree on the SOP Instance UID"]
    assert "00081196" not in ct and "00000902" not in ct
    assert (
        answer.headers["warning"]
        == '299 dicom-cloud "file meta and dataset disagree on the SOP Instance UID"'
    )
    found = client.get("/instances", params={"SOPInstanceUID": "1.2.777.777.77.7.7777.7777.20030903150023"})
    assert found.status_code == 200 and len(found.json()) == 1
    retrieved = client.get(plan["00081190"]["Value"][0].removeprefix("http://testserver"))
    assert retrieved.status_code == 200 and RTPLAN in retrieved.content


def test_expiring_tokens_answer_401_once_expired_and_are_listed_as_expired(client: TestClient) -> None:
    answer = client.post("/tokens", json={"name": "ci", "scopes": ["read"], "expires_in_seconds": 3600})
    assert answer.status_code == 201
    made = answer.json()
    assert made["expires"] is not None and made["expired"] is False
    assert (
        client.post("/tokens", json={"name": "x", "scopes": ["read"], "expires_in_seconds": 0}).status_code
        == 400
    )
    own = {"Authorization": f"Bearer {made['token']}"}
    assert client.get("/studies", headers=own).status_code == 200
    # Its expiry moved into the past, as time would: refused, and listed as expired.
    archive = client.app.state.archive  # type: ignore[attr-defined]
    past = datetime.now(UTC) - timedelta(seconds=1)

    def expire(session: Any) -> None:
        session.execute(update(ApiTokenRow).where(ApiTokenRow.id == made["id"]).values(expires=past))

    archive._db.run_sync(expire)
    # Time passing would also end the few seconds the service keeps a validated token.
    client.app.state.credential_cache.clear()  # type: ignore[attr-defined]
    answer = client.get("/studies", headers=own)
    assert answer.status_code == 401 and "expired" in answer.json()["message"]
    listed = {t["name"]: t for t in client.get("/tokens").json()}
    assert listed["ci"]["expired"] is True and listed["ci"]["revoked"] is None
    assert listed["bootstrap admin"]["expires"] is None and listed["bootstrap admin"]["expired"] is False


def _unknown_token() -> str:
    """A plausible API token no one was given (looked up, not refused by its shape)."""
    return TOKEN_PREFIX + "x" * 40


def _count_reads(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The secrets the archive is asked to authenticate from now on."""
    archive = client.app.state.archive  # type: ignore[attr-defined]
    asked: list[str] = []
    authenticate = archive.authenticate

    async def counted(token: str, now: datetime | None = None) -> Any:
        asked.append(token)
        return await authenticate(token, now)

    monkeypatch.setattr(archive, "authenticate", counted)
    return asked


def test_a_validated_token_is_not_read_again_within_the_cache_time(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = _count_reads(client, monkeypatch)
    for _ in range(3):
        assert client.get("/studies").status_code == 200
    assert len(asked) == 1
    # An unknown token is read every time (only valid ones are kept).
    for _ in range(2):
        assert (
            client.get("/studies", headers={"Authorization": "Bearer " + _unknown_token()}).status_code == 401
        )
    assert len(asked) == 3


def test_a_cached_token_is_refused_once_it_expires(tmp_path: Path) -> None:
    """The expiry time is checked on every request, cached or not."""
    c, tokens = make_client(tmp_path, auth_cache_seconds=60)
    with c:
        admin = {"Authorization": f"Bearer {tokens[0]}"}
        made = c.post(
            "/tokens", json={"name": "short", "scopes": ["read"], "expires_in_seconds": 1}, headers=admin
        ).json()
        own = {"Authorization": f"Bearer {made['token']}"}
        assert c.get("/studies", headers=own).status_code == 200
        time.sleep(max(0.0, (datetime.fromisoformat(made["expires"]) - datetime.now(UTC)).total_seconds()))
        time.sleep(0.05)
        assert c.get("/studies", headers=own).status_code == 401


def test_revoked_tokens_and_share_links_are_refused_at_once_despite_the_cache(tmp_path: Path) -> None:
    c, tokens = make_client(tmp_path, auth_cache_seconds=60)
    with c:
        admin = {"Authorization": f"Bearer {tokens[0]}"}
        body, headers = stow_body(CT)
        stored = c.post("/studies", content=body, headers={**headers, **admin}).json()
        study = stored["00081199"]["Value"][0]["00081190"]["Value"][0].split("/studies/")[1].split("/")[0]
        made = c.post("/tokens", json={"name": "r", "scopes": ["read"]}, headers=admin).json()
        share = c.post(f"/studies/{study}/shares", json={"expires_in_seconds": 600}, headers=admin)
        assert share.status_code == 201, share.text
        for secret in (made["token"], share.json()["token"]):
            assert (
                c.get(f"/studies/{study}/series", headers={"Authorization": f"Bearer {secret}"}).status_code
                == 200
            )
        assert c.delete(f"/tokens/{made['id']}", headers=admin).status_code == 200
        assert c.get("/studies", headers={"Authorization": f"Bearer {made['token']}"}).status_code == 401
        assert c.delete(f"/shares/{share.json()['id']}", headers=admin).status_code == 200
        shared = {"Authorization": f"Bearer {share.json()['token']}"}
        assert c.get(f"/studies/{study}/series", headers=shared).status_code == 401


def test_the_credential_cache_is_bounded_and_can_be_turned_off() -> None:
    principal = Principal("t", frozenset({"read"}), "token:1", "token")
    cache = CredentialCache(ttl=60, max_entries=2)
    for n in range(3):
        cache.put(cache.key(f"s{n}"), principal, None)
    assert cache.get(cache.key("s0")) is None and cache.get(cache.key("s2")) == principal
    cache.put(cache.key("past"), principal, datetime.now(UTC) - timedelta(seconds=1))
    assert cache.get(cache.key("past")) is None
    off = CredentialCache(ttl=0)
    off.put(off.key("s"), principal, None)
    assert off.get(off.key("s")) is None


def test_orphan_sweep_is_scheduled_by_default_and_configurable(tmp_path: Path) -> None:
    defaults = load_settings({"data_dir": tmp_path}, environ={})
    assert (defaults.orphan_sweep_interval_seconds, defaults.orphan_grace_seconds) == (3600, 3600)
    c, tokens = make_client(tmp_path, orphan_sweep_interval_seconds=0.05, orphan_grace_seconds=0.01)
    with c:
        c.headers["Authorization"] = f"Bearer {tokens[0]}"
        body, headers = stow_body(CT)
        assert c.post("/studies", content=body, headers=headers).status_code == 200
        instances = tmp_path / "objects" / "default" / "instances"
        [kept] = list(instances.rglob("*.dcm"))
        orphan = kept.with_name("0" * 32 + ".00000000.dcm")
        orphan.write_bytes(CT)  # an instance object no row points at
        folder = tmp_path / "objects" / "default" / "staging" / "finished-session"
        folder.mkdir(parents=True)
        deadline = time.monotonic() + 30
        while orphan.exists() or folder.exists():
            assert time.monotonic() < deadline, "the scheduled sweep did not run"
            time.sleep(0.05)
        assert kept.exists()
        assert c.get("/instances").json()


def test_error_bodies_name_the_problem(client: TestClient) -> None:
    answer = client.get("/studies/1.2.3")
    assert answer.status_code == 404 and answer.json()["error"] == "NotFoundError"
    answer = client.get("/studies/abc")
    assert answer.status_code == 400 and "study" in answer.json()["message"]
    answer = client.post("/tokens", json={"name": "x"})
    assert answer.status_code == 400 and "scopes" in answer.json()["message"]
    answer = client.post("/studies", content=b"--B\r\n", headers=stow_body()[1])
    assert answer.status_code == 400 and answer.json()["error"] == "MalformedRequestError"


def test_cors_preflight_for_configured_origins_only(client: TestClient) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    answer = client.options("/uploads", headers={"Origin": "https://viewer.example", **preflight})
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "https://viewer.example"
    answer = client.options("/uploads", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in answer.headers


def test_bootstrap_token_only_on_first_start(tmp_path: Path) -> None:
    first, tokens = make_client(tmp_path)
    with first:
        pass
    again, more = make_client(tmp_path)
    with again:
        pass
    assert len(tokens) == 1 and more == []


def test_oidc_jwts_through_the_routes(tmp_path: Path) -> None:
    issuer = Issuer()
    issuer.add_key("k1")
    try:
        c, _ = make_client(
            tmp_path, oidc_issuer=issuer.url, oidc_audience="dicom-cloud", oidc_algorithms="RS256"
        )
        with c:
            writer_a = {"Authorization": "Bearer " + issuer.token(tenant="a", scope="write")}
            reader_a = {"Authorization": "Bearer " + issuer.token(tenant="a", scope="read")}
            reader_b = {"Authorization": "Bearer " + issuer.token(tenant="b", scope="read admin")}
            body, headers = stow_body(CT)
            assert c.post("/studies", content=body, headers={**headers, **writer_a}).status_code == 200
            assert c.post("/studies", content=body, headers={**headers, **reader_a}).status_code == 403
            assert len(c.get("/studies", headers=reader_a).json()) == 1
            assert c.get("/studies", headers=reader_b).json() == []
            assert c.get("/tokens", headers=reader_b).status_code == 200
            expired = issuer.token(tenant="a", scope="read", exp=1)
            answer = c.get("/studies", headers={"Authorization": f"Bearer {expired}"})
            assert answer.status_code == 401 and "expired" in answer.json()["message"]
    finally:
        issuer.server.shutdown()


def test_access_log_names_the_principal(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="dicom_cloud.service.access"):
        client.get("/studies", params={"PatientName": "DOE^JOHN"})
    record = [r for r in caplog.records if r.name == "dicom_cloud.service.access"][-1]
    assert record.__dict__["tenant"] == "default" and record.__dict__["subject"].startswith("token:")
    assert "DOE" not in record.getMessage() and "DOE" not in str(record.__dict__)
