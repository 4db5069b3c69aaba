"""Presigned PUT URLs for direct uploads, scoped to one key, one content type and one exact size.

On S3 with static keys (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile) the URL is signed
here with SigV4 (``backends/sigv4.py``) with ``content-type`` and ``content-length`` among the signed
headers: S3 refuses (403) a PUT that sends another content type or another number of bytes, so the
declared size is enforced at upload time, not only at completion. Other stores (S3 with role
credentials the library finds itself, GCS, Azure) fall back to the store's own presigning, which
signs the host only; the archive then enforces size and checksum when the session is completed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from ..backends.sigv4 import Signer, SigningCredentials, aws_endpoint, object_url
from ..credentials import aws_settings
from ..url import parse_url


@dataclass(frozen=True)
class ScopedPut:
    url: str
    #: Headers the PUT must carry exactly as given (they are part of the signature).
    headers: dict[str, str]


class S3PutSigner:
    """Signs PUTs into one S3 bucket with the service's own static credentials."""

    def __init__(self, signer: Signer, endpoint: str, bucket: str, path_style: bool) -> None:
        self._signer = signer
        self._endpoint = endpoint
        self._bucket = bucket
        self._path_style = path_style

    @classmethod
    def for_storage(cls, storage_url: str) -> S3PutSigner | None:
        """A signer for ``s3://`` storage with static keys; None otherwise (use the store's signing)."""
        location = parse_url(storage_url)
        if location.scheme != "s3":
            return None
        aws = aws_settings()
        if not aws.access_key_id or not aws.secret_access_key:
            return None
        credentials = SigningCredentials(aws.access_key_id, aws.secret_access_key, aws.session_token)
        endpoint = aws.endpoint or aws_endpoint(aws.region)
        # Custom endpoints (MinIO, SeaweedFS, Ceph) use path-style addressing, as the store does.
        return cls(Signer(credentials, aws.region), endpoint, location.bucket, path_style=bool(aws.endpoint))

    def put(self, key: str, content_type: str, size: int, ttl: timedelta) -> ScopedPut:
        """A PUT of exactly ``size`` bytes of ``content_type`` to ``key`` (bucket-relative)."""
        headers = {"Content-Type": content_type, "Content-Length": str(size)}
        url = self._signer.presign(
            "PUT",
            object_url(self._endpoint, self._bucket, key, path_style=self._path_style),
            expires_in=int(ttl.total_seconds()),
            signed_headers={name.lower(): value for name, value in headers.items()},
        )
        return ScopedPut(url, headers)
