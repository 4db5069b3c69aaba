"""S3 multipart uploads that outlive the process: resumed by upload id, listed and aborted.

obstore's multipart writer keeps its upload id to itself; these are the same REST operations
(CreateMultipartUpload, UploadPart, ListParts, CompleteMultipartUpload, AbortMultipartUpload,
ListMultipartUploads), signed with :mod:`.sigv4`. Parts carry ``Content-MD5``, which the server
checks; ListParts reports each part's ETag, the MD5 of its bytes, which a resumed run compares
with the local bytes. Credentials must be keys (environment or profile): identities only
obstore can resolve (instance roles, web identity) make the store not resumable.
"""

from __future__ import annotations

import base64
import hashlib
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode
from xml.sax.saxutils import escape

import requests

from ..errors import (
    AuthenticationError,
    BucketNotFoundError,
    DicomCloudError,
    IntegrityError,
    NotFoundError,
)
from ..resumable import IncompleteUpload, PartRecord
from ..store import ObjectInfo, PutOptions
from .rest import Request, RestClient, info_from_headers, status_error
from .sigv4 import UNSIGNED_PAYLOAD, CredentialSource, Signer, bucket_url, object_url, sha256_hex

_AUTH_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}
)


class S3ResumableUploads:
    """Resumable multipart uploads into one S3 bucket."""

    min_part_size = 5 * 1024 * 1024
    max_parts = 10_000
    sequential = False

    def __init__(
        self,
        *,
        bucket: str,
        endpoint: str,
        region: str,
        credentials: CredentialSource,
        path_style: bool,
        create_headers: dict[str, str] | None = None,
        max_retries: int = 4,
        timeout: tuple[float, float] = (10.0, 300.0),
    ) -> None:
        self.bucket = bucket
        self._endpoint = endpoint.rstrip("/")
        self._path_style = path_style
        self._signer = Signer(credentials, region, "s3")
        #: Server-side encryption headers for CreateMultipartUpload (SSE-S3, SSE-KMS).
        self._create_headers = dict(create_headers or {})
        self._http = RestClient(what=f"S3 at {self._endpoint}", max_retries=max_retries, timeout=timeout)

    # -- requests ----------------------------------------------------------------------------

    def _object(self, key: str, query: dict[str, str] | None = None) -> str:
        url = object_url(self._endpoint, self.bucket, key, path_style=self._path_style)
        return f"{url}?{_query(query)}" if query else url

    def _signed(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        body: bytes | memoryview = b"",
        payload_hash: str | None = None,
    ) -> Request:
        digest = payload_hash or sha256_hex(body)
        signed = self._signer.sign(method, url, headers=dict(headers or {}), payload_hash=digest)
        return Request(method, url, signed.headers, body)

    async def _call(
        self,
        method: str,
        url: str,
        what: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | memoryview = b"",
        payload_hash: str | None = None,
    ) -> requests.Response:
        response = await self._http.send(lambda: self._signed(method, url, headers, body, payload_hash))
        if response.status_code >= 300:
            raise self._error(response, what)
        return response

    def _error(self, response: requests.Response, what: str) -> DicomCloudError:
        code, message = _error_code(response)
        detail = f": {code} {message}".rstrip() if code else f": HTTP {response.status_code}"
        if code in _AUTH_CODES or response.status_code == 401:
            return AuthenticationError(
                f"S3 refused the credentials for {what}{detail}",
                hint="check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile (docs/credentials.md)",
            )
        if code == "NoSuchBucket":
            return BucketNotFoundError(f"bucket s3://{self.bucket} does not exist")
        if code == "NoSuchUpload" or (response.status_code == 404 and code != "NoSuchKey"):
            return NotFoundError(f"{what}: the multipart upload no longer exists")
        if code in ("InvalidPart", "InvalidDigest", "BadDigest", "InvalidPartOrder"):
            return IntegrityError(f"{what}{detail}")
        return status_error("S3", response.status_code, what, detail)

    def _url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # -- ResumableUploads ----------------------------------------------------------------------

    async def begin(self, key: str, size: int, part_size: int, options: PutOptions) -> dict[str, Any]:
        headers = dict(self._create_headers)
        headers["content-type"] = options.content_type or "application/octet-stream"
        for name, value in options.metadata.items():
            headers[f"x-amz-meta-{name}"] = value
        if options.tags:
            headers["x-amz-tagging"] = urlencode(dict(options.tags), quote_via=quote)
        response = await self._call(
            "POST", self._object(key, {"uploads": ""}), self._url(key), headers=headers
        )
        upload_id = _text(_xml(response), "UploadId")
        if not upload_id:
            raise DicomCloudError(f"S3 started no multipart upload for {self._url(key)}")
        return {"provider": "s3", "bucket": self.bucket, "key": key, "upload_id": upload_id, "size": size}

    async def uploaded_parts(self, state: dict[str, Any]) -> dict[int, PartRecord]:
        key, upload_id = state["key"], state["upload_id"]
        parts: dict[int, PartRecord] = {}
        marker = "0"
        while True:
            query = {"uploadId": upload_id, "max-parts": "1000", "part-number-marker": marker}
            response = await self._call("GET", self._object(key, query), self._url(key))
            root = _xml(response)
            for part in _children(root, "Part"):
                number = int(_text(part, "PartNumber"))
                etag = _text(part, "ETag").strip('"')
                md5 = etag if len(etag) == 32 and "-" not in etag else None
                parts[number] = PartRecord(number, int(_text(part, "Size")), etag=etag, md5=md5)
            if _text(root, "IsTruncated").lower() != "true":
                return parts
            marker = _text(root, "NextPartNumberMarker")

    async def upload_part(self, state: dict[str, Any], number: int, data: bytes | memoryview) -> PartRecord:
        key = state["key"]
        digest = hashlib.md5(data, usedforsecurity=False).digest()
        # The body is not hashed into the signature (UNSIGNED-PAYLOAD): Content-MD5, which the
        # server checks before it stores the part, is the integrity check, at a third of the cost.
        headers = {"content-md5": base64.b64encode(digest).decode(), "content-length": str(len(data))}
        url = self._object(key, {"partNumber": str(number), "uploadId": state["upload_id"]})
        response = await self._call(
            "PUT", url, f"part {number} of {self._url(key)}", headers=headers, body=data,
            payload_hash=UNSIGNED_PAYLOAD,
        )  # fmt: skip
        etag = response.headers.get("ETag", "").strip('"')
        if etag and len(etag) == 32 and etag != digest.hex():
            raise IntegrityError(f"part {number} of {self._url(key)}: the server stored other bytes")
        return PartRecord(number, len(data), etag=etag or digest.hex(), md5=digest.hex())

    def presign_part(
        self, state: dict[str, Any], number: int, *, expires_in: int = 3600, content_md5: str | None = None
    ) -> str:
        """A URL that lets its holder PUT part ``number`` of this upload until it expires.

        With ``content_md5`` (base64, as in the header) the URL accepts only those bytes. Such
        URLs are capabilities: hand them out, never keep them in the session state.
        """
        headers = {"content-md5": content_md5} if content_md5 else None
        return self._signer.presign(
            "PUT",
            self._object(state["key"]),
            expires_in=expires_in,
            params={"partNumber": str(number), "uploadId": state["upload_id"]},
            signed_headers=headers,
        )

    async def complete(self, state: dict[str, Any], parts: list[PartRecord]) -> ObjectInfo:
        key = state["key"]
        body = "".join(
            f'<Part><PartNumber>{p.number}</PartNumber><ETag>"{escape(p.etag or "")}"</ETag></Part>'
            for p in sorted(parts, key=lambda p: p.number)
        )
        payload = f"<CompleteMultipartUpload>{body}</CompleteMultipartUpload>".encode()
        response = await self._call(
            "POST", self._object(key, {"uploadId": state["upload_id"]}), self._url(key), body=payload
        )
        # S3 may answer 200 and report the failure in the body (it streams while assembling).
        root = _xml(response)
        if _local(root.tag) == "Error":
            code = _text(root, "Code")
            raise IntegrityError(f"{self._url(key)}: completing the upload failed: {code}")
        return await self.stat(key)

    async def abort(self, state: dict[str, Any]) -> None:
        await self.abort_upload(state["key"], state["upload_id"])

    async def abort_incomplete(self, upload: IncompleteUpload) -> None:
        await self.abort_upload(upload.key, upload.upload_id)

    async def abort_upload(self, key: str, upload_id: str) -> None:
        url = self._object(key, {"uploadId": upload_id})
        response = await self._http.send(lambda: self._signed("DELETE", url))
        if response.status_code >= 300 and response.status_code != 404:
            raise self._error(response, self._url(key))

    async def incomplete(self, prefix: str = "") -> AsyncIterator[IncompleteUpload]:
        key_marker = upload_marker = ""
        while True:
            query = {"uploads": "", "prefix": prefix, "max-uploads": "1000"}
            if key_marker:
                query["key-marker"] = key_marker
                query["upload-id-marker"] = upload_marker
            url = bucket_url(self._endpoint, self.bucket, path_style=self._path_style) + "?" + _query(query)
            root = _xml(await self._call("GET", url, f"s3://{self.bucket}/{prefix}"))
            for upload in _children(root, "Upload"):
                initiated = _text(upload, "Initiated")
                yield IncompleteUpload(
                    key=_text(upload, "Key"),
                    upload_id=_text(upload, "UploadId"),
                    initiated=datetime.fromisoformat(initiated.replace("Z", "+00:00")) if initiated else None,
                )
            if _text(root, "IsTruncated").lower() != "true":
                return
            key_marker = _text(root, "NextKeyMarker")
            upload_marker = _text(root, "NextUploadIdMarker")
            if not key_marker:
                return

    async def stat(self, key: str) -> ObjectInfo:
        response = await self._call("HEAD", self._object(key), self._url(key))
        return info_from_headers(key, response.headers, "x-amz-meta-")

    async def close(self) -> None:
        self._http.close()


def _query(params: dict[str, str]) -> str:
    # Encoded the way SigV4 canonicalises (RFC 3986, '/' encoded), so the URL is signed as sent.
    return "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" if v else quote(k) for k, v in params.items()
    )


def _xml(response: requests.Response) -> ET.Element:
    if not response.content:
        return ET.Element("Empty")
    # The body comes from the configured S3 endpoint; ElementTree expands no external entities.
    return ET.fromstring(response.content)  # noqa: S314


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(root: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in root if _local(child.tag) == name]


def _text(element: ET.Element, name: str) -> str:
    for child in element:
        if _local(child.tag) == name:
            return child.text or ""
    return ""


def _error_code(response: requests.Response) -> tuple[str, str]:
    try:
        root = _xml(response)
    except ET.ParseError:
        return "", ""
    return _text(root, "Code"), " ".join(_text(root, "Message").split())[:200]
