"""Presigned PUT URLs for direct uploads, scoped to one key, one content type and one exact size.

On S3 with static keys (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile) the URL is signed
here with SigV4 (``backends/sigv4.py``) with ``content-type`` and ``content-length`` among the signed
headers: S3 refuses (403) a PUT that sends another content type or another number of bytes, so the
declared size is enforced at upload time, not only at completion. S3 with role credentials the
library finds itself falls back to the store's own presigning, which signs the host only; the
archive then enforces size and checksum when the session is completed. (Azure and GCS:
``presign_clouds.py``.)
"""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from xml.sax.saxutils import escape

from ..backends.sigv4 import Signer, aws_endpoint, current_credentials, object_url, sha256_hex
from ..credentials import aws_settings
from ..errors import NetworkError, UsageError
from ..url import parse_url

#: S3's smallest part (all parts but the last) and largest part count.
MIN_PART_SIZE = 5 * 1024**2
MAX_PARTS = 10_000
#: Seconds a CreateMultipartUpload / CompleteMultipartUpload request may take.
_REQUEST_TIMEOUT = 60
_UPLOAD_ID = re.compile(r"<UploadId>([^<]+)</UploadId>")


@dataclass(frozen=True)
class ScopedPut:
    url: str
    #: Headers the PUT must carry exactly as given (they are part of the signature).
    headers: dict[str, str]


class S3PutSigner:
    """Signs PUTs into one S3 bucket with the service's own credentials (keys, or a profile's
    temporary keys kept current)."""

    def __init__(self, signer: Signer, endpoint: str, bucket: str, path_style: bool) -> None:
        self._signer = signer
        self._endpoint = endpoint
        self._bucket = bucket
        self._path_style = path_style

    @classmethod
    def for_storage(cls, storage_url: str) -> S3PutSigner | None:
        """A signer for ``s3://`` storage when we hold keys; None otherwise (use the store's signing)."""
        location = parse_url(storage_url)
        if location.scheme != "s3":
            return None
        aws = aws_settings()
        credentials = current_credentials(aws)
        if credentials is None:
            return None
        endpoint = aws.endpoint or aws_endpoint(aws.region)
        # Custom endpoints (MinIO, SeaweedFS, Ceph) use path-style addressing, as the store does.
        return cls(Signer(credentials, aws.region), endpoint, location.bucket, path_style=bool(aws.endpoint))

    def _url(self, key: str) -> str:
        return object_url(self._endpoint, self._bucket, key, path_style=self._path_style)

    def put(self, key: str, content_type: str, size: int, ttl: timedelta) -> ScopedPut:
        """A PUT of exactly ``size`` bytes of ``content_type`` to ``key`` (bucket-relative)."""
        headers = {"Content-Type": content_type, "Content-Length": str(size)}
        url = self._signer.presign(
            "PUT",
            self._url(key),
            expires_in=int(ttl.total_seconds()),
            signed_headers={name.lower(): value for name, value in headers.items()},
        )
        return ScopedPut(url, headers)

    # -- multipart uploads: the service opens and closes them, the client PUTs the parts ----------

    async def create_multipart(self, key: str, content_type: str) -> str:
        """Start a multipart upload of ``key``; returns its upload id."""
        status, body = await self._request(
            "POST", self._url(key) + "?uploads=", b"", {"content-type": content_type}
        )
        match = _UPLOAD_ID.search(body.decode("utf-8", "replace"))
        if status != 200 or not match:
            raise NetworkError(f"the bucket refused to start a multipart upload (HTTP {status})")
        return match.group(1)

    def part_urls(
        self, key: str, upload_id: str, size: int, part_size: int, ttl: timedelta
    ) -> list[ScopedPut]:
        """One presigned UploadPart per part, each bound to its exact length."""
        urls = []
        for number, start in enumerate(range(0, size, part_size), start=1):
            length = min(part_size, size - start)
            url = self._signer.presign(
                "PUT",
                self._url(key),
                expires_in=int(ttl.total_seconds()),
                params={"partNumber": str(number), "uploadId": upload_id},
                signed_headers={"content-length": str(length)},
            )
            urls.append(ScopedPut(url, {"Content-Length": str(length)}))
        return urls

    async def complete_multipart(self, key: str, upload_id: str, etags: list[str]) -> None:
        """Join the parts (ETags in part order). A wrong upload id or ETag list is a UsageError."""
        parts = "".join(
            f"<Part><PartNumber>{number}</PartNumber><ETag>{escape(etag)}</ETag></Part>"
            for number, etag in enumerate(etags, start=1)
        )
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        url = self._url(key) + "?" + urllib.parse.urlencode({"uploadId": upload_id})
        status, answer = await self._request("POST", url, body, {"content-type": "application/xml"})
        # S3 may answer 200 with an <Error> body when the join fails late.
        if status != 200 or b"<Error>" in answer:
            raise UsageError(
                f"the bucket refused to join the uploaded parts (HTTP {status})",
                hint="send the upload_id given at creation and every part's ETag, in part order",
            )

    async def _request(
        self, method: str, url: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        signed = self._signer.sign(method, url, headers=headers, payload_hash=sha256_hex(body))

        def send() -> tuple[int, bytes]:
            request = urllib.request.Request(url, data=body, method=method, headers=signed.headers)  # noqa: S310
            try:
                with urllib.request.urlopen(request, timeout=_REQUEST_TIMEOUT) as answer:  # noqa: S310
                    return answer.status, answer.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()
            except OSError as exc:
                raise NetworkError(f"the bucket could not be reached: {type(exc).__name__}") from None

        return await asyncio.to_thread(send)
