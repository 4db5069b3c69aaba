"""What an HTTP answer's status and S3 error body mean in the error tree (errors.py).

Shared by the REST clients (rest.py, s3_client.py) and the ranged reader (s3_ranges.py); it imports
no HTTP stack, so the reader's start does not pay for ``requests``.
"""

from __future__ import annotations

from ..errors import (
    AuthenticationError,
    BucketNotFoundError,
    DicomCloudError,
    NotFoundError,
    PermissionDeniedError,
    UsageError,
)

#: S3 error codes that mean the credentials themselves were refused.
S3_AUTH_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}
)


def status_error(provider: str, status: int, what: str, detail: str) -> DicomCloudError:
    """The error of an answer no provider-specific code explained, by its HTTP status alone."""
    if status == 403:
        return PermissionDeniedError(f"permission denied on {what}{detail}")
    if status == 404:
        return NotFoundError(f"{what} not found")
    if status == 400:
        return UsageError(f"{provider} rejected the request for {what}{detail}")
    return DicomCloudError(f"{provider} answered HTTP {status} for {what}{detail}")


def s3_error_code(body: bytes) -> tuple[str, str]:
    """The ``Code`` and ``Message`` of an S3 error body (empty strings where it has none)."""
    if not body:
        return "", ""
    import xml.etree.ElementTree as ET  # on error paths only: a ranged read's start does without it

    try:
        # The body comes from the configured S3 endpoint; ElementTree expands no external entities.
        root = ET.fromstring(body)  # noqa: S314
    except ET.ParseError:
        return "", ""
    found = {child.tag.rsplit("}", 1)[-1]: child.text or "" for child in root}
    return found.get("Code", ""), " ".join(found.get("Message", "").split())[:200]


def s3_error(status: int, body: bytes, what: str, bucket: str) -> DicomCloudError:
    """The error of an S3 answer of ``status`` with this error body, about ``what``."""
    code, message = s3_error_code(body)
    detail = f": {code} {message}".rstrip() if code else f": HTTP {status}"
    if code in S3_AUTH_CODES or status == 401:
        return AuthenticationError(
            f"S3 refused the credentials for {what}{detail}",
            hint="check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile (docs/credentials.md)",
        )
    if code == "NoSuchBucket":
        return BucketNotFoundError(f"bucket s3://{bucket} does not exist")
    return status_error("S3", status, what, detail)
