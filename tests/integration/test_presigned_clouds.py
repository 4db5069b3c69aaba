"""Direct uploads through the URLs ``POST /uploads`` returns, on Azurite and fake-gcs-server: whole
files and files in parts, ingest, WADO-RS retrieval byte-identical under client-side encryption,
and abuse (other size, content type, name, tenant, reuse, expiry) refused by the provider where
its signature binds it and the emulator checks it, otherwise at completion with nothing indexed.

Azurite checks SAS signatures (name, permissions, expiry, protocol); fake-gcs-server checks no
signature at all, so on it every refusal below is the completion's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
import pydicom
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydicom.data import get_testdata_file

from dicom_cloud.archive import Archive
from dicom_cloud.backends import open_store
from dicom_cloud.checksum import crc32c_hex
from dicom_cloud.service.app import archive_settings
from dicom_cloud.service.presign_clouds import azure_block_id
from dicom_cloud.service.settings import ServiceSettings, load_settings
from live_service import LiveService, start_service
from servers import AzureServer, GCSServer, S3Server

CT = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
MR = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
PART = 5 * 1024 * 1024
BIG_UID = "1.2.826.0.1.3680043.8.498.77"
CLI = Path(sys.executable).parent / "dicom-cloud"


def auth(token: str | None) -> dict[str, str]:
    assert token
    return {"Authorization": f"Bearer {token}"}


def make_token(data_dir: Path, tenant: str, scopes: str) -> str:
    """A token for another tenant, made the operator's way: ``dicom-cloud token create``."""
    argv = [str(CLI), "token", "create", "--tenant", tenant, "--scopes", scopes, "--data-dir", str(data_dir)]
    answer = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr
    return answer.stdout.strip()


@dataclass
class Cloud:
    name: str  # "azure", "gcs" or "s3"
    storage: str  # the archive's storage URL

    def refuses(self, abuse: str) -> bool:
        """Whether this server itself refuses ``abuse`` (the signature binds it and the server
        checks it); otherwise the completion must."""
        return abuse in _REFUSED_BY_SERVER[self.name]


#: What each server refuses on its own. Azure's SAS binds name, permissions (create once, no
#: read), expiry and protocol, not size or content type. SigV4 binds all but an overwrite.
#: fake-gcs-server checks no signature (Google would refuse all but an overwrite).
_REFUSED_BY_SERVER = {
    "azure": {"other-name", "overwrite", "read", "expired", "other-tenant"},
    "s3": {"larger", "smaller", "other-type", "other-name", "read", "expired", "other-tenant"},
    "gcs": set(),
}


def _stored_or_refused(cloud: Cloud, abuse: str, answer: httpx.Response) -> None:
    if cloud.refuses(abuse):
        assert answer.status_code == 403, (abuse, answer.status_code, answer.text)
    else:
        assert answer.status_code in (200, 201), (abuse, answer.status_code, answer.text)


@pytest.fixture(params=["azure", "gcs", "s3"])
def cloud(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Cloud:
    if request.param == "s3":
        seaweedfs: S3Server = request.getfixturevalue("seaweedfs")
        bucket_name: str = request.getfixturevalue("s3_bucket")
        env, storage = seaweedfs.env(), f"s3://{bucket_name}/archive"
    elif request.param == "azure":
        azurite: AzureServer = request.getfixturevalue("azurite")
        container: str = request.getfixturevalue("azure_container")
        env, storage = azurite.env(), f"azure://{container}/archive"
    else:
        fake_gcs: GCSServer = request.getfixturevalue("fake_gcs")
        bucket: str = request.getfixturevalue("gcs_bucket")
        env, storage = fake_gcs.env(), f"gs://{bucket}/archive"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Cloud(request.param, storage)


def _settings(tmp_path: Path, cloud: Cloud, **values: Any) -> ServiceSettings:
    key = tmp_path / "master.key"
    key.write_text(base64.b64encode(bytes(range(32))).decode())
    return load_settings(
        {
            "data_dir": tmp_path / "data",
            "storage": cloud.storage,
            "encrypt": True,
            "master_key": f"7:{key}",
            "upload_part_size": PART,
            **values,
        },
        environ={},
    )


@pytest.fixture
def live(tmp_path: Path, cloud: Cloud) -> Iterator[LiveService]:
    service = start_service(_settings(tmp_path, cloud))
    yield service
    service.stop()


async def _sweep(settings: ServiceSettings) -> None:
    """The orphan sweep a service runs on a schedule, now and with no grace period."""
    async with await Archive.open(archive_settings(settings)) as archive:
        await archive.sweep_orphans(older_than=timedelta(0))


def _large_instance() -> bytes:
    """A valid CT instance of about 6.3 MiB: two parts of 5 MiB."""
    ds = pydicom.dcmread(CT)
    ds.Rows, ds.Columns = 1792, 1792
    ds.PixelData = bytes(range(256)) * (1792 * 1792 * 2 // 256)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = BIG_UID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _send(file: dict[str, Any], data: bytes) -> list[str]:
    """What any client does with one file of ``POST /uploads``: one PUT, or its parts (in order
    when told), each with the headers given. Returns the parts' ETags."""
    if file["multipart"] is None:
        answer = httpx.put(file["url"], content=data, headers=file["headers"], timeout=60)
        assert answer.status_code in (200, 201), answer.text
        return []
    etags, start = [], 0
    for part in file["multipart"]["parts"]:
        chunk = data[start : start + part["size"]]
        start += part["size"]
        answer = httpx.put(part["url"], content=chunk, headers=part["headers"], timeout=60)
        assert answer.status_code in (200, 201, 308), answer.text
        etags.append(answer.headers.get("etag", ""))
    return etags


def _retrieve(http: httpx.Client, ds: pydicom.Dataset) -> bytes:
    """One instance by WADO-RS, the bytes of its single part."""
    path = f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    answer = http.get(path, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert answer.status_code == 200, answer.text
    boundary = re.search(r'boundary="?([^";]+)', answer.headers["content-type"])
    assert boundary is not None
    part = answer.content.split(b"--" + boundary.group(1).encode())[1]
    return part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")


async def _objects(storage: str) -> dict[str, bytes]:
    store = open_store(storage)
    try:
        found = {}
        async for info in store.list("archive/", recursive=True):
            found[info.key] = bytes(await store.get(info.key))
        return found
    finally:
        await store.close()


def test_whole_and_parted_uploads_round_trip_encrypted(cloud: Cloud, live: LiveService) -> None:
    big, ct = _large_instance(), CT.read_bytes()
    with httpx.Client(base_url=live.url, headers=auth(live.admin_token), timeout=60) as http:
        declared = {
            "files": [
                {"name": "big.dcm", "size": len(big)},
                {"name": "ct.dcm", "size": len(ct), "crc32c": crc32c_hex(ct)},
            ]
        }
        created = http.post("/uploads", json=declared, headers={"Origin": "https://viewer.example"})
        assert created.status_code == 201, created.text
        session = created.json()
        whole, parted = session["files"][1], session["files"][0]
        assert not whole["url"].startswith(live.url)  # the bytes bypass the service
        # The headers a browser must send come with the URL: no client needs to know the provider.
        multipart = parted["multipart"]
        if cloud.name == "azure":
            assert whole["headers"] == {"x-ms-blob-type": "BlockBlob", "Content-Type": "application/dicom"}
            assert "sp=c&" in whole["url"] and "sr=b" in whole["url"]
            assert all("sp=w&" in p["url"] and "comp=block" in p["url"] for p in multipart["parts"])
            assert not multipart["in_order"] and not multipart["etags_required"]
        elif cloud.name == "gcs":
            assert whole["headers"] == {
                "Content-Type": "application/dicom",
                "x-goog-content-length-range": f"{len(ct)},{len(ct)}",
            }
            signed = re.search(r"X-Goog-SignedHeaders=([^&]+)", whole["url"])
            assert signed and signed.group(1) == "content-type%3Bhost%3Bx-goog-content-length-range"
            assert multipart["in_order"] and not multipart["etags_required"]
            # What Google checks and fake-gcs-server does not: the signature covers the type,
            # the exact length range, the name and the expiry.
            assert google_accepts(whole["url"], "PUT", whole["headers"])
            typed = whole["headers"] | {"Content-Type": "text/plain"}
            assert not google_accepts(whole["url"], "PUT", typed)
            longer = whole["headers"] | {"x-goog-content-length-range": f"0,{len(ct) + 1}"}
            assert not google_accepts(whole["url"], "PUT", longer)
            assert not google_accepts(whole["url"], "PUT", {"Content-Type": "application/dicom"})
            assert not google_accepts(
                whole["url"].replace("/staging/", "/instances/"), "PUT", whole["headers"]
            )
            assert not google_accepts(whole["url"], "GET", whole["headers"])
            later = re.sub(r"X-Goog-Expires=\d+", "X-Goog-Expires=604800", whole["url"])
            assert not google_accepts(later, "PUT", whole["headers"])
            assert multipart["parts"][1]["headers"] == {
                "Content-Range": f"bytes {PART}-{len(big) - 1}/{len(big)}"
            }
        else:
            assert whole["headers"] == {"Content-Type": "application/dicom", "Content-Length": str(len(ct))}
            assert not multipart["in_order"] and multipart["etags_required"]
        assert parted["url"] is None
        assert [p["size"] for p in multipart["parts"]] == [PART, len(big) - PART]
        etags = _send(parted, big)
        _send(whole, ct)
        # What a generic client sends: the ETags where asked for, otherwise nothing.
        body = {"parts": [{"index": 0, "upload_id": multipart["upload_id"], "etags": etags}]}
        done = http.post(
            f"/uploads/{session['id']}/complete", json=body if multipart["etags_required"] else None
        )
        assert done.status_code == 200, done.text
        assert sorted(a["name"] for a in done.json()["accepted"]) == ["big.dcm", "ct.dcm"]
        assert done.json()["rejected"] == []
        # Byte-identical but for the preamble, which the archive zeroes (docs/archive.md).
        assert _retrieve(http, pydicom.dcmread(CT)) == bytes(128) + ct[128:]
        assert _retrieve(http, pydicom.dcmread(io.BytesIO(big))) == bytes(128) + big[128:]
    objects = asyncio.run(_objects(cloud.storage))
    assert not [k for k in objects if "/staging/" in k]
    stored = [v for k, v in objects.items() if "/instances/" in k]
    assert len(stored) == 2
    for data in stored:  # encrypted at rest: neither instance's pixels in clear
        assert big[-4096:] not in data and pydicom.dcmread(CT).PixelData[:256] not in data


def google_accepts(url: str, method: str, headers: dict[str, str]) -> bool:
    """Whether Google would accept this request's V4 signature: the check fake-gcs-server does
    not make, made here with the public half of the key the service signed with. The canonical
    request covers method, path, query (expiry included) and the signed headers."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    signature = bytes.fromhex(query.pop("X-Goog-Signature"))
    sent = {k.lower(): v.strip() for k, v in headers.items()} | {"host": parts.netloc}
    signed = query["X-Goog-SignedHeaders"].split(";")
    if any(name not in sent for name in signed):
        return False
    canonical = "\n".join(
        [
            method,
            parts.path,
            "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in sorted(query.items())),
            "".join(f"{name}:{sent[name]}\n" for name in signed),
            query["X-Goog-SignedHeaders"],
            "UNSIGNED-PAYLOAD",
        ]
    )
    scope = query["X-Goog-Credential"].split("/", 1)[1]
    to_sign = "\n".join(
        ["GOOG4-RSA-SHA256", query["X-Goog-Date"], scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key_file = json.loads(Path(os.environ["GOOGLE_APPLICATION_CREDENTIALS"]).read_text())
    key = serialization.load_pem_private_key(key_file["private_key"].encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    try:
        key.public_key().verify(signature, to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    issued = datetime.strptime(query["X-Goog-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    return datetime.now(UTC) <= issued + timedelta(seconds=int(query["X-Goog-Expires"]))


def _replace_key(url: str, old: str, new: str) -> str:
    assert old in url
    return url.replace(old, new, 1)


def _as_browser(headers: dict[str, str], **changes: str) -> dict[str, str]:
    """The headers a browser sends: as given, but Content-Length always from the body."""
    return {k: v for k, v in headers.items() if k.lower() != "content-length"} | changes


def test_abuse_is_refused_by_the_server_or_at_completion(
    cloud: Cloud, live: LiveService, tmp_path: Path
) -> None:
    ct, mr = CT.read_bytes(), MR.read_bytes()
    other = make_token(tmp_path / "data", "tenant-b", "write")
    with httpx.Client(base_url=live.url, headers=auth(live.admin_token), timeout=60) as http:
        declared = {
            "files": [
                {"name": "larger", "size": len(ct) - 100},
                {"name": "smaller", "size": len(ct) + 100},
                {"name": "other-type", "size": len(ct)},
                {"name": "other-name", "size": len(ct)},
                {"name": "good", "size": len(mr)},
            ]
        }
        session = http.post("/uploads", json=declared).json()
        sid = session["id"]
        larger, smaller, other_type, other_name, good = session["files"]
        put = httpx.put
        _stored_or_refused(
            cloud, "larger", put(larger["url"], content=ct, headers=_as_browser(larger["headers"]))
        )
        _stored_or_refused(
            cloud, "smaller", put(smaller["url"], content=ct, headers=_as_browser(smaller["headers"]))
        )
        typed = _as_browser(other_type["headers"], **{"Content-Type": "text/plain"})
        _stored_or_refused(cloud, "other-type", put(other_type["url"], content=ct, headers=typed))
        # Another name with the same URL (fake-gcs-server stores it where Google would refuse
        # the signature; the declared file then stays missing).
        moved = _replace_key(other_name["url"], f"/staging/{sid}/3", f"/staging/{sid}/9")
        _stored_or_refused(
            cloud, "other-name", put(moved, content=ct, headers=_as_browser(other_name["headers"]))
        )
        assert put(good["url"], content=mr, headers=_as_browser(good["headers"])).status_code in (200, 201)
        # Azure's create-only SAS writes the blob once; the URLs never read.
        again = put(good["url"], content=mr, headers=_as_browser(good["headers"]))
        _stored_or_refused(cloud, "overwrite", again)
        if cloud.name != "gcs":
            assert httpx.get(good["url"]).status_code == 403
        # Another tenant can neither complete the session nor see it.
        assert http.post(f"/uploads/{sid}/complete", headers=auth(other)).status_code == 404
        assert http.get(f"/uploads/{sid}", headers=auth(other)).status_code == 404
        done = http.post(f"/uploads/{sid}/complete")
        assert done.status_code == 200, done.text
        result = done.json()
        assert [a["name"] for a in result["accepted"]] == ["good"]
        reasons = {r["name"]: r["reason"] for r in result["rejected"]}
        checked = {
            "larger": "size differs from the declared size",
            "smaller": "size differs from the declared size",
            "other-type": "stored with another content type than declared",
            "other-name": "not uploaded",
        }
        assert reasons == {k: "not uploaded" if cloud.refuses(k) else v for k, v in checked.items()}
        assert len(http.get("/instances").json()) == 1
        # Reuse after completion: the answer stays the recorded one and nothing more is indexed.
        put(good["url"], content=ct, headers=_as_browser(good["headers"]))
        assert http.post(f"/uploads/{sid}/complete").json() == result
        assert len(http.get("/instances").json()) == 1

        # One tenant's URL turned at another tenant's staging object: refused where the
        # signature names the object; on fake-gcs-server the bytes land, and the other tenant's
        # completion refuses them (declared size and CRC32C differ), indexing nothing.
        theirs = httpx.post(
            f"{live.url}/uploads",
            json={"files": [{"name": "b.dcm", "size": len(ct), "crc32c": crc32c_hex(ct)}]},
            headers=auth(other),
            timeout=60,
        ).json()
        mine = http.post("/uploads", json={"files": [{"name": "a.dcm", "size": len(mr)}]}).json()
        url = mine["files"][0]["url"]
        target = _replace_key(
            url, f"/{_tenant(url)}/staging/{mine['id']}/0", f"/tenant-b/staging/{theirs['id']}/0"
        )
        answer = put(target, content=mr, headers=_as_browser(mine["files"][0]["headers"]))
        _stored_or_refused(cloud, "other-tenant", answer)
        b_done = httpx.post(f"{live.url}/uploads/{theirs['id']}/complete", headers=auth(other), timeout=60)
        assert b_done.json()["accepted"] == [] and b_done.json()["rejected"][0]["reason"]
        assert httpx.get(f"{live.url}/instances", headers=auth(other), timeout=60).json() == []
    objects = asyncio.run(_objects(cloud.storage))
    # Bytes beyond the declared size are deleted, not kept in quarantine.
    quarantined = {
        k.rsplit("/", 1)[1] for k in objects if "/default/quarantine/" in k and not k.endswith(".json")
    }
    assert quarantined == {"1", "2"} - {
        "1" if cloud.refuses("smaller") else "",
        "2" if cloud.refuses("other-type") else "",
    }
    # What the reused URL wrote after completion (S3 refused it: other bytes, other length), and
    # what fake-gcs-server took under another name, belong to a finished session: swept.
    leftovers = [k for k in objects if f"/staging/{sid}/" in k]
    assert bool(leftovers) == (cloud.name != "s3"), leftovers
    asyncio.run(_sweep(_settings(tmp_path, cloud)))
    assert not [k for k in asyncio.run(_objects(cloud.storage)) if f"/staging/{sid}/" in k]


def _tenant(url: str) -> str:
    match = re.search(r"/archive/([^/]+)/staging/", url)
    assert match is not None
    return match.group(1)


def test_expired_url_is_refused(cloud: Cloud, tmp_path: Path) -> None:
    """Azurite and SeaweedFS refuse an expired URL; fake-gcs-server takes the PUT, and the
    completion refuses an object written after its URL expired."""
    live = start_service(_settings(tmp_path, cloud, upload_url_ttl_seconds=1))
    try:
        with httpx.Client(base_url=live.url, headers=auth(live.admin_token), timeout=60) as http:
            ct = CT.read_bytes()
            session = http.post("/uploads", json={"files": [{"name": "ct.dcm", "size": len(ct)}]}).json()
            file = session["files"][0]
            # Past the URL's second; where the completion judges, past the 5 s allowed for skew too.
            time.sleep(2 if cloud.refuses("expired") else 7)
            answer = httpx.put(file["url"], content=ct, headers=_as_browser(file["headers"]))
            _stored_or_refused(cloud, "expired", answer)
            if cloud.name == "gcs":  # Google would have refused it
                assert not google_accepts(file["url"], "PUT", file["headers"])
            done = http.post(f"/uploads/{session['id']}/complete").json()
            assert done["accepted"] == []
            reason = "not uploaded" if cloud.refuses("expired") else "written after its upload URL expired"
            assert done["rejected"][0]["reason"] == reason
            assert http.get("/instances").json() == []
    finally:
        live.stop()


@pytest.mark.parametrize("cloud", ["azure", "gcs"], indirect=True)
def test_parts_beyond_the_declared_size_are_refused_at_completion(cloud: Cloud, live: LiveService) -> None:
    """Files in parts: Azure's block SAS binds the blob, not which block or how many; GCS binds
    the session's length (fake-gcs-server does not check it). A part missing is 400 with the
    session left open (Azure: the service commits the blocks); extra bytes are refused at
    completion, deleted, nothing indexed."""
    big = _large_instance()
    with httpx.Client(base_url=live.url, headers=auth(live.admin_token), timeout=60) as http:
        session = http.post("/uploads", json={"files": [{"name": "big.dcm", "size": len(big)}]}).json()
        first, last = session["files"][0]["multipart"]["parts"]
        extra = b"\0" * 100
        if cloud.name == "azure":
            tail = big[PART:]
            assert (
                httpx.put(last["url"], content=tail, headers=_as_browser(last["headers"])).status_code == 201
            )
            missing = http.post(f"/uploads/{session['id']}/complete")
            assert missing.status_code == 400 and "part 1" in missing.json()["message"]
            assert http.get(f"/uploads/{session['id']}").json()["state"] == "pending"
            assert httpx.put(first["url"], content=big[:PART]).status_code == 201
            third = re.sub(r"blockid=[^&]+", "blockid=" + quote(azure_block_id(3), safe=""), last["url"])
            assert httpx.put(third, content=extra).status_code == 201  # not bound by the SAS
        else:
            assert httpx.put(first["url"], content=big[:PART], headers=first["headers"]).status_code == 308
            total = len(big) + len(extra)
            beyond = {"Content-Range": f"bytes {PART}-{total - 1}/{total}"}
            assert httpx.put(last["url"], content=big[PART:] + extra, headers=beyond).status_code == 200
        done = http.post(f"/uploads/{session['id']}/complete")
        assert done.status_code == 200, done.text
        assert done.json()["accepted"] == []
        assert done.json()["rejected"] == [
            {
                "index": 0,
                "name": "big.dcm",
                "reason": "size differs from the declared size",
                "sop_instance_uid": None,
                "study_instance_uid": None,
                "series_instance_uid": None,
                "created": None,
                "warnings": [],
            }
        ]
        assert http.get("/instances").json() == []
    objects = asyncio.run(_objects(cloud.storage))
    assert not [k for k in objects if "/staging/" in k or "/quarantine/" in k]  # deleted, not kept


@pytest.mark.parametrize("cloud", ["gcs"], indirect=True)
def test_credentials_that_cannot_sign_fall_back_to_the_service(
    cloud: Cloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No key to sign with (against the emulator: no GOOGLE_APPLICATION_CREDENTIALS): the URLs
    are the service's own signed route, and the upload works as on local storage."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    live = start_service(_settings(tmp_path, cloud))
    try:
        with httpx.Client(base_url=live.url, headers=auth(live.admin_token), timeout=60) as http:
            ct = CT.read_bytes()
            session = http.post("/uploads", json={"files": [{"name": "ct.dcm", "size": len(ct)}]}).json()
            file = session["files"][0]
            assert file["url"].startswith(f"{live.url}/uploads/")
            assert httpx.put(file["url"], content=ct, headers=file["headers"]).status_code == 204
            done = http.post(f"/uploads/{session['id']}/complete").json()
            assert [a["name"] for a in done["accepted"]] == ["ct.dcm"], done["rejected"]
    finally:
        live.stop()


# -- a browser page, as an upload page on each cloud would be ----------------------------------------


#: A generic client in the page: it knows nothing of the provider, only what ``POST /uploads``
#: answers (URLs, headers, parts, in_order, etags_required).
BROWSER_CLIENT = """
async ({service, token, files}) => {
  const bytes = files.map(f => Uint8Array.from(atob(f.data), c => c.charCodeAt(0)));
  const auth = {"Authorization": "Bearer " + token, "Content-Type": "application/json"};
  const declared = files.map((f, i) => ({name: f.name, size: bytes[i].length}));
  const created = await fetch(service + "/uploads", {method: "POST", headers: auth,
                                                     body: JSON.stringify({files: declared})});
  if (created.status !== 201) return {error: "POST /uploads: " + created.status};
  const session = await created.json();
  const parts = [];
  for (const [i, file] of session.files.entries()) {
    if (file.multipart === null) {
      const answer = await fetch(file.url, {method: "PUT", headers: file.headers, body: bytes[i]});
      if (!answer.ok) return {error: "PUT: " + answer.status};
      continue;
    }
    const send = async (part) => {
      const start = (part.number - 1) * file.multipart.part_size;
      const body = bytes[i].slice(start, start + part.size);
      const answer = await fetch(part.url, {method: "PUT", headers: part.headers, body});
      if (!answer.ok && answer.status !== 308) throw new Error("part " + part.number + ": " + answer.status);
      return answer.headers.get("ETag");  // null where the provider answers none
    };
    let etags = [];
    if (file.multipart.in_order) {
      for (const part of file.multipart.parts) etags.push(await send(part));
    } else {
      etags = await Promise.all(file.multipart.parts.map(send));
    }
    parts.push({index: i, upload_id: file.multipart.upload_id, etags});
  }
  const done = await fetch(service + "/uploads/" + session.id + "/complete",
                           {method: "POST", headers: auth, body: JSON.stringify({parts})});
  return {status: done.status, result: await done.json(), headers: session.files.map(f => f.headers)};
}
"""


def azure_cors(origin: str) -> bytes:
    """The Blob service CORS rule of docs/service.md, for ``origin``."""
    return f"""<?xml version="1.0" encoding="utf-8"?><StorageServiceProperties><Cors><CorsRule>
<AllowedOrigins>{origin}</AllowedOrigins><AllowedMethods>PUT,OPTIONS</AllowedMethods>
<AllowedHeaders>content-type,x-ms-blob-type,x-ms-*</AllowedHeaders>
<ExposedHeaders>etag,x-ms-*</ExposedHeaders><MaxAgeInSeconds>600</MaxAgeInSeconds>
</CorsRule></Cors></StorageServiceProperties>""".encode()


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>upload</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@contextmanager
def page_server() -> Iterator[str]:
    """An empty page on loopback under another origin than the service and the bucket
    (``localhost`` where they are ``127.0.0.1``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("cloud", ["azure", "gcs"], indirect=True)
def test_a_browser_page_uploads_knowing_no_provider(
    cloud: Cloud, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Chromium on a page of another origin: CORS on the bucket (Azure: the rule of
    docs/service.md; fake-gcs-server allows every origin) and on the service, the headers
    ``POST /uploads`` gives, a whole file and one in parts, completed and indexed."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: run scripts/install-test-servers (apt-get install chromium)")

    files = [
        {"name": "big.dcm", "data": base64.b64encode(_large_instance()).decode()},
        {"name": "ct.dcm", "data": base64.b64encode(CT.read_bytes()).decode()},
    ]
    with page_server() as origin:
        if cloud.name == "azure":
            azurite: AzureServer = request.getfixturevalue("azurite")
            status, body = azurite.azure_request(
                "PUT",
                "/?restype=service&comp=properties",
                {"Content-Type": "application/xml"},
                azure_cors(origin),
            )
            assert status == 202, body
        live = start_service(_settings(tmp_path, cloud, cors_origins=[origin]))
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                try:
                    page = browser.new_page()
                    page.goto(f"{origin}/")
                    outcome = page.evaluate(
                        BROWSER_CLIENT, {"service": live.url, "token": live.admin_token, "files": files}
                    )
                finally:
                    browser.close()
        finally:
            live.stop()
    assert outcome.get("status") == 200, outcome
    assert sorted(a["name"] for a in outcome["result"]["accepted"]) == ["big.dcm", "ct.dcm"]
    if cloud.name == "azure":
        assert outcome["headers"][1]["x-ms-blob-type"] == "BlockBlob"
