"""Opening a :class:`~dicom_cloud.store.Store` for a parsed URL: the only place that knows every backend."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

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
    # Server-side encryption (docs/server-side-encryption.md). One configuration serves every
    # store of an operation (both ends of a copy), so an option naming one provider is ignored
    # by the others; ``check_encryption_applies`` refuses one that no store of the operation uses.
    #: S3 writes: "AES256" (SSE-S3), "aws:kms" or "aws:kms:dsse". Azure and GCS always encrypt
    #: at rest, so "AES256" is accepted there and changes nothing; the KMS values are S3-only.
    server_side_encryption: str | None = None
    #: S3 SSE-KMS key id, ARN or alias; implies server_side_encryption="aws:kms" when that is unset.
    sse_kms_key_id: str | None = None
    #: A 32-byte AES-256 key held by the user and sent with every request that touches object
    #: content: SSE-C on S3, a customer-provided key (CPK) on Azure, a customer-supplied
    #: encryption key (CSEK) on GCS. The provider keeps only a hash of it: an object written with
    #: it cannot be read without it. Never logged, never shown by repr(), never stored by us.
    sse_customer_key: bytes | None = None
    #: Azure encryption scope (x-ms-encryption-scope) for writes; Azure only.
    azure_encryption_scope: str | None = None
    #: Cloud KMS key for GCS writes: projects/P/locations/L/keyRings/R/cryptoKeys/K; GCS only.
    gcs_kms_key_name: str | None = None
    #: Extra settings for a named backend, for the rare key not modelled above.
    extra: dict[str, str] = field(default_factory=dict)
    #: Local directories: create files 0600 and directories 0700 (the archive sets it: patient
    #: data). Off, modes follow the umask, as for any program that writes files.
    local_private: bool = False

    def __post_init__(self) -> None:
        sse = self.server_side_encryption
        if sse is not None and sse not in _SSE_ALGORITHMS:
            raise UsageError(
                f"unknown server-side encryption '{sse}'",
                hint="use AES256, aws:kms or aws:kms:dsse; an S3 customer key (SSE-C) is set with "
                "sse_customer_key instead",
            )
        if self.sse_kms_key_id is not None:
            if not self.sse_kms_key_id.strip():
                raise UsageError("the SSE-KMS key id is empty")
            if sse is None:
                object.__setattr__(self, "server_side_encryption", "aws:kms")
            elif not sse.startswith("aws:kms"):
                raise UsageError(
                    f"an SSE-KMS key id was given with server-side encryption '{sse}'",
                    hint="a KMS key id goes with aws:kms (or aws:kms:dsse)",
                )
        key = self.sse_customer_key
        if key is not None:
            if not isinstance(key, bytes | bytearray | memoryview):
                raise UsageError("the customer encryption key must be bytes (32 raw bytes, not text)")
            key = bytes(key)
            if len(key) != 32:
                # The length only: never a byte of the key.
                raise UsageError(
                    f"the customer encryption key must be 32 bytes (AES-256), not {len(key)}",
                    hint="generate one with: head -c 32 /dev/urandom | base64",
                )
            object.__setattr__(self, "sse_customer_key", key)
        scope = self.azure_encryption_scope
        if scope is not None and not _AZURE_SCOPE.fullmatch(scope):
            raise UsageError(
                f"'{scope}' is not an Azure encryption scope name",
                hint="scope names have 3 to 63 lower-case letters, digits and single dashes between them",
            )
        if self.gcs_kms_key_name is not None and not _GCS_KMS_KEY.fullmatch(self.gcs_kms_key_name):
            raise UsageError(
                f"'{self.gcs_kms_key_name}' is not a Cloud KMS key name",
                hint="write projects/PROJECT/locations/LOCATION/keyRings/RING/cryptoKeys/KEY",
            )

    def __repr__(self) -> str:
        # The dataclass repr would print the customer key; every other field is shown as usual.
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "sse_customer_key" and value is not None:
                shown.append(f"{f.name}=<hidden, {len(value)} bytes>")
            else:
                shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def check_encryption_applies(self, schemes: Iterable[str]) -> None:
        """Refuse a provider's encryption option when none of ``schemes`` belongs to that provider.

        Stores ignore options naming another provider (one configuration serves both ends of a
        copy); an operation calls this with the schemes of all its locations, so that an option
        nothing will use is an error rather than a silent no-op.
        """
        used = set(schemes)
        wanted = [
            ("sse_kms_key_id", self.sse_kms_key_id is not None, {"s3"}),
            (
                f"server-side encryption {self.server_side_encryption}",
                bool(self.server_side_encryption and self.server_side_encryption.startswith("aws:kms"))
                and self.sse_kms_key_id is None,
                {"s3"},
            ),
            ("azure_encryption_scope", self.azure_encryption_scope is not None, {"azure"}),
            ("gcs_kms_key_name", self.gcs_kms_key_name is not None, {"gs"}),
            ("sse_customer_key", self.sse_customer_key is not None, {"s3", "azure", "gs"}),
        ]
        for option, is_set, providers in wanted:
            if is_set and not used & providers:
                names = ", ".join(f"{p}://" for p in sorted(providers))
                raise UsageError(
                    f"{option} applies only to {names} locations, and this operation has none",
                    hint="remove the option, or see docs/server-side-encryption.md for what each "
                    "provider supports",
                )


_SSE_ALGORITHMS = frozenset({"AES256", "aws:kms", "aws:kms:dsse"})
#: Azure's rule: 3-63 lower-case letters, digits and dashes, each dash between two letters or digits.
_AZURE_SCOPE = re.compile(r"(?=.{3,63}$)[a-z0-9]+(?:-[a-z0-9]+)*")
_GCS_KMS_KEY = re.compile(r"projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+")


_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def refuse_key_in_clear(endpoint: str) -> None:
    """A customer key travels in every request: only over HTTPS, or plain HTTP to this machine."""
    parts = urlsplit(endpoint)
    if parts.scheme != "https" and parts.hostname not in _LOOPBACK:
        raise UsageError(
            f"refusing to send a customer encryption key over plain HTTP to {parts.hostname}",
            hint="use an https:// endpoint (plain http is accepted only for 127.0.0.1/localhost)",
        )


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

        return LocalStore(Path("/"), private=config.local_private)
    if url.scheme == "gs":
        from .gcs import open_gcs

        return open_gcs(url.bucket, config)
    if url.scheme in ("s3", "azure", "memory"):
        from .objectstore import open_objectstore

        return open_objectstore(url.scheme, url.bucket, config)
    raise UsageError(f"unsupported scheme {url.scheme}")
