"""SigV4 against a server that checks signatures: SeaweedFS accepts what we sign, refuses tampering."""

from __future__ import annotations

import hashlib
import re

import requests

from dicom_cloud.backends.sigv4 import S3Bucket, Signer, SigningCredentials, object_url, sha256_hex
from servers import S3Server


def _signer(server: S3Server) -> Signer:
    return Signer(SigningCredentials(server.access_key, server.secret_key), server.region)


def _create_upload(server: S3Server, signer: Signer, url: str) -> str:
    signed = signer.sign("POST", url + "?uploads")
    response = requests.post(url + "?uploads", headers=signed.headers, timeout=30)
    assert response.status_code == 200, response.text
    match = re.search(r"<UploadId>([^<]+)</UploadId>", response.text)
    assert match
    return match.group(1)


def test_header_signed_put_and_get(seaweedfs: S3Server, s3_bucket: str) -> None:
    signer = _signer(seaweedfs)
    url = object_url(seaweedfs.endpoint, s3_bucket, "dir/a b+ü.txt", path_style=True)
    body = b"hello"
    signed = signer.sign("PUT", url, headers={"content-type": "text/plain"}, payload_hash=sha256_hex(body))
    assert requests.put(url, data=body, headers=signed.headers, timeout=30).status_code == 200
    got = requests.get(url, headers=signer.sign("GET", url).headers, timeout=30)
    assert got.status_code == 200 and got.content == body
    wrong = Signer(SigningCredentials(seaweedfs.access_key, "not-the-secret"), seaweedfs.region)
    assert requests.get(url, headers=wrong.sign("GET", url).headers, timeout=30).status_code == 403


def test_presigned_upload_part_accepted_and_tampering_refused(seaweedfs: S3Server, s3_bucket: str) -> None:
    signer = _signer(seaweedfs)
    url = object_url(seaweedfs.endpoint, s3_bucket, "parts/object one.bin", path_style=True)
    upload_id = _create_upload(seaweedfs, signer, url)
    part = b"x" * 1024
    presigned = signer.presign("PUT", url, expires_in=600, params={"uploadId": upload_id, "partNumber": "1"})
    response = requests.put(presigned, data=part, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["ETag"].strip('"') == hashlib.md5(part).hexdigest()  # noqa: S324

    # Another part number than the one signed: refused.
    tampered = presigned.replace("partNumber=1", "partNumber=2")
    assert requests.put(tampered, data=part, timeout=30).status_code == 403
    # A flipped signature: refused.
    signature = presigned.rsplit("X-Amz-Signature=", 1)[1]
    flipped = presigned[: -len(signature)] + ("0" if signature[0] != "0" else "1") + signature[1:]
    assert requests.put(flipped, data=part, timeout=30).status_code == 403


def test_presigned_url_with_signed_content_type(seaweedfs: S3Server, s3_bucket: str) -> None:
    signer = _signer(seaweedfs)
    url = object_url(seaweedfs.endpoint, s3_bucket, "typed.dcm", path_style=True)
    presigned = signer.presign(
        "PUT", url, expires_in=600, signed_headers={"content-type": "application/dicom"}
    )
    ok = requests.put(presigned, data=b"d", headers={"content-type": "application/dicom"}, timeout=30)
    assert ok.status_code == 200, ok.text
    bad = requests.put(presigned, data=b"d", headers={"content-type": "text/plain"}, timeout=30)
    assert bad.status_code == 403


def test_multipart_upload_through_presigned_part_urls(seaweedfs: S3Server, s3_bucket: str) -> None:
    """Parts sent by someone holding only presigned URLs; the upload completed with our keys."""
    import asyncio
    import base64

    from dicom_cloud.backends.s3_multipart import S3ResumableUploads
    from dicom_cloud.store import PutOptions

    keys = SigningCredentials(seaweedfs.access_key, seaweedfs.secret_key)
    uploads = S3ResumableUploads(S3Bucket(s3_bucket, seaweedfs.endpoint, seaweedfs.region, keys, True))
    parts = [b"a" * (5 * 1024 * 1024), b"tail"]

    async def main() -> None:
        state = await uploads.begin("presigned/x y.bin", sum(map(len, parts)), len(parts[0]), PutOptions())
        for number, data in enumerate(parts, start=1):
            md5 = base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324
            url = uploads.presign_part(state, number, expires_in=300, content_md5=md5)
            wrong = requests.put(url, data=data[:-1] + b"!", headers={"content-md5": md5}, timeout=30)
            assert wrong.status_code in (400, 403)  # signed MD5: other bytes are refused
            response = requests.put(url, data=data, headers={"content-md5": md5}, timeout=30)
            assert response.status_code == 200, response.text
        held = await uploads.uploaded_parts(state)
        info = await uploads.complete(state, [held[1], held[2]])
        assert info.size == sum(map(len, parts))
        await uploads.close()

    asyncio.run(main())
