"""One signed S3 REST client: SigV4 (``sigv4.py``) over ``rest.py`` (requests in worker threads,
the request layer of the retry policy), for the S3 operations obstore does not offer.

Used by resumable uploads (``s3_multipart.py``: multipart uploads by upload id, ListParts,
ListMultipartUploads, abort) and by the service's direct uploads (``service/presign.py``: it opens
and joins multipart uploads whose parts clients PUT with presigned URLs). Nothing here logs a URL
or a header: they carry signatures.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from urllib.parse import quote
from xml.sax.saxutils import escape

import requests

from ..errors import (
    AuthenticationError,
    BucketNotFoundError,
    DicomCloudError,
    IntegrityError,
    NotFoundError,
)
from .http_errors import s3_error, s3_error_code
from .rest import Request, RestClient
from .sigv4 import S3Bucket, object_url, sha256_hex


class S3Client:
    """Signed requests to one S3 bucket."""

    def __init__(
        self, bucket: S3Bucket, *, max_retries: int = 4, timeout: tuple[float, float] = (10.0, 300.0)
    ) -> None:
        self.bucket = bucket.name
        self.endpoint = bucket.endpoint.rstrip("/")
        self.path_style = bucket.path_style
        self.signer = bucket.signer()
        self._http = RestClient(what=f"S3 at {self.endpoint}", max_retries=max_retries, timeout=timeout)

    # -- requests ----------------------------------------------------------------------------

    def object_url(self, key: str, query: dict[str, str] | None = None) -> str:
        url = object_url(self.endpoint, self.bucket, key, path_style=self.path_style)
        return f"{url}?{encode_query(query)}" if query else url

    def signed(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        body: bytes | memoryview = b"",
        payload_hash: str | None = None,
    ) -> Request:
        digest = payload_hash or sha256_hex(body)
        signed = self.signer.sign(method, url, headers=dict(headers or {}), payload_hash=digest)
        return Request(method, url, signed.headers, body)

    async def send(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | memoryview = b"",
        payload_hash: str | None = None,
    ) -> requests.Response:
        """The answer, whatever its status (signed afresh for every retry)."""
        return await self._http.send(lambda: self.signed(method, url, headers, body, payload_hash))

    async def call(
        self,
        method: str,
        url: str,
        what: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | memoryview = b"",
        payload_hash: str | None = None,
    ) -> requests.Response:
        """The answer; an error of the tree (errors.py) for any status of 300 and above."""
        response = await self.send(method, url, headers=headers, body=body, payload_hash=payload_hash)
        if response.status_code >= 300:
            raise self.error(response, what)
        return response

    def error(self, response: requests.Response, what: str) -> DicomCloudError:
        general = s3_error(response.status_code, response.content, what, self.bucket)
        if isinstance(general, AuthenticationError | BucketNotFoundError):
            return general
        code, message = s3_error_code(response.content)
        if code == "NoSuchUpload" or (response.status_code == 404 and code != "NoSuchKey"):
            return NotFoundError(f"{what}: the multipart upload no longer exists")
        if code in ("InvalidPart", "InvalidDigest", "BadDigest", "InvalidPartOrder"):
            return IntegrityError(f"{what}: {code} {message}".rstrip())
        return general

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # -- multipart uploads: opened and joined here, whoever sends the parts -------------------

    async def create_multipart(self, key: str, headers: dict[str, str]) -> str:
        """CreateMultipartUpload; returns the upload id."""
        response = await self.call(
            "POST", self.object_url(key, {"uploads": ""}), self.url(key), headers=headers
        )
        upload_id = text(xml(response), "UploadId")
        if not upload_id:
            raise DicomCloudError(f"S3 started no multipart upload for {self.url(key)}")
        return upload_id

    async def complete_multipart(self, key: str, upload_id: str, etags: list[str]) -> None:
        """CompleteMultipartUpload with the parts' ETags in part order (quoted or not)."""
        body = "".join(
            f'<Part><PartNumber>{number}</PartNumber><ETag>"{escape(etag.strip(chr(34)))}"</ETag></Part>'
            for number, etag in enumerate(etags, start=1)
        )
        payload = f"<CompleteMultipartUpload>{body}</CompleteMultipartUpload>".encode()
        response = await self.call(
            "POST", self.object_url(key, {"uploadId": upload_id}), self.url(key), body=payload
        )
        # S3 may answer 200 and report the failure in the body (it streams while assembling).
        root = xml(response)
        if local_name(root.tag) == "Error":
            raise IntegrityError(f"{self.url(key)}: completing the upload failed: {text(root, 'Code')}")

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """AbortMultipartUpload; an upload already gone is not an error."""
        response = await self.send("DELETE", self.object_url(key, {"uploadId": upload_id}))
        if response.status_code >= 300 and response.status_code != 404:
            raise self.error(response, self.url(key))

    def close(self) -> None:
        self._http.close()


def encode_query(params: dict[str, str]) -> str:
    # Encoded the way SigV4 canonicalises (RFC 3986, '/' encoded), so the URL is signed as sent.
    return "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" if v else quote(k) for k, v in params.items()
    )


def xml(response: requests.Response) -> ET.Element:
    if not response.content:
        return ET.Element("Empty")
    # The body comes from the configured S3 endpoint; ElementTree expands no external entities.
    return ET.fromstring(response.content)  # noqa: S314


def local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def children(root: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in root if local_name(child.tag) == name]


def text(element: ET.Element, name: str) -> str:
    for child in element:
        if local_name(child.tag) == name:
            return child.text or ""
    return ""
