"""The DICOMweb service under a real uvicorn on loopback: dicomweb-client conformance, bad input,
tenant isolation, share links, tokens, labels, direct uploads (service-signed and SeaweedFS
presigned), and two instances sharing one PostgreSQL database and one bucket.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.data import get_testdata_file
from requests.exceptions import HTTPError

from dicom_cloud.service.settings import ServiceSettings, load_settings
from live_service import (
    LiveService,
    free_port,
    fresh_postgres_database,
    start_service,
    start_service_process,
    worker_pids,
)
from servers import S3Server

CT = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
MR = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
RTDOSE = Path(get_testdata_file("rtdose.dcm"))  # type: ignore[arg-type]  # 15 native frames

CLI = Path(sys.executable).parent / "dicom-cloud"
STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
SOP_UID = "00080018"


def settings_for(tmp_path: Path, **values: Any) -> ServiceSettings:
    return load_settings({"data_dir": tmp_path / "data", **values}, environ={})


@pytest.fixture
def service(tmp_path: Path) -> Iterator[LiveService]:
    live = start_service(
        settings_for(tmp_path, stow_max_bytes=4 * 1024 * 1024, upload_max_bytes=2 * 1024 * 1024)
    )
    yield live
    live.stop()


def auth(token: str | None) -> dict[str, str]:
    assert token
    return {"Authorization": f"Bearer {token}"}


def client_for(service: LiveService, token: str | None = None) -> DICOMwebClient:
    return DICOMwebClient(url=service.url, headers=auth(token or service.admin_token))


def related(*parts: bytes, content_type: str = "application/dicom") -> tuple[bytes, str]:
    boundary = "test-boundary-1234"
    body = b"".join(
        b"--"
        + boundary.encode()
        + b"\r\nContent-Type: "
        + content_type.encode()
        + b"\r\n\r\n"
        + part
        + b"\r\n"
        for part in parts
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def uid(entry: dict[str, Any], tag: str) -> str:
    value: str = entry[tag]["Value"][0]
    return value


def make_token(service_data_dir: Path, tenant: str, scopes: str) -> str:
    """A token for another tenant, made the operator's way: ``dicom-cloud token create``."""
    answer = subprocess.run(
        [
            str(CLI),
            "token",
            "create",
            "--tenant",
            tenant,
            "--scopes",
            scopes,
            "--data-dir",
            str(service_data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert answer.returncode == 0, answer.stderr
    return answer.stdout.strip()


# -- conformance with the standard client ----------------------------------------------------------


def test_dicomweb_client_store_search_retrieve_delete(service: LiveService) -> None:
    client = client_for(service)
    datasets = [pydicom.dcmread(path) for path in (CT, MR, RTDOSE)]
    # pydicom's rtdose.dcm names another instance in its file meta: made consistent here.
    datasets[2].file_meta.MediaStorageSOPInstanceUID = datasets[2].SOPInstanceUID
    answer = client.store_instances(datasets)
    assert len(answer.ReferencedSOPSequence) == 3
    assert "FailedSOPSequence" not in answer

    studies = client.search_for_studies()
    assert {uid(s, STUDY_UID) for s in studies} == {str(d.StudyInstanceUID) for d in datasets}
    assert all("00081190" in s for s in studies)  # RetrieveURL points at this service
    ct = datasets[0]
    found = client.search_for_studies(search_filters={"PatientID": ct.PatientID})
    assert [uid(s, STUDY_UID) for s in found] == [ct.StudyInstanceUID]
    assert len(client.search_for_series()) == 3
    series = client.search_for_series(study_instance_uid=ct.StudyInstanceUID)
    assert [uid(s, SERIES_UID) for s in series] == [ct.SeriesInstanceUID]
    assert len(client.search_for_instances()) == 3
    instances = client.search_for_instances(
        study_instance_uid=ct.StudyInstanceUID, series_instance_uid=ct.SeriesInstanceUID
    )
    assert [uid(i, SOP_UID) for i in instances] == [ct.SOPInstanceUID]
    assert len(client.search_for_instances(study_instance_uid=ct.StudyInstanceUID)) == 1

    retrieved = client.retrieve_study(ct.StudyInstanceUID)
    assert [d.SOPInstanceUID for d in retrieved] == [ct.SOPInstanceUID]
    assert retrieved[0].PixelData == ct.PixelData
    assert (
        client.retrieve_series(ct.StudyInstanceUID, ct.SeriesInstanceUID)[0].SOPInstanceUID
        == ct.SOPInstanceUID
    )
    one = client.retrieve_instance(ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    assert one.PatientName == ct.PatientName and one.PixelData == ct.PixelData

    metadata = client.retrieve_study_metadata(ct.StudyInstanceUID)
    assert uid(metadata[0], SOP_UID) == ct.SOPInstanceUID
    pixel_uri = metadata[0]["7FE00010"]["BulkDataURI"]
    assert pixel_uri.startswith(service.url + "/studies/")
    assert client.retrieve_bulkdata(pixel_uri) == [ct.PixelData]
    assert client.retrieve_series_metadata(ct.StudyInstanceUID, ct.SeriesInstanceUID)
    instance_metadata = client.retrieve_instance_metadata(
        ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID
    )
    assert uid(instance_metadata, SOP_UID) == ct.SOPInstanceUID

    dose = datasets[2]
    frame_size = dose.Rows * dose.Columns * dose.SamplesPerPixel * (dose.BitsAllocated // 8)
    frames = client.retrieve_instance_frames(
        dose.StudyInstanceUID, dose.SeriesInstanceUID, dose.SOPInstanceUID, frame_numbers=[1, 3]
    )
    assert frames == [dose.PixelData[:frame_size], dose.PixelData[2 * frame_size : 3 * frame_size]]

    png = client.retrieve_instance_rendered(
        ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID, media_types=("image/png",)
    )
    assert png.startswith(b"\x89PNG")
    jpeg = client.retrieve_instance_rendered(ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    assert jpeg.startswith(b"\xff\xd8")
    with httpx.Client(headers=auth(service.admin_token), timeout=60) as http:
        series_rendered = http.get(
            f"{service.url}/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/rendered",
            headers={"Accept": "multipart/related; type=image/png"},
        )
        assert series_rendered.status_code == 200
        assert series_rendered.headers["content-type"].startswith('multipart/related; type="image/png"')
        assert b"\x89PNG" in series_rendered.content

    client.delete_study(ct.StudyInstanceUID)
    assert {uid(s, STUDY_UID) for s in client.search_for_studies()} == {
        str(d.StudyInstanceUID) for d in datasets[1:]
    }
    with pytest.raises(HTTPError) as caught:
        client.retrieve_study(ct.StudyInstanceUID)
    assert caught.value.response.status_code == 404
    mr = datasets[1]
    client.delete_instance(mr.StudyInstanceUID, mr.SeriesInstanceUID, mr.SOPInstanceUID)
    client.delete_series(dose.StudyInstanceUID, dose.SeriesInstanceUID)
    assert client.search_for_instances() == []


# -- bad input --------------------------------------------------------------------------------------


def test_bad_input_gets_clear_4xx(service: LiveService) -> None:
    headers = auth(service.admin_token)
    with httpx.Client(base_url=service.url, headers=headers, timeout=60) as http:
        ct = CT.read_bytes()
        # Malformed multipart: no closing boundary, no boundary parameter, wrong media types.
        body, content_type = related(ct)
        answer = http.post("/studies", content=body[:-30], headers={"Content-Type": content_type})
        assert answer.status_code == 400 and "boundary" in answer.json()["message"]
        answer = http.post(
            "/studies", content=body, headers={"Content-Type": 'multipart/related; type="application/dicom"'}
        )
        assert answer.status_code == 400
        assert (
            http.post("/studies", content=ct, headers={"Content-Type": "application/dicom"}).status_code
            == 415
        )
        # Non-DICOM body: 409 with FailedSOPSequence, reason 0xC000.
        body, content_type = related(b"this is not DICOM" * 20)
        answer = http.post("/studies", content=body, headers={"Content-Type": content_type})
        assert answer.status_code == 409
        assert answer.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
        # Some good, some bad: 202; the good one is stored.
        body, content_type = related(ct, b"\0" * 200)
        answer = http.post("/studies", content=body, headers={"Content-Type": content_type})
        assert answer.status_code == 202
        assert len(answer.json()["00081199"]["Value"]) == 1 and len(answer.json()["00081198"]["Value"]) == 1
        # Storing into another study: 0xA900, nothing stored.
        body, content_type = related(MR.read_bytes())
        answer = http.post("/studies/1.2.3.4", content=body, headers={"Content-Type": content_type})
        assert answer.status_code == 409
        assert answer.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
        # Oversized body: 413, whatever Content-Length says.
        body, content_type = related(b"x" * (5 * 1024 * 1024))
        assert http.post("/studies", content=body, headers={"Content-Type": content_type}).status_code == 413
        # Unknown UIDs: 404; malformed UIDs and frame lists: 400.
        for path in (
            "/studies/1.2.3.999",
            "/studies/1.2.3.999/metadata",
            "/studies/1.2/series/1.3/instances/1.4",
            "/studies/1.2/series/1.3/instances/1.4/frames/1",
            "/studies/1.2/series/1.3/instances/1.4/rendered",
            "/studies/1.2/thumbnail",
        ):
            assert http.get(path).status_code == 404, path
        assert http.delete("/studies/1.2.3.999").status_code == 404
        assert http.get("/studies/1.2.x").status_code == 400
        assert http.get("/studies/1.2/series/1.3/instances/1.4/frames/0").status_code in (400, 404)
        assert http.get("/studies/1.2/series/1.3/instances/1.4/frames/a,b").status_code == 400
        # SQL-ish query strings are values like any other: no match, never an error of the database.
        for query in (
            {"PatientName": "' OR 1=1 --"},
            {"PatientID": "1; DROP TABLE instances"},
            {"StudyDate": "2020'--"},
            {"limit": "-1"},
            {"offset": "1e99"},
            {"includefield": "'; SELECT"},
            {"00100010": "%_%"},
        ):
            answer = http.get("/studies", params=query)
            assert answer.status_code in (200, 400), (query, answer.text)
            if answer.status_code == 200:
                assert answer.json() == [], query
        assert len(http.get("/studies").json()) == 1  # the CT, still there
        # Rendered media types: 406 for what cannot be produced.
        ds = pydicom.dcmread(CT)
        path = f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        assert http.get(path + "/rendered", headers={"Accept": "image/gif"}).status_code == 406
        assert http.get(path + "/thumbnail", headers={"Accept": "image/png"}).content.startswith(b"\x89PNG")
        assert http.get(path, headers={"Accept": "application/pdf"}).status_code == 406


def test_stow_warnings_and_failure_reasons_reach_the_client(service: LiveService) -> None:
    """Instances whose file meta names another SOP Instance UID (pydicom's rtplan.dcm and
    rtdose.dcm, stored by Orthanc) are stored under the dataset's UID with a warning; refusals
    carry a readable ErrorComment beside the code: with dicomweb-client and with raw HTTP."""
    client = client_for(service)
    datasets = [pydicom.dcmread(get_testdata_file(name)) for name in ("rtplan.dcm", "rtdose.dcm")]  # type: ignore[arg-type]
    assert all(d.file_meta.MediaStorageSOPInstanceUID != d.SOPInstanceUID for d in datasets)
    answer = client.store_instances(datasets)
    assert "FailedSOPSequence" not in answer
    assert [str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence] == [
        str(d.SOPInstanceUID) for d in datasets
    ]
    for item in answer.ReferencedSOPSequence:
        assert item.WarningReason == 0xB007
        assert item.ErrorComment == "file meta and dataset disagree on the SOP Instance UID"
    for d in datasets:
        [found] = client.search_for_instances(search_filters={"SOPInstanceUID": d.SOPInstanceUID})
        assert uid(found, SOP_UID) == d.SOPInstanceUID
        assert (
            client.search_for_instances(
                search_filters={"SOPInstanceUID": d.file_meta.MediaStorageSOPInstanceUID}
            )
            == []
        )
        retrieved = client.retrieve_instance(d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPInstanceUID)
        assert retrieved.SOPInstanceUID == d.SOPInstanceUID

    # A refusal: the client sees why (the same UID with other content), not only 0x0111.
    other = pydicom.dcmread(get_testdata_file("rtplan.dcm"))  # type: ignore[arg-type]
    other.RTPlanLabel = "changed"
    with pytest.raises(HTTPError) as refused:
        client.store_instances([other])
    assert refused.value.response.status_code == 409
    [failed] = refused.value.response.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0x0111]
    assert "SOP Instance UID" in failed["00000902"]["Value"][0]

    # Raw HTTP: the file as it is on disk; 202 with the warning, and the Warning header.
    with httpx.Client(base_url=service.url, headers=auth(service.admin_token), timeout=60) as http:
        body, content_type = related(RTDOSE.read_bytes(), b"junk" * 100)
        answer = http.post("/studies", content=body, headers={"Content-Type": content_type})
        assert answer.status_code == 202
        [stored] = answer.json()["00081199"]["Value"]
        assert stored["00081196"]["Value"] == [0xB007]
        [failed] = answer.json()["00081198"]["Value"]
        assert (failed["00081197"]["Value"], failed["00000902"]["Value"]) == (
            [0xC000],
            ["not DICOM (no DICM marker)"],
        )
        assert "disagree on the SOP Instance UID" in answer.headers["warning"]


# -- tenants, scopes, tokens -------------------------------------------------------------------------


def test_tenant_isolation(service: LiveService, tmp_path: Path) -> None:
    other = make_token(tmp_path / "data", "tenant-b", "admin")
    ct = pydicom.dcmread(CT)
    client_for(service).store_instances([ct])
    client_for(service, other).store_instances([pydicom.dcmread(MR)])
    with httpx.Client(base_url=service.url, headers=auth(other), timeout=60) as http:
        studies = http.get("/studies").json()
        assert ct.StudyInstanceUID not in {uid(s, STUDY_UID) for s in studies}
        assert http.get("/instances", params={"SOPInstanceUID": ct.SOPInstanceUID}).json() == []
        base = f"/studies/{ct.StudyInstanceUID}"
        instance = f"{base}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}"
        for path in (
            base,
            f"{base}/metadata",
            instance,
            f"{instance}/metadata",
            f"{instance}/rendered",
            f"{base}/labels",
        ):
            assert http.get(path).status_code == 404, path
        assert http.delete(base).status_code == 404
        assert http.post(f"{base}/shares", json={"expires_in_seconds": 600}).status_code == 404
        assert all(t["tenant"] == "tenant-b" for t in http.get("/tokens").json())
    # The owner still has everything.
    assert client_for(service).retrieve_study(ct.StudyInstanceUID)[0].SOPInstanceUID == ct.SOPInstanceUID


def test_token_create_with_expires(service: LiveService, tmp_path: Path) -> None:
    """``dicom-cloud token create --expires 30d``: the token works now, is listed with its expiry
    30 days on; bad durations are one-line usage errors (exit 2)."""
    data = ["--data-dir", str(tmp_path / "data")]
    argv = [str(CLI), "token", "create", "--tenant", "default", "--scopes", "read", "--name", "ci"]
    made = subprocess.run([*argv, "--expires", "30d", "--json", *data], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    expires = datetime.fromisoformat(created["expires"])
    assert timedelta(days=29, hours=23) < expires - datetime.now(UTC) <= timedelta(days=30)
    with httpx.Client(base_url=service.url, timeout=60) as http:
        assert http.get("/studies", headers=auth(created["token"])).status_code == 200
        listed = {t["id"]: t for t in http.get("/tokens", headers=auth(service.admin_token)).json()}
        assert datetime.fromisoformat(listed[created["id"]]["expires"]) == expires
        assert listed[created["id"]]["expired"] is False
    for bad in ("0", "soon", "99999999999w"):
        refused = subprocess.run([*argv, "--expires", bad, *data], capture_output=True, text=True)
        assert refused.returncode == 2, (bad, refused.stderr)
        assert "Traceback" not in refused.stderr and "expir" in refused.stderr


def test_scopes_and_token_admin(service: LiveService) -> None:
    with httpx.Client(base_url=service.url, timeout=60) as http:
        created = http.post(
            "/tokens", json={"name": "viewer", "scopes": ["read"]}, headers=auth(service.admin_token)
        )
        assert created.status_code == 201
        reader = created.json()["token"]
        body, content_type = related(CT.read_bytes())
        answer = http.post("/studies", content=body, headers={"Content-Type": content_type, **auth(reader)})
        assert answer.status_code == 403
        assert http.get("/studies", headers=auth(reader)).status_code == 200
        assert http.get("/tokens", headers=auth(reader)).status_code == 403
        assert http.get("/metrics", headers=auth(reader)).status_code == 403
        metrics = http.get("/metrics", headers=auth(service.admin_token))
        assert "dicom_cloud_http_requests_total" in metrics.text
        listed = http.get("/tokens", headers=auth(service.admin_token)).json()
        assert reader not in str(listed) and {t["name"] for t in listed} >= {"viewer", "bootstrap admin"}
        revoked = http.delete(f"/tokens/{created.json()['id']}", headers=auth(service.admin_token))
        assert revoked.status_code == 200 and revoked.json()["revoked"]
        assert http.get("/studies", headers=auth(reader)).status_code == 401
        assert (
            http.post(
                "/tokens", json={"name": "x", "scopes": ["root"]}, headers=auth(service.admin_token)
            ).status_code
            == 400
        )


def test_labels_are_searchable(service: LiveService) -> None:
    ct, mr = pydicom.dcmread(CT), pydicom.dcmread(MR)
    client_for(service).store_instances([ct, mr])
    with httpx.Client(base_url=service.url, headers=auth(service.admin_token), timeout=60) as http:
        path = f"/studies/{ct.StudyInstanceUID}/labels"
        assert http.get(path).json()["tags"] == []
        answer = http.put(path, json={"tags": ["teaching", "chest"], "description": "good example"})
        assert answer.status_code == 200 and sorted(answer.json()["tags"]) == ["chest", "teaching"]
        assert http.get(path).json()["description"] == "good example"
        found = http.get("/studies", params={"label": "teaching"}).json()
        assert [uid(s, STUDY_UID) for s in found] == [ct.StudyInstanceUID]
        assert http.put(path, json={"tags": [""]}).status_code == 400
        assert http.put("/studies/1.2.3.999/labels", json={"tags": ["x"]}).status_code == 404


# -- share links -------------------------------------------------------------------------------------


def test_share_link_scope_expiry_and_revocation(service: LiveService) -> None:
    ct, mr = pydicom.dcmread(CT), pydicom.dcmread(MR)
    client_for(service).store_instances([ct, mr])
    with httpx.Client(base_url=service.url, timeout=60) as http:
        admin = auth(service.admin_token)
        created = http.post(
            f"/studies/{ct.StudyInstanceUID}/shares", json={"expires_in_seconds": 600}, headers=admin
        )
        assert created.status_code == 201
        share = created.json()
        assert share["url"].startswith(service.url + "/shared/")
        # The URL opens without other credentials and says what it shares.
        opened = http.get(share["url"])
        assert opened.status_code == 200 and opened.json()["study_instance_uid"] == ct.StudyInstanceUID
        # The token reads its study and nothing else.
        viewer = client_for(service, share["token"])
        assert [uid(s, STUDY_UID) for s in viewer.search_for_studies()] == [ct.StudyInstanceUID]
        assert [uid(s, SERIES_UID) for s in viewer.search_for_series()] == [ct.SeriesInstanceUID]
        assert viewer.retrieve_study(ct.StudyInstanceUID)[0].SOPInstanceUID == ct.SOPInstanceUID
        token = auth(share["token"])
        assert http.get(f"/studies/{mr.StudyInstanceUID}", headers=token).status_code == 403
        assert http.get(f"/studies/{mr.StudyInstanceUID}/metadata", headers=token).status_code == 403
        assert http.delete(f"/studies/{ct.StudyInstanceUID}", headers=token).status_code == 403
        body, content_type = related(MR.read_bytes())
        assert (
            http.post("/studies", content=body, headers={"Content-Type": content_type, **token}).status_code
            == 403
        )
        assert http.get("/tokens", headers=token).status_code == 403
        # Revoked: refused everywhere.
        assert http.delete(f"/shares/{share['id']}", headers=admin).status_code == 200
        assert http.get(f"/studies/{ct.StudyInstanceUID}", headers=token).status_code == 401
        assert http.get(share["url"]).status_code == 401
        # Expired: refused. The link is first seen working: an answer received before the expiry
        # the service gave it (same clock) was decided before it; a slower one proves nothing, and
        # a new link is tried. Then, once that instant has passed, the same link is refused.
        for _ in range(10):
            short = http.post(
                f"/studies/{ct.StudyInstanceUID}/shares", json={"expires_in_seconds": 2}, headers=admin
            ).json()
            expires = datetime.fromisoformat(short["expires"])
            expires = expires if expires.tzinfo else expires.replace(tzinfo=UTC)
            status = http.get("/studies", headers=auth(short["token"])).status_code
            if datetime.now(UTC) < expires:
                assert status == 200
                break
        else:
            pytest.fail("no answer came within a 2 s share link's lifetime in 10 tries")
        time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.05)
        assert datetime.now(UTC) >= expires
        assert http.get("/studies", headers=auth(short["token"])).status_code == 401
        # Links only to studies that exist.
        assert http.post("/studies/1.2.3.999/shares", json={}, headers=admin).status_code == 404


# -- direct uploads ----------------------------------------------------------------------------------


def _upload(http: httpx.Client, files: list[tuple[str, bytes]]) -> dict[str, Any]:
    declared = [
        {"name": name, "size": len(data), "content_type": "application/dicom"} for name, data in files
    ]
    created = http.post("/uploads", json={"files": declared})
    assert created.status_code == 201, created.text
    session: dict[str, Any] = created.json()
    for url, (_, data) in zip(session["files"], files, strict=True):
        put = httpx.put(url["url"], content=data, headers=url["headers"], timeout=60)
        assert put.status_code in (200, 204), (put.text, url["url"])
    return session


def _modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and of everything under it, by path relative to ``root``'s parent."""
    found = {root.name: root.stat().st_mode & 0o777}
    for path in root.rglob("*"):
        found[str(path.relative_to(root.parent))] = path.lstat().st_mode & 0o777
    return found


def test_embedded_data_is_created_owner_only(tmp_path: Path) -> None:
    """The data directory, the SQLite index (with its -wal and -shm), instances, sidecars, derived
    previews and staged uploads of ``dicom-cloud serve``'s embedded default are 0700/0600, under
    the common umask 022."""
    previous = os.umask(0o022)
    try:
        service = start_service_process(tmp_path / "work")
    finally:
        os.umask(previous)
    try:
        ct = pydicom.dcmread(CT)
        with httpx.Client(base_url=service.url, headers=auth(service.token), timeout=60) as http:
            body, content_type = related(CT.read_bytes())
            assert (
                http.post("/studies", content=body, headers={"Content-Type": content_type}).status_code == 200
            )
            path = (
                f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}"
            )
            assert http.get(path + "/rendered").status_code == 200  # cached under derived/
            session = _upload(http, [("mr.dcm", MR.read_bytes())])
            data = tmp_path / "work" / "data"
            staged = _modes(data)
            assert any("/staging/" in p for p in staged), sorted(staged)
            assert http.post(f"/uploads/{session['id']}/complete").status_code == 200
        modes = {**staged, **_modes(data)}
        kinds = {kind: any(f"/{kind}/" in p for p in modes) for kind in ("instances", "metadata", "derived")}
        assert all(kinds.values()), kinds
        assert {"data/index.sqlite", "data/index.sqlite-wal", "data/index.sqlite-shm"} <= set(modes)
        loose = {
            p: oct(m)
            for p, m in modes.items()
            if m != (0o700 if (tmp_path / "work" / p).is_dir() or p == "data" else 0o600)
        }
        assert not loose, loose
    finally:
        service.stop()


def test_direct_upload_through_the_service_signed_route(service: LiveService, tmp_path: Path) -> None:
    other = make_token(tmp_path / "data", "tenant-b", "write")
    with httpx.Client(base_url=service.url, headers=auth(service.admin_token), timeout=60) as http:
        session = _upload(http, [("ct.dcm", CT.read_bytes()), ("notes.txt", b"not dicom at all" * 10)])
        assert session["files"][0]["url"].startswith(service.url + "/uploads/")
        # Another tenant can neither see nor complete the session.
        assert http.get(f"/uploads/{session['id']}", headers=auth(other)).status_code == 404
        assert http.post(f"/uploads/{session['id']}/complete", headers=auth(other)).status_code == 404
        done = http.post(f"/uploads/{session['id']}/complete")
        assert done.status_code == 200, done.text
        result = done.json()
        assert [a["name"] for a in result["accepted"]] == ["ct.dcm"]
        assert [r["name"] for r in result["rejected"]] == ["notes.txt"] and result["rejected"][0]["reason"]
        assert len(http.get("/instances").json()) == 1
        # Declared sizes over the maximum are refused before any URL exists.
        too_big = http.post("/uploads", json={"files": [{"name": "big", "size": 3 * 1024 * 1024}]})
        assert too_big.status_code == 413
        # The signed URL binds size, content type and signature.
        created = http.post("/uploads", json={"files": [{"name": "a", "size": 10}]}).json()
        url = created["files"][0]["url"]
        assert (
            httpx.put(url, content=b"x" * 11, headers={"Content-Type": "application/dicom"}).status_code
            == 413
        )
        other_type = httpx.put(url, content=b"x" * 10, headers={"Content-Type": "text/plain"})
        assert other_type.status_code == 401
        tampered = url.replace("size=10", "size=11")
        assert (
            httpx.put(tampered, content=b"x" * 11, headers={"Content-Type": "application/dicom"}).status_code
            == 401
        )
        # A body shorter than the signed size (streamed to staging as it arrives) stages nothing.
        short = httpx.put(url, content=b"x" * 9, headers={"Content-Type": "application/dicom"})
        assert short.status_code == 400 and "size" in short.json()["message"]
        staged = (tmp_path / "data" / "objects").rglob(f"staging/{created['id']}/*")
        assert not [p for p in staged if p.is_file()]


@pytest.fixture
def s3_env(seaweedfs: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    return seaweedfs


def test_direct_upload_presigned_to_seaweedfs(s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    live = start_service(settings_for(tmp_path, storage=f"s3://{s3_bucket}/archive"))
    try:
        with httpx.Client(base_url=live.url, headers=auth(live.admin_token), timeout=60) as http:
            session = _upload(http, [("ct.dcm", CT.read_bytes()), ("mr.dcm", MR.read_bytes())])
            assert all(
                f["url"].startswith(s3_env.endpoint) for f in session["files"]
            )  # bytes bypass the service
            result = http.post(f"/uploads/{session['id']}/complete").json()
            assert len(result["accepted"]) == 2 and result["rejected"] == []
            ct = pydicom.dcmread(CT)
            retrieved = client_for(live).retrieve_study(ct.StudyInstanceUID)
            assert retrieved[0].PixelData == ct.PixelData
            # The URL is signed for one content type and one exact size: S3 refuses anything else.
            created = http.post("/uploads", json={"files": [{"name": "ct.dcm", "size": 100}]}).json()
            url = created["files"][0]["url"]
            assert created["files"][0]["headers"] == {
                "Content-Type": "application/dicom",
                "Content-Length": "100",
            }
            longer = httpx.put(url, content=CT.read_bytes(), headers={"Content-Type": "application/dicom"})
            assert longer.status_code == 403
            other_type = httpx.put(url, content=b"x" * 100, headers={"Content-Type": "text/plain"})
            assert other_type.status_code == 403
            # Nothing arrived: completing rejects the file, nothing is stored.
            result = http.post(f"/uploads/{created['id']}/complete").json()
            assert result["accepted"] == [] and result["rejected"][0]["reason"]
    finally:
        live.stop()


def _large_instance() -> bytes:
    """A valid CT instance of about 6.3 MiB (two 5 MiB parts)."""
    ds = pydicom.dcmread(CT)
    ds.Rows, ds.Columns = 1792, 1792
    ds.PixelData = bytes(range(256)) * (1792 * 1792 * 2 // 256)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_direct_upload_in_parts_to_seaweedfs(s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    live = start_service(
        settings_for(tmp_path, storage=f"s3://{s3_bucket}/archive", upload_part_size=5 * 1024 * 1024)
    )
    data = _large_instance()
    try:
        with httpx.Client(base_url=live.url, headers=auth(live.admin_token), timeout=60) as http:
            declared = {
                "files": [
                    {"name": "big.dcm", "size": len(data)},
                    {"name": "ct.dcm", "size": CT.stat().st_size},
                ]
            }
            session = http.post("/uploads", json=declared).json()
            big, small = session["files"]
            assert big["url"] is None and small["url"] and small["multipart"] is None
            parts = big["multipart"]["parts"]
            assert [p["size"] for p in parts] == [5 * 1024 * 1024, len(data) - 5 * 1024 * 1024]
            etags = []
            for part in parts:
                start = (part["number"] - 1) * big["multipart"]["part_size"]
                chunk = data[start : start + part["size"]]
                assert httpx.put(part["url"], content=chunk[:-1] + b"\0\0").status_code == 403  # exact length
                answer = httpx.put(part["url"], content=chunk, headers=part["headers"])
                assert answer.status_code == 200
                etags.append(answer.headers["etag"])
            assert (
                httpx.put(small["url"], content=CT.read_bytes(), headers=small["headers"]).status_code == 200
            )
            # Wrong ETags: the bucket refuses the join; the session stays open.
            wrong = {
                "parts": [{"index": 0, "upload_id": big["multipart"]["upload_id"], "etags": ['"x"', '"y"']}]
            }
            assert http.post(f"/uploads/{session['id']}/complete", json=wrong).status_code == 400
            right = {"parts": [{"index": 0, "upload_id": big["multipart"]["upload_id"], "etags": etags}]}
            done = http.post(f"/uploads/{session['id']}/complete", json=right)
            assert done.status_code == 200, done.text
            assert sorted(a["name"] for a in done.json()["accepted"]) == ["big.dcm", "ct.dcm"]
            big_back = client_for(live).retrieve_instance(
                pydicom.dcmread(CT).StudyInstanceUID,
                pydicom.dcmread(CT).SeriesInstanceUID,
                "1.2.826.0.1.3680043.8.498.1",
            )
            assert big_back.PixelData == pydicom.dcmread(io.BytesIO(data)).PixelData
    finally:
        live.stop()


# -- several instances, one database, one bucket -----------------------------------------------------


def test_two_instances_share_postgresql_and_bucket(s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    with fresh_postgres_database() as database:
        settings = settings_for(
            tmp_path, storage=f"s3://{s3_bucket}/archive", database=database, signing_secret="k" * 40
        )
        first = start_service(settings)
        second = start_service(settings)
        try:
            assert (
                first.admin_token and second.admin_token is None
            )  # one bootstrap token, in the shared index
            ct, mr = pydicom.dcmread(CT), pydicom.dcmread(MR)
            client_for(first).store_instances([ct, mr])
            reader = client_for(second, first.admin_token)
            assert {uid(s, STUDY_UID) for s in reader.search_for_studies()} == {
                ct.StudyInstanceUID,
                mr.StudyInstanceUID,
            }
            assert (
                reader.retrieve_instance(
                    ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID
                ).PixelData
                == ct.PixelData
            )
            # A token made through one instance works on the other; a delete through one is seen by the other.
            with httpx.Client(timeout=60) as http:
                made = http.post(
                    first.url + "/tokens",
                    json={"name": "r", "scopes": ["read"]},
                    headers=auth(first.admin_token),
                )
                assert (
                    http.get(second.url + "/studies", headers=auth(made.json()["token"])).status_code == 200
                )
            reader.delete_study(mr.StudyInstanceUID)
            assert [uid(s, STUDY_UID) for s in client_for(first).search_for_studies()] == [
                ct.StudyInstanceUID
            ]
        finally:
            second.stop()
            first.stop()


def test_serve_with_workers_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """On uvicorn's C stack (httptools, uvloop, when installed): the workers answer, and SIGTERM to
    the supervisor stops every worker and exits 0."""
    service = start_service_process(tmp_path / "work", extra_args=("--workers", "2"))
    popen = service._proc.popen
    try:
        children = Path(f"/proc/{service.pid}/task/{service.pid}/children").read_text().split()
        assert len(children) >= 2  # the workers (and multiprocessing's resource tracker)
        with httpx.Client(base_url=service.url, timeout=60) as http:
            for _ in range(8):  # new connections, taken by either worker
                assert (
                    http.get("/studies", headers={**auth(service.token), "Connection": "close"}).status_code
                    == 200
                )
        popen.send_signal(signal.SIGTERM)
        assert popen.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while [pid for pid in children if Path(f"/proc/{pid}").exists()]:
            assert time.monotonic() < deadline, "a worker outlived the service"
            time.sleep(0.1)
    finally:
        service.stop()


def _tcp_inodes(port: int, state: str) -> set[str]:
    """Socket inodes of TCP sockets on local ``port`` in ``state`` (01 established, 0A listening)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                inodes.add(fields[9])
    return inodes


def _socket_fds(pid: int, inodes: set[str]) -> list[str]:
    """The descriptors of ``pid`` that are sockets among ``inodes``."""
    fds = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except FileNotFoundError:
            continue  # closed since the directory was read (a worker still starting opens files)
        if link.startswith("socket:[") and link[8:-1] in inodes:
            fds.append(fd.name)
    return fds


def _accepting(pid: int, port: int) -> bool:
    """Whether a worker's event loop watches the listening socket (its epoll set holds it): the
    worker has started and takes connections."""
    listening = set(_socket_fds(pid, _tcp_inodes(port, "0A")))
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):  # a descriptor closed meanwhile
            if listening & set(re.findall(r"tfd:\s*(\d+)\s", info.read_text())):
                return True
    return False


def test_serve_workers_share_a_clients_keep_alive_connections(tmp_path: Path) -> None:
    """A client's four keep-alive connections, opened at once, spread evenly over two workers (the
    kernel's hash of their addresses put them 4:0 in every start of a benchmark), so a client
    with a pool is served by both."""
    service = start_service_process(tmp_path / "work", extra_args=("--workers", "2"))
    try:
        children = [
            int(p) for p in Path(f"/proc/{service.pid}/task/{service.pid}/children").read_text().split()
        ]
        port = int(service.url.rsplit(":", 1)[1].split("/")[0])
        workers = [pid for pid in children if _socket_fds(pid, _tcp_inodes(port, "0A"))]
        assert len(workers) == 2
        deadline = time.monotonic() + 60  # the first worker answers the start-up's probe alone
        while not all(_accepting(pid, port) for pid in workers):
            assert time.monotonic() < deadline, "a worker never started accepting"
            time.sleep(0.1)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        try:
            for client in clients:  # one request each, the connections kept open
                client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            for client in clients:
                assert client.recv(65536).startswith(b"HTTP/1.1 200")
            # Every connection the workers hold counts (the start-up's health probe may linger).
            established = _tcp_inodes(port, "01")
            held = [n for n in (len(_socket_fds(pid, established)) for pid in workers) if n]
            assert len(held) == 2 and max(held) - min(held) <= 1, held
        finally:
            for client in clients:
                client.close()
    finally:
        service.stop()


def test_two_instances_with_two_workers_each_share_postgresql_and_bucket(
    s3_env: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """``dicom-cloud serve --workers 2`` twice on one PostgreSQL database and one bucket: every
    request, whichever process of whichever instance answers it, sees the same archive."""
    with fresh_postgres_database() as database:
        shared = ("--storage", f"s3://{s3_bucket}/archive", "--database", database)
        env = {"DICOM_CLOUD_SERVICE_SIGNING_SECRET": "k" * 40}
        first = start_service_process(
            tmp_path / "first", setting_args=shared, extra_args=("--workers", "2"), env=env
        )
        try:
            second = start_service_process(
                tmp_path / "second", setting_args=shared, extra_args=("--workers", "2"), env=env
            )
        except BaseException:
            first.stop()
            raise
        try:
            assert len(worker_pids(first.pid)) == 2 and len(worker_pids(second.pid)) == 2
            instances = [CT.read_bytes(), MR.read_bytes()]
            with httpx.Client(timeout=60) as http:
                for data in instances:  # one request each: both may land on different workers
                    body, content_type = related(data)
                    stored = http.post(
                        first.url + "/studies",
                        content=body,
                        headers={**auth(first.token), "Content-Type": content_type},
                    )
                    assert stored.status_code == 200, stored.text
                ct, mr = pydicom.dcmread(CT), pydicom.dcmread(MR)
                # Several requests, so that every worker of the other instance answers some.
                for _ in range(8):
                    found = http.get(second.url + "/studies", headers=auth(second.token))
                    assert {uid(s, STUDY_UID) for s in found.json()} == {
                        ct.StudyInstanceUID,
                        mr.StudyInstanceUID,
                    }
                    retrieved = http.get(
                        f"{second.url}/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}"
                        f"/instances/{ct.SOPInstanceUID}",
                        headers={
                            **auth(first.token),
                            "Accept": 'multipart/related; type="application/dicom"',
                        },
                    )
                    # (the preamble is stored zeroed)
                    assert retrieved.status_code == 200 and instances[0][128:] in retrieved.content
                deleted = http.delete(
                    f"{second.url}/studies/{mr.StudyInstanceUID}", headers=auth(first.token)
                )
                assert deleted.status_code == 200
                for _ in range(4):
                    found = http.get(first.url + "/studies", headers=auth(second.token))
                    assert [uid(s, STUDY_UID) for s in found.json()] == [ct.StudyInstanceUID]
        finally:
            second.stop()
            first.stop()


def test_serve_command_starts_with_no_setup(tmp_path: Path) -> None:
    """``dicom-cloud serve`` with only a data directory: prints the bootstrap token once, serves /healthz."""
    port = free_port()
    process = subprocess.Popen(
        [str(CLI), "serve", "--data-dir", str(tmp_path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/docs").status_code == 200
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    token_lines = [line.strip() for line in io.StringIO(err) if line.strip().startswith("dcat_")]
    assert len(token_lines) == 1, err
    # The token is printed, never logged: no JSON log line holds it.
    assert all(token_lines[0] not in line for line in err.splitlines() if line.startswith("{"))


def test_encrypted_archive(tmp_path: Path) -> None:
    """With ``encrypt``, nothing the archive writes holds the instance in clear; reads decrypt."""
    key = tmp_path / "master.key"
    key.write_text(base64.b64encode(bytes(range(32))).decode())
    live = start_service(settings_for(tmp_path, encrypt=True, master_key=f"7:{key}"))
    try:
        ct = pydicom.dcmread(CT)
        client = client_for(live)
        client.store_instances([ct])
        assert client.retrieve_instance(
            ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID
        ).PixelData == (ct.PixelData)
        stored = [p for p in (tmp_path / "data" / "objects").rglob("*") if p.is_file()]
        assert stored
        for path in stored:
            data = path.read_bytes()
            assert ct.PixelData[:64] not in data and str(ct.PatientName).encode() not in data, path.name
    finally:
        live.stop()
