"""S3 stores over obstore: credentials, endpoint and addressing, the server-verified checksum,
server-side encryption, and the resumable-upload client built on the same settings."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from obstore import exceptions as obx
from obstore.store import S3Store

from ..credentials import aws_settings
from ..errors import UsageError
from ..retry import RequestRetries
from ..store import BucketInfo, Features
from . import StoreConfig, refuse_key_in_clear
from .objectstore import ObjectStoreBackend, _first_line, client_options, retry_config
from .sigv4 import S3Bucket, aws_endpoint, current_credentials

if TYPE_CHECKING:
    from ..resumable import ResumableUploads
    from ..store import RangeReader


#: The checksum S3 writes carry unless DICOM_CLOUD_S3_CHECKSUM says otherwise.
DEFAULT_S3_CHECKSUM = "SHA256"
S3_CHECKSUMS = ("SHA256", "CRC64NVME", "none")


def s3_checksum_algorithm(config: StoreConfig) -> str | None:
    """The checksum header of S3 writes: SHA256 (x-amz-checksum-sha256, every S3-compatible server
    that checks one knows it), CRC64NVME (x-amz-checksum-crc64nvme: AWS since 2024, SeaweedFS), or
    none (the CRC32C in metadata is still checked on every read)."""
    value = (
        config.extra.get("checksum_algorithm")
        or os.environ.get("DICOM_CLOUD_S3_CHECKSUM")
        or DEFAULT_S3_CHECKSUM
    )
    chosen = {name.lower(): name for name in S3_CHECKSUMS}.get(value.lower())
    if chosen is None:
        raise UsageError(
            f"unknown S3 checksum {value!r}",
            hint=f"DICOM_CLOUD_S3_CHECKSUM takes {', '.join(S3_CHECKSUMS)}",
        )
    return None if chosen == "none" else chosen


def open_s3(bucket: str, config: StoreConfig) -> ObjectStoreBackend:
    """An S3 bucket (AWS or any S3-compatible server) as a Store."""
    retry = retry_config(config)
    client = client_options(config)
    aws = aws_settings(region=config.region, endpoint=config.endpoint)
    s3_kwargs: dict[str, Any] = {"region": aws.region}
    if aws.access_key_id and aws.secret_access_key:
        s3_kwargs["access_key_id"] = aws.access_key_id
        s3_kwargs["secret_access_key"] = aws.secret_access_key
        if aws.session_token:
            s3_kwargs["session_token"] = aws.session_token
    elif aws.obstore_provider is not None:  # a profile resolved by botocore (assumed role, SSO...)
        s3_kwargs["credential_provider"] = aws.obstore_provider
    if aws.endpoint:
        s3_kwargs["endpoint"] = aws.endpoint.rstrip("/")
        client["allow_http"] = aws.endpoint.startswith("http://")
    path_style = config.path_style if config.path_style is not None else bool(aws.endpoint)
    s3_kwargs["virtual_hosted_style_request"] = not path_style
    # Integrity: every part and every single put carries a checksum header the server checks
    # before accepting the bytes, computed in the Rust client, off the GIL (docs/reliability.md).
    checksum = s3_checksum_algorithm(config)
    if checksum:
        s3_kwargs["checksum_algorithm"] = checksum
    # Server-side encryption (docs/server-side-encryption.md). obstore adds the SSE-C headers
    # to every request that touches content (GET, HEAD, PUT, parts, copy source and target);
    # SSE-S3/SSE-KMS headers go on object creation only, as S3 wants.
    encryption: str | None = None
    if config.sse_customer_key is not None:
        if config.server_side_encryption:
            raise UsageError(
                f"an S3 object takes one kind of server-side encryption: a customer key (SSE-C) "
                f"or {config.server_side_encryption}, not both",
                hint="drop the customer key or the other server-side encryption option",
            )
        refuse_key_in_clear(aws.endpoint or "https://s3.amazonaws.com")
        s3_kwargs["server_side_encryption"] = "sse-c"
        s3_kwargs["sse_customer_key_base64"] = base64.b64encode(config.sse_customer_key).decode()
        encryption = "SSE-C with a customer key"
    elif config.server_side_encryption:
        s3_kwargs["server_side_encryption"] = config.server_side_encryption
        if config.server_side_encryption != "AES256":  # SSE-S3 needs no key: nothing to hint
            encryption = f"server-side encryption {config.server_side_encryption}"
        if config.sse_kms_key_id:
            s3_kwargs["sse_kms_key_id"] = config.sse_kms_key_id
            encryption = f"{encryption} with KMS key {config.sse_kms_key_id}"
    try:
        s3 = S3Store(bucket, client_options=client, retry_config=retry, **s3_kwargs)
    except obx.BaseError as exc:
        raise UsageError(f"invalid S3 configuration: {_first_line(exc)}") from exc
    features = Features(
        server_side_copy=True,
        presign=True,
        object_tags=True,
        # AWS gives SSE-C and SSE-KMS objects ETags that are not the MD5 of their bytes.
        etag_is_md5=encryption is None,
        list_buckets=True,
    )
    backend = ObjectStoreBackend(s3, "s3", bucket, features, endpoint=aws.endpoint or "AWS S3")
    backend.write_encryption = encryption
    # Our own signed requests (resumable uploads, ranged downloads) need keys we hold.
    credentials = current_credentials(aws)
    if credentials is not None:
        endpoint = aws.endpoint or aws_endpoint(aws.region)
        signing = S3Bucket(bucket, endpoint, aws.region, credentials, path_style)
        backend.resumable_factory = _s3_resumable_factory(signing, config)
        backend.range_reader_factory = _s3_range_reader_factory(signing, config)
    backend.bucket_lister = partial(_list_s3_buckets, aws, config)
    if not aws.has_keys:
        backend.missing_credentials_hint = (
            "no AWS credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE (see docs/credentials.md)"
        )
    return backend


def _s3_resumable_factory(signing: S3Bucket, config: StoreConfig) -> Callable[[], ResumableUploads] | None:
    """Resumable uploads sign their own requests: not with SSE-C (the customer key would have to
    travel with every part request: not implemented)."""
    if config.sse_customer_key is not None:
        return None
    create_headers: dict[str, str] = {}
    if config.server_side_encryption:
        create_headers["x-amz-server-side-encryption"] = config.server_side_encryption
    if config.sse_kms_key_id:
        create_headers["x-amz-server-side-encryption-aws-kms-key-id"] = config.sse_kms_key_id

    def build() -> ResumableUploads:
        # Imported when first used: the REST stack (requests) costs a tenth of a second to import.
        from .s3_multipart import S3ResumableUploads

        return S3ResumableUploads(
            signing,
            create_headers=create_headers,
            max_retries=config.max_retries,
            timeout=(config.connect_timeout, config.request_timeout),
        )

    return build


#: Proxy settings obstore's HTTP client follows; the ranged reader does not, so it steps aside.
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def _s3_range_reader_factory(signing: S3Bucket, config: StoreConfig) -> Callable[[], RangeReader] | None:
    """Ranged reads into reused buffers (s3_ranges.py) sign their own requests: not with SSE-C
    (as above), and not through a proxy."""
    if config.sse_customer_key is not None or any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None

    def build() -> RangeReader:
        from .s3_ranges import S3RangeReader

        return S3RangeReader(
            signing,
            retries=RequestRetries(retries=max(0, config.max_retries), timeout=config.request_timeout),
            connect_timeout=config.connect_timeout,
            read_timeout=config.request_timeout,
        )

    return build


async def _list_s3_buckets(*args: Any) -> list[BucketInfo]:
    # Imported when used: the REST stack (requests) is not loaded by transfers that never list buckets.
    from .account_listing import list_s3_buckets

    return await list_s3_buckets(*args)
