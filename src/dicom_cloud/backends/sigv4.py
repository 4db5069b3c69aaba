"""AWS Signature Version 4: signing S3 requests (``Authorization`` header) and presigning URLs.

obstore signs its own requests; this module is for the S3 operations it does not offer (resuming
a multipart upload by id, listing and aborting incomplete uploads) and for URLs handed to others
(presigned UploadPart URLs). The algorithm is AWS's published one:

    canonical request = METHOD \\n canonical URI \\n canonical query \\n canonical headers \\n
                        signed header names \\n payload hash
    string to sign    = "AWS4-HMAC-SHA256" \\n amz-date \\n scope \\n hex(SHA-256(canonical request))
    signing key       = HMAC chain over "AWS4"+secret, date, region, service, "aws4_request"

S3 differs from the other AWS services in two ways, both selected by ``Signer(service="s3")``:
the path is encoded once (not twice) and is not normalised (``a//b`` and ``./`` are object names).

Nothing here logs or stores a secret; :class:`SigningCredentials` hides the secret from ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
import posixpath
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

if TYPE_CHECKING:
    from ..credentials import AwsSettings

ALGORITHM = "AWS4-HMAC-SHA256"
#: SHA-256 of the empty body: what GET/DELETE/HEAD requests sign.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
#: Payload hash for requests whose body is not hashed (S3 over TLS; presigned URLs always use it).
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
#: Payload hash announcing aws-chunked bodies with a signature per chunk.
STREAMING_PAYLOAD = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
#: Longest validity S3 accepts for a presigned URL (7 days).
MAX_PRESIGN_SECONDS = 7 * 24 * 3600

# RFC 3986 unreserved characters are the only ones left as they are.
_UNRESERVED = "-_.~"


@dataclass(frozen=True, repr=False)
class SigningCredentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:  # never print the secret or the token
        token = "set" if self.session_token else "none"
        return f"SigningCredentials(access_key_id={self.access_key_id[:4]}..., session_token={token})"


def uri_encode(text: str, *, keep_slash: bool) -> str:
    """AWS's UriEncode: percent-encode UTF-8 bytes except the unreserved set (and '/' if kept)."""
    return quote(text, safe=_UNRESERVED + ("/" if keep_slash else ""))


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def amz_date(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def _trim(value: str) -> str:
    # Leading/trailing spaces removed, inner runs of spaces collapsed (the "trimall" rule);
    # folded (multi-line) values are joined the same way.
    return " ".join(value.split())


@dataclass(frozen=True)
class SignedRequest:
    """A signed request, ready to send: the URL (unchanged for header auth) and every header."""

    method: str
    url: str
    headers: dict[str, str]
    #: For tests and debugging: what was signed (contains no secret).
    canonical_request: str
    string_to_sign: str


#: Keys as they are, or a callable giving the current ones (temporary keys that are refreshed).
CredentialSource = SigningCredentials | Callable[[], SigningCredentials]


def current_credentials(aws: AwsSettings) -> CredentialSource | None:
    """What to sign with for these settings: their keys, or a callable when the keys change over time
    (assumed roles, SSO, credential_process). None when we hold no keys (the S3 library's own chain)."""
    if aws.key_source is not None:
        source = aws.key_source

        def current() -> SigningCredentials:
            keys = source()
            return SigningCredentials(keys.access_key_id, keys.secret_access_key, keys.session_token)

        return current
    if aws.access_key_id and aws.secret_access_key:
        return SigningCredentials(aws.access_key_id, aws.secret_access_key, aws.session_token)
    return None


class Signer:
    """Signs requests for one service in one region with one set of credentials."""

    def __init__(self, credentials: CredentialSource, region: str, service: str = "s3") -> None:
        self._credentials = credentials
        self.region = region
        self.service = service
        # S3 keys are encoded once and never normalised; every other service does both.
        self._s3_paths = service == "s3"

    @property
    def credentials(self) -> SigningCredentials:
        """The keys to sign with now. Each signature takes them once (a refresh between two reads
        would mix an old key id with a new secret)."""
        source = self._credentials
        return source if isinstance(source, SigningCredentials) else source()

    # -- the building blocks ------------------------------------------------------------------

    def scope(self, when: datetime) -> str:
        return f"{when.astimezone(UTC):%Y%m%d}/{self.region}/{self.service}/aws4_request"

    def signing_key(self, when: datetime, credentials: SigningCredentials | None = None) -> bytes:
        secret = (credentials or self.credentials).secret_access_key
        key = _hmac(("AWS4" + secret).encode("utf-8"), f"{when.astimezone(UTC):%Y%m%d}")
        key = _hmac(key, self.region)
        key = _hmac(key, self.service)
        return _hmac(key, "aws4_request")

    def canonical_uri(self, raw_path: str) -> str:
        """The path as signed. ``raw_path`` is the path as sent on the wire (already encoded)."""
        path = raw_path or "/"
        if self._s3_paths:
            # Decode then re-encode so that both "a b" and "a%20b" sign as "a%20b".
            return uri_encode(unquote(path), keep_slash=True)
        # Other services normalise the path and encode the path as sent once more (so an
        # encoded "%20" is signed as "%2520").
        normalized = posixpath.normpath(path) if path != "/" else "/"
        if normalized.startswith("//"):
            normalized = "/" + normalized.lstrip("/")
        if path.endswith("/") and not normalized.endswith("/"):
            normalized += "/"
        return uri_encode(normalized, keep_slash=True)

    @staticmethod
    def canonical_query(params: Iterable[tuple[str, str]]) -> str:
        encoded = sorted(
            (uri_encode(k, keep_slash=False), uri_encode(v, keep_slash=False)) for k, v in params
        )
        return "&".join(f"{k}={v}" for k, v in encoded)

    @staticmethod
    def canonical_headers(headers: Iterable[tuple[str, str]]) -> tuple[str, str]:
        """(canonical header block, signed header names). Repeated names are joined with commas."""
        merged: dict[str, list[str]] = {}
        for name, value in headers:
            merged.setdefault(name.strip().lower(), []).append(_trim(value))
        names = sorted(merged)
        block = "".join(f"{n}:{','.join(merged[n])}\n" for n in names)
        return block, ";".join(names)

    def _string_to_sign(self, when: datetime, canonical_request: str) -> str:
        digest = sha256_hex(canonical_request.encode("utf-8"))
        return f"{ALGORITHM}\n{amz_date(when)}\n{self.scope(when)}\n{digest}"

    def _signature(self, when: datetime, string_to_sign: str, credentials: SigningCredentials) -> str:
        key = self.signing_key(when, credentials)
        return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()

    # -- header authentication ----------------------------------------------------------------

    def sign(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        payload_hash: str = EMPTY_SHA256,
        when: datetime | None = None,
        add_content_sha256: bool | None = None,
    ) -> SignedRequest:
        """Sign with an ``Authorization`` header; every header given is signed.

        ``payload_hash`` is the hex SHA-256 of the body, or :data:`UNSIGNED_PAYLOAD` /
        :data:`STREAMING_PAYLOAD`. S3 requires ``x-amz-content-sha256``: it is added for the s3
        service unless ``add_content_sha256`` is False. A session token travels as
        ``x-amz-security-token`` and is signed. Query parameters are taken from ``url``.
        """
        when = when or datetime.now(UTC)
        credentials = self.credentials
        parts = urlsplit(url)
        pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        present = {name.lower() for name, _ in pairs}
        if "host" not in present:
            pairs.append(("host", _host(parts.scheme, parts.netloc)))
        if "x-amz-date" not in present:
            pairs.append(("x-amz-date", amz_date(when)))
        if add_content_sha256 is None:
            add_content_sha256 = self._s3_paths
        if add_content_sha256 and "x-amz-content-sha256" not in present:
            pairs.append(("x-amz-content-sha256", payload_hash))
        if credentials.session_token and "x-amz-security-token" not in present:
            pairs.append(("x-amz-security-token", credentials.session_token))
        block, signed_names = self.canonical_headers(pairs)
        canonical_request = "\n".join(
            [
                method.upper(),
                self.canonical_uri(parts.path),
                self.canonical_query(_query_pairs(parts.query)),
                block,
                signed_names,
                payload_hash,
            ]
        )
        string_to_sign = self._string_to_sign(when, canonical_request)
        signature = self._signature(when, string_to_sign, credentials)
        authorization = (
            f"{ALGORITHM} Credential={credentials.access_key_id}/{self.scope(when)}, "
            f"SignedHeaders={signed_names}, Signature={signature}"
        )
        out = {name: value for name, value in pairs if name.lower() != "host"}
        out["Authorization"] = authorization
        return SignedRequest(method.upper(), url, out, canonical_request, string_to_sign)

    # -- query authentication (presigned URLs) ------------------------------------------------

    def presign(
        self,
        method: str,
        url: str,
        *,
        expires_in: int,
        params: Mapping[str, str] | None = None,
        signed_headers: Mapping[str, str] | None = None,
        when: datetime | None = None,
        payload_hash: str = UNSIGNED_PAYLOAD,
    ) -> str:
        """A URL anyone can use with ``method`` until ``expires_in`` seconds from ``when``.

        ``params`` are added to the query and signed (``uploadId``, ``partNumber``...).
        ``signed_headers`` (e.g. ``content-type``, ``content-md5``) become part of the signature:
        the holder of the URL must send exactly these values. The session token, if any, is a
        signed query parameter (S3's rule for presigned URLs).
        """
        if not 1 <= expires_in <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"a presigned URL lives 1 to {MAX_PRESIGN_SECONDS} seconds, not {expires_in}")
        when = when or datetime.now(UTC)
        credentials = self.credentials
        parts = urlsplit(url)
        header_pairs = [("host", _host(parts.scheme, parts.netloc)), *((signed_headers or {}).items())]
        block, signed_names = self.canonical_headers(header_pairs)
        query = _query_pairs(parts.query)
        query += list((params or {}).items())
        query += [
            ("X-Amz-Algorithm", ALGORITHM),
            ("X-Amz-Credential", f"{credentials.access_key_id}/{self.scope(when)}"),
            ("X-Amz-Date", amz_date(when)),
            ("X-Amz-Expires", str(expires_in)),
            ("X-Amz-SignedHeaders", signed_names),
        ]
        if credentials.session_token:
            query.append(("X-Amz-Security-Token", credentials.session_token))
        canonical_query = self.canonical_query(query)
        canonical_request = "\n".join(
            [
                method.upper(),
                self.canonical_uri(parts.path),
                canonical_query,
                block,
                signed_names,
                payload_hash,
            ]
        )
        signature = self._signature(when, self._string_to_sign(when, canonical_request), credentials)
        # S3 paths go out exactly as signed (encoded once), so a name given unencoded still works.
        path = self.canonical_uri(parts.path) if self._s3_paths else (parts.path or "/")
        return f"{parts.scheme}://{parts.netloc}{path}?{canonical_query}&X-Amz-Signature={signature}"


def _host(scheme: str, netloc: str) -> str:
    """The Host header HTTP clients send: the port only when it is not the scheme's default."""
    default = {"http": ":80", "https": ":443"}.get(scheme)
    return netloc[: -len(default)] if default and netloc.endswith(default) else netloc


def _query_pairs(query: str) -> list[tuple[str, str]]:
    """Split a raw query into decoded pairs; ``a`` alone is ``("a", "")``. '+' is a literal plus."""
    pairs: list[tuple[str, str]] = []
    for item in query.split("&") if query else []:
        name, _, value = item.partition("=")
        pairs.append((unquote(name), unquote(value)))
    return pairs


@dataclass(frozen=True)
class S3Bucket:
    """One S3 bucket as our own signed requests reach it: its name, its endpoint and addressing,
    and the region and keys they are signed with (resumable uploads, the service's presigning,
    ranged downloads)."""

    name: str
    endpoint: str
    region: str
    credentials: CredentialSource = field(repr=False)
    path_style: bool

    def object_url(self, key: str) -> str:
        return object_url(self.endpoint.rstrip("/"), self.name, key, path_style=self.path_style)

    def signer(self) -> Signer:
        return Signer(self.credentials, self.region, "s3")


def object_url(endpoint: str, bucket: str, key: str, *, path_style: bool) -> str:
    """The URL of ``key`` in ``bucket``: ``endpoint/bucket/key`` or ``bucket.endpoint-host/key``.

    ``key`` is an object name (not encoded); it is percent-encoded here, '/' kept.
    """
    parts = urlsplit(endpoint.rstrip("/"))
    encoded_key = uri_encode(key, keep_slash=True)
    base_path = parts.path.rstrip("/")
    if path_style:
        return f"{parts.scheme}://{parts.netloc}{base_path}/{bucket}/{encoded_key}"
    return f"{parts.scheme}://{bucket}.{parts.netloc}{base_path}/{encoded_key}"


def bucket_url(endpoint: str, bucket: str, *, path_style: bool) -> str:
    """The URL of ``bucket`` itself (for bucket-level requests such as ListMultipartUploads)."""
    parts = urlsplit(endpoint.rstrip("/"))
    base_path = parts.path.rstrip("/")
    if path_style:
        return f"{parts.scheme}://{parts.netloc}{base_path}/{bucket}/"
    return f"{parts.scheme}://{bucket}.{parts.netloc}{base_path}/"


def aws_endpoint(region: str) -> str:
    """The regional AWS S3 endpoint (virtual-hosted style is the default there)."""
    return f"https://s3.{region}.amazonaws.com"
