"""Opening a :class:`~dicom_cloud.store.Store` for a parsed URL: the only place that knows every backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..store import Store
from ..url import StorageURL, parse_url


@dataclass(frozen=True)
class StoreConfig:
    """Connection settings that are not part of a URL. Credentials come from the environment.

    Each field left at ``None`` falls back to the ecosystem's own environment variables and
    files (see ``docs/credentials.md``).
    """

    #: S3-compatible endpoint (MinIO, SeaweedFS, Ceph...). Also ``AWS_ENDPOINT_URL``.
    endpoint: str | None = None
    region: str | None = None
    #: Path-style S3 addressing; default: on when an endpoint is given, off for AWS.
    path_style: bool | None = None
    #: Attempts per request on transient failures (5xx, 429, resets) before giving up.
    max_retries: int = 4
    #: Seconds before one request is abandoned.
    request_timeout: float = 300.0
    connect_timeout: float = 10.0
    #: Server-side encryption for writes: "AES256" (SSE-S3) or "aws:kms" (with sse_kms_key_id).
    server_side_encryption: str | None = None
    sse_kms_key_id: str | None = None
    #: Extra settings for a named backend, for the rare key not modelled above.
    extra: dict[str, str] = field(default_factory=dict)


def open_store(url: StorageURL | str, config: StoreConfig | None = None) -> Store:
    """The store holding ``url``'s bucket (or, for local paths, the filesystem root ``/``).

    Local locations are opened at ``/`` so that keys are absolute paths without the leading
    slash; the transfer engine confines downloads to their destination directory itself.
    """
    if isinstance(url, str):
        url = parse_url(url)
    config = config or StoreConfig()
    if url.scheme == "file":
        from .local import LocalStore

        return LocalStore(Path("/"))
    if url.scheme == "gs":
        from .gcs import open_gcs

        return open_gcs(url.bucket, config)
    if url.scheme in ("s3", "azure", "memory"):
        from .objectstore import open_objectstore

        return open_objectstore(url.scheme, url.bucket, config)
    raise UsageError(f"unsupported scheme {url.scheme}")
