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
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

from ..errors import BucketNotFoundError, IntegrityError, NetworkError, NotFoundError
from ..resumable import IncompleteUpload, PartRecord
from ..store import ObjectInfo, PutOptions
from .rest import info_from_headers
from .s3_client import S3Client, children, encode_query, text, xml
from .sigv4 import UNSIGNED_PAYLOAD, S3Bucket, bucket_url


class S3ResumableUploads:
    """Resumable multipart uploads into one S3 bucket, over the signed S3 client (s3_client.py)."""

    min_part_size = 5 * 1024 * 1024
    max_parts = 10_000
    sequential = False

    def __init__(
        self,
        bucket: S3Bucket,
        *,
        create_headers: dict[str, str] | None = None,
        max_retries: int = 4,
        timeout: tuple[float, float] = (10.0, 300.0),
    ) -> None:
        self.bucket = bucket.name
        self._s3 = S3Client(bucket, max_retries=max_retries, timeout=timeout)
        #: Server-side encryption headers for CreateMultipartUpload (SSE-S3, SSE-KMS).
        self._create_headers = dict(create_headers or {})

    def _url(self, key: str) -> str:
        return self._s3.url(key)

    # -- ResumableUploads ----------------------------------------------------------------------

    async def begin(self, key: str, size: int, part_size: int, options: PutOptions) -> dict[str, Any]:
        headers = dict(self._create_headers)
        headers["content-type"] = options.content_type or "application/octet-stream"
        for name, value in options.metadata.items():
            headers[f"x-amz-meta-{name}"] = value
        if options.tags:
            headers["x-amz-tagging"] = urlencode(dict(options.tags), quote_via=quote)
        upload_id = await self._s3.create_multipart(key, headers)
        return {"provider": "s3", "bucket": self.bucket, "key": key, "upload_id": upload_id, "size": size}

    async def uploaded_parts(self, state: dict[str, Any]) -> dict[int, PartRecord]:
        key, upload_id = state["key"], state["upload_id"]
        parts: dict[int, PartRecord] = {}
        marker = "0"
        while True:
            query = {"uploadId": upload_id, "max-parts": "1000", "part-number-marker": marker}
            response = await self._s3.call("GET", self._s3.object_url(key, query), self._url(key))
            root = xml(response)
            for part in children(root, "Part"):
                number = int(text(part, "PartNumber"))
                etag = text(part, "ETag").strip('"')
                md5 = etag if len(etag) == 32 and "-" not in etag else None
                parts[number] = PartRecord(number, int(text(part, "Size")), etag=etag, md5=md5)
            if text(root, "IsTruncated").lower() != "true":
                return parts
            marker = text(root, "NextPartNumberMarker")

    async def upload_part(self, state: dict[str, Any], number: int, data: bytes | memoryview) -> PartRecord:
        key = state["key"]
        digest = hashlib.md5(data, usedforsecurity=False).digest()
        # The body is not hashed into the signature (UNSIGNED-PAYLOAD): Content-MD5, which the
        # server checks before it stores the part, is the integrity check, at a third of the cost.
        headers = {"content-md5": base64.b64encode(digest).decode(), "content-length": str(len(data))}
        url = self._s3.object_url(key, {"partNumber": str(number), "uploadId": state["upload_id"]})
        response = await self._s3.call(
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
        return self._s3.signer.presign(
            "PUT",
            self._s3.object_url(state["key"]),
            expires_in=expires_in,
            params={"partNumber": str(number), "uploadId": state["upload_id"]},
            signed_headers=headers,
        )

    async def complete(self, state: dict[str, Any], parts: list[PartRecord]) -> ObjectInfo:
        key = state["key"]
        etags = [p.etag or "" for p in sorted(parts, key=lambda p: p.number)]
        try:
            await self._s3.complete_multipart(key, state["upload_id"], etags)
        except BucketNotFoundError:
            raise
        except NotFoundError:
            # A commit sent again after its answer was lost: the first one may have made the
            # object, and a server may forget the finished upload (NoSuchUpload). S3 derives a
            # multipart object's ETag from its parts' ETags: that says whether the object is ours.
            try:
                info = await self.stat(key)
            except NotFoundError:
                info = None
            if info is None or info.etag != multipart_etag(etags):
                raise NetworkError(f"{self._url(key)}: the multipart upload was lost part-way") from None
            return info
        return await self.stat(key)

    async def abort(self, state: dict[str, Any]) -> None:
        await self.abort_upload(state["key"], state["upload_id"])

    async def abort_incomplete(self, upload: IncompleteUpload) -> None:
        await self.abort_upload(upload.key, upload.upload_id)

    async def abort_upload(self, key: str, upload_id: str) -> None:
        await self._s3.abort_multipart(key, upload_id)

    async def incomplete(self, prefix: str = "") -> AsyncIterator[IncompleteUpload]:
        key_marker = upload_marker = ""
        while True:
            query = {"uploads": "", "prefix": prefix, "max-uploads": "1000"}
            if key_marker:
                query["key-marker"] = key_marker
                query["upload-id-marker"] = upload_marker
            url = bucket_url(self._s3.endpoint, self.bucket, path_style=self._s3.path_style)
            root = xml(
                await self._s3.call("GET", f"{url}?{encode_query(query)}", f"s3://{self.bucket}/{prefix}")
            )
            for upload in children(root, "Upload"):
                initiated = text(upload, "Initiated")
                yield IncompleteUpload(
                    key=text(upload, "Key"),
                    upload_id=text(upload, "UploadId"),
                    initiated=datetime.fromisoformat(initiated.replace("Z", "+00:00")) if initiated else None,
                )
            if text(root, "IsTruncated").lower() != "true":
                return
            key_marker = text(root, "NextKeyMarker")
            upload_marker = text(root, "NextUploadIdMarker")
            if not key_marker:
                return

    async def stat(self, key: str) -> ObjectInfo:
        response = await self._s3.call("HEAD", self._s3.object_url(key), self._url(key))
        return info_from_headers(key, response.headers, "x-amz-meta-")

    async def close(self) -> None:
        self._s3.close()


def multipart_etag(part_etags: list[str]) -> str:
    """The ETag S3 gives an object completed from parts with these ETags (the MD5 of their MD5s,
    a dash, the count); empty when a part's ETag is not 32 hexadecimal digits."""
    try:
        digests = [bytes.fromhex(etag.strip('"')) for etag in part_etags]
    except ValueError:
        return ""
    if not all(len(d) == 16 for d in digests):
        return ""
    joined = hashlib.md5(b"".join(digests), usedforsecurity=False)
    return f"{joined.hexdigest()}-{len(digests)}"
