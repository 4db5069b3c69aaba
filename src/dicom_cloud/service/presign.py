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

from dataclasses import dataclass
from datetime import timedelta

from ..backends.s3_client import S3Client
from ..backends.sigv4 import S3Bucket, Signer, aws_endpoint, current_credentials, object_url
from ..credentials import aws_settings
from ..errors import DicomCloudError, NetworkError, UsageError
from ..url import parse_url

#: S3's smallest part (all parts but the last) and largest part count.
MIN_PART_SIZE = 5 * 1024**2
MAX_PARTS = 10_000
#: Seconds a CreateMultipartUpload / CompleteMultipartUpload request may take, and its retries.
_REQUEST_TIMEOUT = 60
_RETRIES = 2


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
        self._s3: S3Client | None = None

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
        try:
            return await self._client().create_multipart(key, {"content-type": content_type})
        except DicomCloudError as exc:
            raise NetworkError(f"the bucket refused to start a multipart upload ({exc})") from None

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
        try:
            await self._client().complete_multipart(key, upload_id, etags)
        except NetworkError:
            raise
        except DicomCloudError as exc:
            raise UsageError(
                f"the bucket refused to join the uploaded parts ({exc})",
                hint="send the upload_id given at creation and every part's ETag, in part order",
            ) from None

    def _client(self) -> S3Client:
        """The signed S3 REST client (backends/s3_client.py), made on first use: the same client,
        retries included, as resumable uploads use."""
        if self._s3 is None:
            bucket = S3Bucket(
                self._bucket, self._endpoint, self._signer.region, self._signer.credentials, self._path_style
            )
            self._s3 = S3Client(bucket, max_retries=_RETRIES, timeout=(10.0, _REQUEST_TIMEOUT))
        return self._s3
