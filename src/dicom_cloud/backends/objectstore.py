"""S3 (and S3-compatible), Azure Blob and in-memory stores, through obstore's Rust clients.

This module is the bottom edge for those three: obstore's exceptions are translated here
into :mod:`dicom_cloud.errors` by their class, the HTTP status, and the provider's error code
where the status alone is ambiguous (a 403 is a bad signature or a missing permission), all read
from the fixed-format part of the error, never from text that repeats the object's name.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeVar, cast

import obstore
from obstore import exceptions as obx
from obstore.store import MemoryStore

from ..errors import (
    AlreadyExistsError,
    AuthenticationError,
    BucketNotFoundError,
    DicomCloudError,
    NetworkError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    ThrottledError,
    UnsafeNameError,
    UsageError,
)
from ..names import printable
from ..retry import RequestRetries, resumable_listing
from ..store import (
    BucketInfo,
    Features,
    MultipartPlan,
    ObjectInfo,
    PutOptions,
    PutResult,
    RangeReader,
    Store,
)
from . import StoreConfig
from .tls import untrusted_certificate

if TYPE_CHECKING:
    from obstore.store import ClientConfig, ObjectStore, RetryConfig

    from ..resumable import ResumableUploads
    from .azure_blocks import AzureResumableUploads

T = TypeVar("T")

#: In-process stores by name, so that ``memory://name`` means the same store within a process.
_MEMORY_STORES: dict[str, MemoryStore] = {}

# Provider error codes, read from the XML bodies of error answers, that decide the class of an error.
_AUTH_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
        "AuthenticationFailed",  # Azure
        "InvalidAuthenticationInfo",  # Azure
        "NoAuthenticationInformation",  # Azure
    }
)
#: Azure and Azurite answer a bad signature with code AuthorizationFailure (also used for missing
#: permissions) and this message.
_AZURE_AUTH_MESSAGE = "Server failed to authenticate the request"
_BUCKET_CODES = frozenset({"NoSuchBucket", "ContainerNotFound", "ContainerBeingDeleted"})
#: A multipart upload whose parts the server no longer has (S3 NoSuchUpload, Azure InvalidBlockList).
_LOST_UPLOAD_CODES = frozenset({"NoSuchUpload", "InvalidBlockList"})
#: Code prefixes of throttling answers (Throttling, ThrottlingException...).
_THROTTLE_CODES = ("SlowDown", "ServerBusy", "TooManyRequests", "RequestLimitExceeded", "Throttl")


def open_objectstore(scheme: str, bucket: str, config: StoreConfig) -> Store:
    """Build the obstore client for ``scheme`` (s3, azure or memory) and wrap it: each provider's
    opening is in its own module (objectstore_s3.py, objectstore_azure.py)."""
    if scheme == "memory":
        inner: ObjectStore = _MEMORY_STORES.setdefault(bucket, MemoryStore())
        return ObjectStoreBackend(inner, "memory", bucket, Features(server_side_copy=True, etag_is_md5=False))
    if scheme == "s3":
        from .objectstore_s3 import open_s3

        return open_s3(bucket, config)
    if scheme == "azure":
        from .objectstore_azure import open_azure

        return open_azure(bucket, config)
    raise UsageError(f"obstore backend cannot open {scheme}://")


def client_options(config: StoreConfig) -> ClientConfig:
    """obstore's HTTP client settings, the same for every provider."""
    return {
        "connect_timeout": timedelta(seconds=config.connect_timeout),
        "timeout": timedelta(seconds=config.request_timeout),
        "pool_max_idle_per_host": "64",
        "user_agent": "dicom-cloud",
    }


def retry_config(config: StoreConfig) -> RetryConfig:
    """The request layer of the retry policy (retry.py) as obstore's RetryConfig."""
    policy = RequestRetries(retries=max(0, config.max_retries), timeout=config.request_timeout)
    return cast("RetryConfig", policy.obstore_config())


Signer = Callable[[str, timedelta, Literal["GET", "PUT"]], str]


class ObjectStoreBackend(Store):
    """A :class:`Store` over one obstore store (S3Store, AzureStore or MemoryStore)."""

    def __init__(
        self,
        inner: ObjectStore,
        scheme: str,
        bucket: str,
        features: Features,
        *,
        endpoint: str = "",
        signer: Signer | None = None,
    ) -> None:
        self._inner = inner
        self.scheme = scheme
        self.bucket = bucket
        self.features = features
        self._endpoint = endpoint
        #: Replaces obstore's signing where it is wrong for the provider (Azure blob names).
        self._signer = signer
        self._bucket_checked = scheme == "memory"
        #: Set when the store was opened without credentials of our own (the library's chain may
        #: still find some): a refusal then most likely means "no credentials".
        self.missing_credentials_hint: str | None = None
        #: What server-side encryption writes ask for (set by open_objectstore), for error hints.
        self.write_encryption: str | None = None
        #: Builds the resumable-upload client (set by open_objectstore when credentials allow).
        self.resumable_factory: Callable[[], ResumableUploads] | None = None
        #: Lists the account's buckets or containers (set by open_objectstore for S3 and Azure).
        self.bucket_lister: Callable[[], Awaitable[list[BucketInfo]]] | None = None
        #: Builds the ranged reader of large downloads (set by open_objectstore where it can sign).
        self.range_reader_factory: Callable[[], RangeReader] | None = None
        self._resumable: ResumableUploads | None = None
        self._range_reader: RangeReader | None = None

    def _verified_azure_writer(self, options: PutOptions) -> AzureResumableUploads | None:
        """On Azure, whole puts go through our own Put Blob with Content-MD5 (checked by the server)
        when we hold the account key; metadata must be ASCII to travel in headers as it is."""
        if self.scheme != "azure":
            return None
        # Imported here: requests (under the REST clients) costs a tenth of a second to import,
        # which S3 transfers never need.
        from .azure_blocks import AzureResumableUploads

        uploads = self.resumable_uploads()
        if not isinstance(uploads, AzureResumableUploads):
            return None
        if not all(value.isascii() and name.isascii() for name, value in options.metadata.items()):
            return None
        return uploads

    async def list_buckets(self) -> list[BucketInfo]:
        if self.bucket_lister is None:
            return await super().list_buckets()
        return await self.bucket_lister()

    def resumable_uploads(self) -> ResumableUploads | None:
        if self._resumable is None and self.resumable_factory is not None:
            self._resumable = self.resumable_factory()
        return self._resumable

    def range_reader(self) -> RangeReader | None:
        if self._range_reader is None and self.range_reader_factory is not None:
            self._range_reader = self.range_reader_factory()
        return self._range_reader

    # -- reads -------------------------------------------------------------------------

    async def stat(self, key: str) -> ObjectInfo:
        try:
            result = await self._call(key, obstore.get_async(self._inner, key, options={"head": True}))
        except PermissionDeniedError:
            # A HEAD 403 carries no body to tell bad credentials from a missing permission;
            # a listing's 403 does. Only on this error path.
            parent = key.rpartition("/")[0]
            async for _ in self.list(f"{parent}/" if parent else ""):
                break
            raise
        return _info_with_attributes(key, result.meta, result.attributes)

    async def list(self, prefix: str = "", *, recursive: bool = True) -> AsyncIterator[ObjectInfo]:
        # obstore lists whole path segments ("a/b" means "a/b/..."); a plain string prefix is
        # listed from its directory and filtered, which costs only when it does not end in "/".
        directory = prefix if prefix.endswith("/") or not prefix else prefix.rpartition("/")[0]
        if not recursive:
            listing = await self._call(
                prefix, obstore.list_with_delimiter_async(self._inner, directory.rstrip("/") or None)
            )
            self._bucket_checked = True
            entries = [_info(m) for m in listing["objects"]]
            entries += [ObjectInfo(key=p.rstrip("/") + "/", size=0) for p in listing["common_prefixes"]]
            for entry in sorted(entries, key=lambda i: i.key.encode()):
                if entry.key.startswith(prefix):
                    yield entry
            return
        # A listing that fails part-way (a dropped connection, throttling past obstore's own
        # retries) resumes after the last key it gave, under the retry policy (retry.py).
        async for info in resumable_listing(
            lambda after: self._list_after(directory, prefix, after), lambda i: i.key, what=self.url(prefix)
        ):
            yield info

    async def _list_after(self, directory: str, prefix: str, after: str | None) -> AsyncIterator[ObjectInfo]:
        """Objects under ``directory`` starting with ``prefix`` whose keys sort after ``after``."""
        stream = obstore.list(self._inner, directory.rstrip("/") or None, offset=after, chunk_size=1000)
        while True:
            try:
                batch = await stream.__anext__()
            except StopAsyncIteration:
                self._bucket_checked = True  # the server answered: the bucket exists
                return
            except (obx.BaseError, FileNotFoundError) as exc:
                if isinstance(exc, obx.InvalidPathError) or "InvalidPath" in _failure(exc).variants:
                    # obstore refuses to list past a name with "." or ".." segments.
                    raise UnsafeNameError(
                        f"{self.url(prefix)}: an object below has a name with '.' or '..' segments, "
                        "which cannot be listed safely",
                        hint="rename or delete that object with the provider's own tools",
                    ) from exc
                self._raise(exc, prefix)
            # Any listing the server answered proves the bucket exists: writes need not list again
            # (the destination's preflight listing is such one).
            self._bucket_checked = True
            for meta in batch:
                if meta["path"].startswith(prefix):
                    yield _info(meta)

    async def get(self, key: str) -> bytes | memoryview:
        return (await self.read(key))[1]

    async def read(self, key: str) -> tuple[ObjectInfo, bytes | memoryview]:
        result = await self._call(key, obstore.get_async(self._inner, key))
        data = await self._call(key, result.bytes_async())
        # A view of the Rust buffer: no copy of the object's bytes on the Python side.
        return _info_with_attributes(key, result.meta, result.attributes), memoryview(data)

    async def get_range(self, key: str, start: int, end: int) -> bytes | memoryview:
        if end <= start:
            return b""
        data = await self._call(key, obstore.get_range_async(self._inner, key, start=start, end=end))
        return memoryview(data)

    async def stream(
        self, key: str, *, chunk_size: int = 1024 * 1024, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes | memoryview]:
        if end is not None and end <= start:
            return
        options: Any = {}
        if end is not None:
            options["range"] = (start, end)
        elif start:
            options["range"] = {"offset": start}
        result = await self._call(key, obstore.get_async(self._inner, key, options=options or None))
        chunks = result.stream(min_chunk_size=chunk_size)
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except (obx.BaseError, FileNotFoundError) as exc:
                self._raise(exc, key)
            view = memoryview(chunk)
            # Some stores (memory) hand back the whole object at once: keep chunks to the size asked.
            if len(view) <= 2 * chunk_size:
                yield view
                continue
            for offset in range(0, len(view), chunk_size):
                yield view[offset : offset + chunk_size]

    # -- writes ------------------------------------------------------------------------

    async def put(self, key: str, data: bytes | memoryview, options: PutOptions = PutOptions()) -> PutResult:
        verified = self._verified_azure_writer(options)
        if verified is not None:
            etag = await self._write(key, lambda: verified.put_whole(key, data, options))
            return PutResult(etag=etag)
        result = await self._write(
            key,
            lambda: obstore.put_async(
                self._inner,
                key,
                data,
                attributes=_attributes(options),
                tags=dict(options.tags) if options.tags and self.features.object_tags else None,
                mode="create" if options.if_absent else "overwrite",
                use_multipart=False,
            ),
        )
        return PutResult(etag=_unquote(result["e_tag"]))

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes | memoryview],
        options: PutOptions = PutOptions(),
        plan: MultipartPlan = MultipartPlan(),
    ) -> PutResult:
        if options.if_absent:
            # Conditional multipart completion is not portable: check first, then write.
            await self._refuse_existing(key)
        result = await self._write(
            key,
            lambda: obstore.put_async(
                self._inner,
                key,
                chunks,
                attributes=_attributes(options),
                tags=dict(options.tags) if options.tags and self.features.object_tags else None,
                chunk_size=plan.part_size,
                max_concurrency=plan.concurrency,
            ),
        )
        return PutResult(etag=_unquote(result["e_tag"]))

    async def put_file(
        self, key: str, path: Path, options: PutOptions = PutOptions(), plan: MultipartPlan = MultipartPlan()
    ) -> PutResult:
        if options.if_absent:
            await self._refuse_existing(key)
        # A Path is read by obstore's Rust side, part by part: no Python buffers, no GIL.
        result = await self._write(
            key,
            lambda: obstore.put_async(
                self._inner,
                key,
                path,
                attributes=_attributes(options),
                tags=dict(options.tags) if options.tags and self.features.object_tags else None,
                chunk_size=plan.part_size,
                max_concurrency=plan.concurrency,
            ),
        )
        return PutResult(etag=_unquote(result["e_tag"]))

    async def delete(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        try:
            await obstore.delete_async(self._inner, list(keys))
        except (obx.NotFoundError, FileNotFoundError):
            # Azure answers 404 for a missing blob; deleting what is absent is not an error.
            for key in keys:
                try:
                    await obstore.delete_async(self._inner, key)
                except (obx.NotFoundError, FileNotFoundError):
                    continue
                except obx.BaseError as exc:
                    self._raise(exc, key)
        except obx.BaseError as exc:
            self._raise(exc, keys[0])

    async def copy(self, src_key: str, dst_key: str) -> None:
        await self._call(src_key, obstore.copy_async(self._inner, src_key, dst_key))

    async def sign(self, key: str, expires: timedelta, method: Literal["GET", "PUT"] = "GET") -> str:
        if not self.features.presign:
            raise NotSupportedError(
                f"{self.scheme}:// store cannot sign URLs with these credentials",
                hint="Azure share links need an account key (AZURE_STORAGE_KEY or a connection string)",
            )
        if expires > timedelta(days=7) and self.scheme == "s3":
            raise UsageError("S3 presigned URLs can last at most 7 days", hint="use --expires 7d or less")
        if self._signer is not None:
            try:
                return self._signer(key, expires, method)
            except ValueError as exc:  # binascii.Error: an account key that is not base64
                raise UsageError("the Azure account key is not valid base64") from exc
        signable: Any = self._inner
        url: str = await self._call(key, obstore.sign_async(signable, method, key, expires))
        return url

    async def close(self) -> None:
        self._inner = None  # type: ignore[assignment]
        if self._resumable is not None:
            await self._resumable.close()
        if self._range_reader is not None:
            self._range_reader.close()

    # -- error translation -------------------------------------------------------------

    async def _refuse_existing(self, key: str) -> None:
        try:
            await self.stat(key)
        except NotFoundError:
            return
        raise AlreadyExistsError(f"{self.url(key)} already exists")

    async def _write(self, key: str, start: Callable[[], Awaitable[T]]) -> T:
        """``_call`` for writes, after checking once per store that the bucket exists.

        Some servers answer a write to a missing bucket with a 500 (SeaweedFS, which then
        half-creates it), so the clear error has to come from a listing made beforehand.
        obstore starts a request as soon as its call is made, hence ``start`` is a callable.
        """
        if not self._bucket_checked:
            await self._check_bucket(key)
        try:
            try:
                awaitable = start()
            except ValueError as exc:  # obstore parses the name before any request
                raise self._invalid_name(key, exc) from exc
            return await self._call(key, awaitable)
        except (NetworkError, UsageError, PermissionDeniedError) as exc:
            # A server without the encryption asked for (or a key it cannot use) answers with a
            # bare 400, 403 or 500: say what the write asked for.
            if self.write_encryption and not isinstance(exc, ThrottledError):
                exc.hint = (
                    f"this write asked for {self.write_encryption}: check that the server supports "
                    "it and that these credentials may use the key (docs/server-side-encryption.md)"
                )
            raise

    async def _check_bucket(self, key: str) -> None:
        """A listing under the name about to be written: a missing bucket fails it, and it is
        empty in the usual case. A listing of the bucket's root would return a page of up to
        1000 keys, and every write started before the first listing answered made one: 32
        such pages at the start of an upload of 400 files cost SeaweedFS about a CPU-second
        (docs/benchmarks.md, uploads, fourth round)."""
        try:
            async for _ in self.list(f"{key.rstrip('/')}/"):
                break
        except (ValueError, UnsafeNameError):
            return  # a name obstore refuses: the write itself says so, as it always did
        self._bucket_checked = True

    async def _call(self, key: str, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except (obx.BaseError, FileNotFoundError) as exc:  # obstore's not-found is the built-in
            self._raise(exc, key)
        except OSError as exc:
            raise NetworkError(f"{self.url(key)}: {exc.strerror or exc}") from exc
        except ValueError as exc:  # object_store refuses empty, "." and ".." path segments
            raise self._invalid_name(key, exc) from exc

    def _invalid_name(self, key: str, exc: ValueError) -> UnsafeNameError:
        reason = printable(_first_line(exc).rsplit(": ", 1)[-1])
        return UnsafeNameError(f"'{printable(key)}' is not a valid object name ({reason})")

    def _raise(self, exc: BaseException, key: str) -> NoReturn:
        error = translate_error(exc, self.url(key), self._endpoint)
        if self.missing_credentials_hint and isinstance(error, PermissionDeniedError | AuthenticationError):
            # Refused while we sent no keys of our own: say that, not "permission denied".
            raise AuthenticationError(
                f"{self.url(key)}: access refused and no credentials were sent",
                hint=self.missing_credentials_hint,
            ) from exc
        raise error from exc


def translate_error(exc: BaseException, where: str, endpoint: str = "") -> DicomCloudError:
    """The dicom-cloud error for an obstore exception about ``where`` (a URL).

    Decided by the exception's class and by what :func:`_failure` reads from the structured part
    of its text (HTTP status, provider code, transport fault), never by searching the whole text:
    the message repeats the object's name, which may hold any word.
    """
    failure = _failure(exc)
    status, code = failure.status, failure.code
    if code in _BUCKET_CODES:
        bucket = where.split("/")[2] if "://" in where else where
        return BucketNotFoundError(
            f"bucket or container '{bucket}' does not exist", hint="check the name, or create it first"
        )
    if failure.credential_lookup:
        return AuthenticationError(
            f"no usable credentials for {where}",
            hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the Azure/GCS equivalents",
        )
    if (
        code in _AUTH_CODES
        or status == 401
        or isinstance(exc, obx.UnauthenticatedError)
        or failure.message.startswith(_AZURE_AUTH_MESSAGE)
    ):
        return AuthenticationError(
            f"{where}: the server refused the credentials ({code or status or 'unauthenticated'})",
            hint="check the access key and secret (environment, profile or connection string)",
        )
    if code in _LOST_UPLOAD_CODES:
        # A multipart commit repeated after its first try succeeded with the answer lost (or an
        # upload the server dropped): the blocks are gone. Writing the whole object again is safe.
        return NetworkError(f"{where}: the multipart upload was lost part-way ({code})")
    if isinstance(exc, obx.AlreadyExistsError | obx.PreconditionError):
        return AlreadyExistsError(f"{where} already exists")
    if isinstance(exc, obx.NotFoundError | FileNotFoundError):
        return NotFoundError(f"{where}: no such object")
    # Bulk deletes answer 200 with a per-key AccessDenied: its code, no status.
    if isinstance(exc, obx.PermissionDeniedError) or status == 403 or code == "AccessDenied":
        return PermissionDeniedError(
            f"{where}: access denied ({code or 'forbidden'})",
            hint="the credentials are valid but lack the permission for this operation",
        )
    if isinstance(exc, obx.NotSupportedError):
        return NotSupportedError(f"{where}: {_first_line(exc)}")
    if status in (429, 503) or (code is not None and code.startswith(_THROTTLE_CODES)):
        return ThrottledError(f"{where}: the server is throttling requests ({code or status})")
    if status is not None and status >= 500:
        return NetworkError(f"{where}: server error {status} ({code or 'no detail'})")
    if status == 404:
        return NotFoundError(f"{where}: not found")
    if status is not None and 400 <= status < 500:
        return UsageError(f"{where}: request refused with status {status} ({code or 'no detail'})")
    if failure.certificate is not None:
        return untrusted_certificate(endpoint or "the storage server", failure.certificate)
    if failure.transport in ("Interrupted", "Decode"):
        # The connection dropped part-way through a request or a response body.
        return NetworkError(f"{where}: connection dropped ({failure.reason})")
    if failure.transport is not None:
        return NetworkError(
            f"cannot reach {endpoint or 'the storage server'} ({failure.reason})",
            hint="check the endpoint URL and that the server is running",
        )
    return DicomCloudError(f"{where}: {_first_line(exc)}")


@dataclass(frozen=True)
class _Failure:
    """What an obstore error says in its fixed-format part."""

    #: The HTTP status the server answered, if it answered.
    status: int | None = None
    #: The provider's error code (``<Code>`` of the XML body, or a bulk delete's per-key code).
    code: str | None = None
    #: The provider's message (``<Message>`` of the XML body), escaped as Rust prints strings.
    message: str = ""
    #: How the request failed without an answer (object_store's HttpErrorKind: Connect, Request,
    #: Timeout, Interrupted, Decode, Unknown).
    transport: str | None = None
    #: The I/O error kind under a transport fault (ConnectionRefused, ConnectionReset, ...).
    io_kind: str | None = None
    #: Variant names of the Rust error chain (InvalidPath, BadSegment, ...).
    variants: frozenset[str] = frozenset()
    #: The request went to a cloud metadata service to fetch credentials.
    credential_lookup: bool = False
    #: Why the server's TLS certificate was refused (rustls: UnknownIssuer, NotValidForName...).
    certificate: str | None = None

    @property
    def reason(self) -> str:
        if self.transport == "Timeout":
            return "timed out"
        if self.transport in ("Interrupted", "Decode"):
            return "connection reset or closed mid-transfer"
        if self.transport == "Connect" or self.io_kind in ("ConnectionRefused", "ConnectionReset"):
            return "connection refused or reset"
        return "connection failed"


# obstore's message is "<summary naming the path>: <request URL> ... <body>\n\nDebug source:\n<the
# Rust error chain, pretty-printed>". The summary, the URL and the XML body all repeat the object's
# name (raw, percent-encoded, XML-escaped). In the pretty-printed chain every string is one quoted,
# escaped line, so a line that *starts* with a field name is structure the name cannot forge; and
# the chain is the last "Debug source" block, because nothing after it holds a raw line break.
_DEBUG_MARK = "\n\nDebug source:\n"
_DEBUG_STATUS = re.compile(r"^\s*status: (\d{3}),$", re.M)
_DEBUG_BODY = re.compile(r"^\s*body: Some\(\n\s*\"(.*)\",$", re.M)
_DEBUG_DELETE_CODE = re.compile(r"^\s*code: \"(\w+)\",$", re.M)
_DEBUG_TRANSPORT = re.compile(r"^\s*(?:source: )?HttpError \{\n\s*kind: (\w+),$", re.M)
_DEBUG_IO_KIND = re.compile(r"^\s*kind: (\w+),$", re.M)
_DEBUG_VARIANT = re.compile(r"^\s*(?:\w+: )?(\w+) ?[{(]$", re.M)
_DEBUG_URI = re.compile(r"^\s*uri: Some\(\n\s*(https?://[^/\s,]+)", re.M)
_DEBUG_CERTIFICATE = re.compile(r"^\s*error: InvalidCertificate\(\n\s*(\w+)", re.M)
# In the XML body the object's name is escaped: these tags are the server's own.
_BODY_CODE = re.compile(r"<Code>(\w+)</Code>")
_BODY_MESSAGE = re.compile(r"<Message>(.*?)</Message>")
#: Where AWS clients fetch credentials from (EC2 instance metadata, ECS task credentials).
_CREDENTIAL_HOSTS = ("http://169.254.169.254", "http://169.254.170.2", "http://[fd00:ec2::254]")


def _failure(exc: BaseException) -> _Failure:
    text = str(exc)
    mark = text.rfind(_DEBUG_MARK)
    if mark < 0:
        return _Failure()
    chain = text[mark + len(_DEBUG_MARK) :]
    status_match = _DEBUG_STATUS.search(chain)
    body_match = _DEBUG_BODY.search(chain)
    body = body_match.group(1) if body_match else ""
    code_match = _BODY_CODE.search(body) or _DEBUG_DELETE_CODE.search(chain)
    message_match = _BODY_MESSAGE.search(body)
    transport_match = _DEBUG_TRANSPORT.search(chain)
    io_kinds = [kind for kind in _DEBUG_IO_KIND.findall(chain) if kind.startswith("Connection")]
    uri_match = _DEBUG_URI.search(chain)
    certificate_match = _DEBUG_CERTIFICATE.search(chain)
    return _Failure(
        status=int(status_match.group(1)) if status_match else None,
        code=code_match.group(1) if code_match else None,
        message=message_match.group(1) if message_match else "",
        transport=transport_match.group(1) if transport_match else None,
        io_kind=io_kinds[0] if io_kinds else None,
        variants=frozenset(_DEBUG_VARIANT.findall(chain)),
        credential_lookup=bool(uri_match and uri_match.group(1).startswith(_CREDENTIAL_HOSTS)),
        certificate=certificate_match.group(1) if certificate_match else None,
    )


def _first_line(exc: BaseException) -> str:
    line = str(exc).split("\n", 1)[0].split("Debug source", 1)[0].strip()
    # Request URLs may carry signatures or SAS tokens in their query: never repeat those.
    return re.sub(r"\?\S*", "?...", line)


def _unquote(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


def _info(meta: Any) -> ObjectInfo:
    return ObjectInfo(
        key=meta["path"], size=meta["size"], last_modified=meta["last_modified"], etag=_unquote(meta["e_tag"])
    )


def _info_with_attributes(key: str, meta: Any, raw_attributes: Any) -> ObjectInfo:
    attributes = dict(raw_attributes)
    content_type = attributes.pop("Content-Type", None)
    for standard in ("Content-Disposition", "Content-Encoding", "Content-Language", "Cache-Control"):
        attributes.pop(standard, None)
    return ObjectInfo(
        key=key,
        size=meta["size"],
        last_modified=meta["last_modified"],
        etag=_unquote(meta["e_tag"]),
        metadata=attributes,
        content_type=content_type,
    )


def _attributes(options: PutOptions) -> dict[str, str]:
    attributes: dict[str, str] = dict(options.metadata)
    if options.content_type:
        attributes["Content-Type"] = options.content_type
    if options.storage_class:
        # obstore sends it as x-amz-storage-class on S3 and x-ms-access-tier on Azure.
        attributes["Storage-Class"] = options.storage_class
    return attributes
