"""Google Cloud Storage through the google-cloud-storage SDK, which speaks the JSON API.

The JSON API rather than the XML one (which obstore uses) because the test server,
fake-gcs-server, only accepts writes through it. The SDK is blocking and its clients are
not documented as safe for concurrent use, so every call runs in a worker thread with that
thread's own client, and nothing bound to a client (iterators, readers) crosses threads.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import os
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import google.auth
import requests
import urllib3.exceptions
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry, retry_target
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials, Credentials, Signing
from google.auth.transport.requests import Request as AuthRequest
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.oauth2 import service_account

from ..errors import (
    AlreadyExistsError,
    AuthenticationError,
    BucketNotFoundError,
    DicomCloudError,
    IntegrityError,
    NetworkError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    ThrottledError,
    UsageError,
)
from ..retry import TRANSIENT_STATUS, RequestRetries
from ..store import BucketInfo, Features, MultipartPlan, ObjectInfo, PutOptions, PutResult, Store
from . import refuse_key_in_clear

if TYPE_CHECKING:
    from ..resumable import ResumableUploads
    from . import StoreConfig

_T = TypeVar("_T")

_GOOGLE_ENDPOINT = "https://storage.googleapis.com"
_DEFAULT_EMULATOR_PROJECT = "dicom-cloud"
#: Resumable upload chunks must be multiples of this (a GCS rule).
_CHUNK_QUANTUM = 256 * 1024
#: GCS refuses V4 signatures valid for longer than this.
_MAX_SIGN_LIFETIME = timedelta(days=7)
_LIST_PAGE_SIZE = 1000
_LIST_FIELDS = "items(name,size,updated,etag,contentType),prefixes,nextPageToken"
#: First and longest pause between retries, in seconds (doubling, with jitter, in between).
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    http.client.HTTPException,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    urllib3.exceptions.PoolError,
    urllib3.exceptions.SSLError,
)
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_CREDENTIALS_HINT = (
    "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file "
    "or run `gcloud auth application-default login`"
)


def open_gcs(bucket: str, config: StoreConfig) -> Store:
    """The store for ``gs://bucket``. Credentials are resolved on first use, in a worker thread."""
    return GCSStore(bucket, config)


class GCSStore(Store):
    """One GCS bucket. ``config.endpoint`` is ignored: it names S3 endpoints only.

    Server-side encryption (docs/server-side-encryption.md): ``config.sse_customer_key`` is a
    customer-supplied encryption key (CSEK), sent with every request that reads or writes object
    content; ``config.gcs_kms_key_name`` names the Cloud KMS key new objects are written under.
    The S3 and Azure options are ignored here ("AES256" is what GCS always does).
    """

    scheme = "gs"
    features = Features(
        server_side_copy=True, presign=True, object_tags=False, etag_is_md5=False, list_buckets=True
    )

    def __init__(self, bucket: str, config: StoreConfig) -> None:
        self.bucket = bucket
        self._emulator = _emulator_endpoint()
        self._endpoint = self._emulator or _GOOGLE_ENDPOINT
        self._timeout = (config.connect_timeout, config.request_timeout)
        self._max_retries = max(0, config.max_retries)
        self._encryption_key = config.sse_customer_key
        self._kms_key_name = config.gcs_kms_key_name
        if self._encryption_key is not None and self._kms_key_name is not None:
            raise UsageError(
                "gs:// objects are encrypted with a customer-supplied key or a Cloud KMS key, not both",
                hint="give either the customer key or the KMS key name",
            )
        if self._encryption_key is not None:
            refuse_key_in_clear(self._endpoint)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[storage.Client] = []
        self._credentials: Credentials | None = None
        self._project: str | None = None
        self._closed = False
        self._max_retries_config = config.max_retries
        self._resumable: ResumableUploads | None = None

    # -- reading -----------------------------------------------------------------------------

    async def list_buckets(self) -> list[BucketInfo]:
        """The buckets of the credentials' project (the emulator's: GOOGLE_CLOUD_PROJECT or test)."""

        def run(client: storage.Client) -> list[BucketInfo]:
            listing = client.list_buckets(timeout=self._timeout, retry=self._retry())
            return [BucketInfo(bucket.name, bucket.time_created) for bucket in listing]

        return await self._run(run, "")

    async def stat(self, key: str) -> ObjectInfo:
        def run(client: storage.Client) -> ObjectInfo:
            blob = self._blob(client, key)
            blob.reload(timeout=self._timeout, retry=self._retry())
            return _object_info(blob, with_metadata=True)

        return await self._run(run, key)

    async def list(self, prefix: str = "", *, recursive: bool = True) -> AsyncIterator[ObjectInfo]:
        token: str | None = None
        waiting: Sequence[str] = ()  # directory prefixes received but not yet yielded
        last = ""  # the greatest key yielded so far
        while True:
            objects, prefixes, token = await self._run(
                partial(self._list_page, prefix, recursive, token), prefix, missing_is_bucket=True
            )
            # GCS pages objects and prefixes together in key order, but fake-gcs-server sends
            # every prefix with every page: hold a prefix back until an object after it has
            # been listed (or the listing ends), and drop prefixes already yielded.
            pending = sorted({p for p in (*waiting, *prefixes) if p > last})
            limit = objects[-1].key if token and objects else None
            ready = [p for p in pending if limit is None or p < limit]
            waiting = pending[len(ready) :]
            page = sorted([*objects, *(ObjectInfo(key=p, size=0) for p in ready)], key=lambda i: i.key)
            for info in page:
                yield info
            if page:
                last = page[-1].key
            if not token:
                return

    async def get(self, key: str) -> bytes:
        def run(client: storage.Client) -> bytes:
            blob = self._blob(client, key)
            data: bytes = blob.download_as_bytes(
                raw_download=True, timeout=self._timeout, retry=self._retry()
            )
            return data

        return await self._run(run, key)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        if start < 0 or end < start:
            raise UsageError(f"invalid byte range {start}-{end} for {self.url(key)}")
        if end == start:
            # An empty range is no request at all, but a missing key must still be reported.
            await self.stat(key)
            return b""
        return await self._run(partial(self._download_range, key, None, start, end), key)

    async def stream(
        self, key: str, *, chunk_size: int = 1024 * 1024, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes | memoryview]:
        if chunk_size <= 0:
            raise UsageError(f"chunk size must be positive, not {chunk_size}")

        def head(client: storage.Client) -> tuple[int, int | None]:
            blob = self._blob(client, key)
            blob.reload(timeout=self._timeout, retry=self._retry())
            return int(blob.size or 0), blob.generation

        size, generation = await self._run(head, key)
        stop = size if end is None else min(end, size)
        position = start
        while position < stop:
            # Pinning the generation makes a concurrent overwrite fail the read instead of
            # splicing two versions together.
            chunk_end = min(position + chunk_size, stop)
            try:
                chunk = await self._run(
                    partial(self._download_range, key, generation, position, chunk_end), key
                )
            except NotFoundError as exc:
                if isinstance(exc, BucketNotFoundError):
                    raise
                raise IntegrityError(
                    f"{self.url(key)} was replaced or deleted while being read", hint="read it again"
                ) from exc
            if not chunk:
                raise IntegrityError(f"{self.url(key)} ended at byte {position} of {size}")
            position += len(chunk)
            yield chunk

    # -- writing -----------------------------------------------------------------------------

    async def put(self, key: str, data: bytes | memoryview, options: PutOptions = PutOptions()) -> PutResult:
        _check_options(self.url(key), options)

        def run(client: storage.Client) -> PutResult:
            blob = self._blob_for_put(client, key, options)
            # The SDK sends up to 8 MiB as one multipart request and larger bodies as one
            # resumable session; either way the object appears whole or not at all.
            blob.upload_from_string(
                bytes(data),
                content_type=options.content_type,
                if_generation_match=0 if options.if_absent else None,
                timeout=self._timeout,
                retry=self._retry(),
            )
            return PutResult(etag=blob.etag)

        return await self._run(run, key)

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes | memoryview],
        options: PutOptions = PutOptions(),
        plan: MultipartPlan = MultipartPlan(),
    ) -> PutResult:
        _check_options(self.url(key), options)
        iterator = aiter(chunks)
        first = b""
        while not first:
            chunk = await anext(iterator, None)
            if chunk is None:
                # A resumable session cannot carry zero bytes: an empty stream is a plain put.
                return await self.put(key, b"", options)
            first = bytes(chunk)
        reader = _ChunkReader(iterator, asyncio.get_running_loop(), first)

        def run(client: storage.Client) -> PutResult:
            blob = self._blob_for_put(client, key, options, chunk_size=_resumable_chunk_size(plan.part_size))
            blob.upload_from_file(
                reader,
                content_type=options.content_type,
                if_generation_match=0 if options.if_absent else None,
                timeout=self._timeout,
                retry=self._retry(),
            )
            return PutResult(etag=blob.etag)

        try:
            return await self._run(run, key)
        except BaseException:
            # The worker may still be uploading; failing its next read abandons the session,
            # so the object is never finalized from a partial stream.
            reader.abort()
            raise

    async def put_file(
        self, key: str, path: Path, options: PutOptions = PutOptions(), plan: MultipartPlan = MultipartPlan()
    ) -> PutResult:
        _check_options(self.url(key), options)

        def run(client: storage.Client) -> PutResult:
            try:
                f = path.open("rb")
            except FileNotFoundError as exc:
                raise NotFoundError(f"local file {path} not found") from exc
            with f:
                size = os.fstat(f.fileno()).st_size
                blob = self._blob_for_put(
                    client, key, options, chunk_size=_resumable_chunk_size(plan.part_size)
                )
                blob.upload_from_file(
                    f,
                    size=size,
                    content_type=options.content_type,
                    if_generation_match=0 if options.if_absent else None,
                    timeout=self._timeout,
                    retry=self._retry(),
                )
            return PutResult(etag=blob.etag)

        return await self._run(run, key)

    async def delete(self, keys: Sequence[str]) -> None:
        if not keys:
            return

        def run(client: storage.Client) -> None:
            bucket = client.bucket(self.bucket)
            bucket_checked = False
            for key in keys:
                try:
                    bucket.delete_blob(key, timeout=self._timeout, retry=self._retry())
                except api_exceptions.NotFound as exc:
                    # One bucket lookup per call tells "already gone" from "wrong bucket".
                    if not bucket_checked and self._bucket_missing(client, exc):
                        raise _bucket_not_found(self.bucket) from exc
                    bucket_checked = True

        await self._run(run, keys[0])

    async def copy(self, src_key: str, dst_key: str) -> None:
        def run(client: storage.Client) -> None:
            # With a customer key the SDK sends it for both ends (x-goog-copy-source-encryption-*);
            # with a KMS key the target carries destinationKmsKeyName.
            source, target = self._blob(client, src_key), self._blob(client, dst_key)
            token: str | None = None
            # Rewrite rather than copyTo: large copies across storage classes or locations
            # take several calls, each resuming from the token of the previous one.
            while True:
                token, _, _ = target.rewrite(source, token=token, timeout=self._timeout, retry=self._retry())
                if token is None:
                    return

        await self._run(run, src_key)

    async def sign(self, key: str, expires: timedelta, method: Literal["GET", "PUT"] = "GET") -> str:
        if not timedelta(0) < expires <= _MAX_SIGN_LIFETIME:
            raise UsageError(f"a gs:// signed URL must expire within 7 days, not {expires}")

        def run(client: storage.Client) -> str:
            blob = self._blob(client, key)
            url: str = blob.generate_signed_url(
                version="v4", expiration=expires, method=method, **self._signing_arguments()
            )
            return url

        return await self._run(run, key)

    async def sign_bound_put(self, key: str, expires: timedelta, *, content_type: str, size: int) -> str:
        """A V4 signed PUT URL that also signs ``Content-Type`` and ``x-goog-content-length-range:
        size,size``: GCS refuses a PUT that sends another content type or another number of bytes
        (the client must send both headers as given)."""
        if not timedelta(0) < expires <= _MAX_SIGN_LIFETIME:
            raise UsageError(f"a gs:// signed URL must expire within 7 days, not {expires}")

        def run(client: storage.Client) -> str:
            url: str = self._blob(client, key).generate_signed_url(
                version="v4",
                expiration=expires,
                method="PUT",
                content_type=content_type,
                headers={"x-goog-content-length-range": f"{size},{size}"},
                **self._signing_arguments(),
            )
            return url

        return await self._run(run, key)

    def resumable_uploads(self) -> ResumableUploads | None:
        # A customer key would have to travel with every chunk: not implemented, not resumable.
        if self._encryption_key is not None:
            return None
        if self._resumable is None:
            from .gcs_resumable import GCSResumableUploads

            self._resumable = GCSResumableUploads(
                bucket=self.bucket,
                endpoint=self._endpoint,
                authorize=self._authorization,
                kms_key_name=self._kms_key_name,
                status_query=self._emulator is None,
                max_retries=self._max_retries_config,
                timeout=self._timeout,
            )
        return self._resumable

    def _authorization(self) -> dict[str, str]:
        """Headers authorising one JSON API request made outside the SDK (blocking)."""
        from .gcs_resumable import authorization_from

        with self._lock:
            try:
                credentials, _ = self._resolve_credentials()
            except auth_exceptions.DefaultCredentialsError:
                raise AuthenticationError(f"no Google credentials found for {self.url()}") from None
        if isinstance(credentials, AnonymousCredentials):
            return {}
        return authorization_from(credentials, lambda: credentials.refresh(AuthRequest()))  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        if self._resumable is not None:
            await self._resumable.close()
        with self._lock:
            self._closed = True
            clients, self._clients = self._clients, []
        for client in clients:
            await asyncio.to_thread(client.close)

    # -- plumbing ----------------------------------------------------------------------------

    async def _run(
        self, fn: Callable[[storage.Client], _T], key: str, *, missing_is_bucket: bool = False
    ) -> _T:
        return await asyncio.to_thread(self._call, fn, key, missing_is_bucket)

    def _call(self, fn: Callable[[storage.Client], _T], key: str, missing_is_bucket: bool) -> _T:
        """Run ``fn`` with this thread's client, translating library errors into ours."""
        client: storage.Client | None = None
        try:
            client = self._client()
            return fn(client)
        except DicomCloudError:
            raise
        except Exception as exc:
            if missing_is_bucket or client is None:
                bucket_missing: Callable[[], bool] = partial(bool, missing_is_bucket)
            else:
                bucket_missing = partial(self._bucket_missing, client, exc)
            error = _translate(exc, self.url(key), self.bucket, self._endpoint, bucket_missing)
            if error is None:
                raise
            raise error from exc

    def _client(self) -> storage.Client:
        if self._closed:
            raise DicomCloudError(f"{self.url()} was used after close()")
        client: storage.Client | None = getattr(self._local, "client", None)
        if client is not None:
            return client
        with self._lock:
            credentials, project = self._resolve_credentials()
            options = {"api_endpoint": self._emulator} if self._emulator else None
            client = storage.Client(project=project, credentials=credentials, client_options=options)
            self._clients.append(client)
        self._local.client = client
        return client

    def _resolve_credentials(self) -> tuple[Credentials, str | None]:
        """Google's standard order, resolved once per store (under ``self._lock``)."""
        if self._credentials is None:
            if self._emulator:
                self._credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
                self._project = os.environ.get("GOOGLE_CLOUD_PROJECT") or _DEFAULT_EMULATOR_PROJECT
            else:
                # Covers GOOGLE_APPLICATION_CREDENTIALS, gcloud's file and the metadata server.
                self._credentials, self._project = google.auth.default(scopes=storage.Client.SCOPE)
        return self._credentials, self._project

    def _signing_arguments(self) -> dict[str, Any]:
        """How ``generate_signed_url`` gets a signature with the credentials at hand."""
        if self._emulator:
            # The emulator runs anonymously; only a key file can sign, and URLs must point at it.
            return {"credentials": _key_file_credentials(), "api_access_endpoint": self._emulator}
        credentials = self._credentials
        if isinstance(credentials, Signing):
            return {}
        if credentials is not None and hasattr(credentials, "service_account_email"):
            # Metadata-server and federated identities sign through the IAM signBlob API; the
            # metadata server names its account ("default" until then) only once refreshed.
            if not credentials.valid or credentials.service_account_email == "default":
                credentials.refresh(AuthRequest())  # type: ignore[no-untyped-call]
            return {
                "service_account_email": credentials.service_account_email,
                "access_token": credentials.token,
            }
        raise NotSupportedError(
            f"the current Google credentials cannot sign URLs for {self.url()}",
            hint="set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file to make share links",
        )

    def _retry(self) -> Retry | None:
        if self._max_retries == 0:
            return None
        policy = RequestRetries(retries=self._max_retries, timeout=self._timeout[1])
        return _CountedRetry(policy, self._timeout[1] * (self._max_retries + 1))

    def _blob(
        self,
        client: storage.Client,
        key: str,
        *,
        chunk_size: int | None = None,
        generation: int | None = None,
    ) -> Any:
        """A Blob carrying this store's encryption settings, which the SDK turns into request
        headers (x-goog-encryption-*, for a customer key) or the kmsKeyName parameter of uploads."""
        return client.bucket(self.bucket).blob(
            key,
            chunk_size=chunk_size,
            generation=generation,
            encryption_key=self._encryption_key,
            kms_key_name=self._kms_key_name,
        )

    def _blob_for_put(
        self, client: storage.Client, key: str, options: PutOptions, *, chunk_size: int | None = None
    ) -> Any:
        blob = self._blob(client, key, chunk_size=chunk_size)
        if options.metadata:
            blob.metadata = dict(options.metadata)
        if options.if_absent and blob.exists(timeout=self._timeout, retry=self._retry()):
            # ifGenerationMatch=0 still guards the race on GCS, but fake-gcs-server ignores it on
            # resumable uploads; checking first also refuses before any byte is sent.
            raise AlreadyExistsError(f"{self.url(key)} already exists")
        return blob

    def _list_page(
        self, prefix: str, recursive: bool, token: str | None, client: storage.Client
    ) -> tuple[Sequence[ObjectInfo], Sequence[str], str | None]:
        """One page of a listing (objects, prefixes, next token), fetched with this thread's client."""
        iterator = client.list_blobs(
            self.bucket,
            prefix=prefix or None,
            delimiter=None if recursive else "/",
            page_token=token,
            page_size=_LIST_PAGE_SIZE,
            fields=_LIST_FIELDS,
            timeout=self._timeout,
            retry=self._retry(),
        )
        page = next(iterator.pages, None)
        if page is None:
            return (), (), None
        return [_object_info(blob) for blob in page], tuple(page.prefixes), iterator.next_page_token

    def _download_range(
        self, key: str, generation: int | None, start: int, end: int, client: storage.Client
    ) -> bytes:
        blob = self._blob(client, key, generation=generation)
        try:
            data: bytes = blob.download_as_bytes(
                start=start,
                end=end - 1,  # the SDK's end is inclusive
                raw_download=True,
                checksum=None,  # GCS hashes cover whole objects, never ranges
                timeout=self._timeout,
                retry=self._retry(),
            )
        except api_exceptions.RequestRangeNotSatisfiable:
            # A range starting at or after the end: nothing there, as for a local file.
            return b""
        return data

    def _bucket_missing(self, client: storage.Client, exc: Exception) -> bool:
        """Whether a 404 meant the bucket rather than the object: only asked on the error path."""
        reason = _server_reason(exc).lower()
        if "no such object" in reason:
            return False
        if "bucket" in reason and "not exist" in reason:
            return True
        try:
            client.bucket(self.bucket).reload(timeout=self._timeout, retry=None)
        except api_exceptions.NotFound:
            return True
        except Exception:  # e.g. no storage.buckets.get permission: assume the object
            return False
        return False


class _ChunkReader:
    """A blocking file-like view of an async chunk stream, for the SDK's resumable upload.

    The upload thread pulls each chunk from the event loop only when it needs it, and each
    read is assembled in a BytesIO whose buffer becomes the returned bytes without a copy,
    so this holds at most one upload chunk plus one incoming chunk. It never reports end of
    file early: a failure or an abort raises, which leaves the upload session unfinalized.
    """

    def __init__(
        self, chunks: AsyncIterator[bytes | memoryview], loop: asyncio.AbstractEventLoop, first: bytes
    ) -> None:
        self._chunks = chunks
        self._loop = loop
        self._leftover = memoryview(first)
        self._position = 0
        self._eof = False
        self._aborted = threading.Event()
        self._pending: Future[bytes | memoryview | None] | None = None

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        out = io.BytesIO()
        while size < 0 or out.tell() < size:
            if not self._leftover and (self._eof or not self._pull()):
                break
            room = len(self._leftover) if size < 0 else size - out.tell()
            out.write(self._leftover[:room])
            self._leftover = self._leftover[room:]
        self._position += out.tell()
        return out.getvalue()

    def _pull(self) -> bool:
        """Fetch the next chunk into ``_leftover``; False at the end of the stream."""
        if self._aborted.is_set():
            raise _UploadAborted("the upload was abandoned")
        self._pending = asyncio.run_coroutine_threadsafe(_next_chunk(self._chunks), self._loop)
        chunk = self._pending.result()
        if chunk is None:
            self._eof = True
            return False
        self._leftover = memoryview(chunk)
        return True

    def abort(self) -> None:
        self._aborted.set()
        if self._pending is not None:
            self._pending.cancel()


class _UploadAborted(Exception):
    """Raised inside the upload thread when its caller has gone away."""


async def _next_chunk(chunks: AsyncIterator[bytes | memoryview]) -> bytes | memoryview | None:
    return await anext(chunks, None)


def _emulator_endpoint() -> str | None:
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if not host:
        return None
    # The variable is often a bare host:port, which the SDK would use as a malformed URL.
    return (host if "://" in host else f"http://{host}").rstrip("/")


def _key_file_credentials() -> Credentials:
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if not path:
        raise NotSupportedError(
            "signing gs:// URLs against the storage emulator needs a service-account key",
            hint="a service-account key file is needed: set GOOGLE_APPLICATION_CREDENTIALS to one",
        )
    try:
        credentials: Credentials = service_account.Credentials.from_service_account_file(path)  # type: ignore[no-untyped-call]
    except OSError as exc:
        raise UsageError(f"cannot read GOOGLE_APPLICATION_CREDENTIALS file {path}") from exc
    except (ValueError, KeyError) as exc:
        raise NotSupportedError(
            f"GOOGLE_APPLICATION_CREDENTIALS file {path} is not a service-account key",
            hint="signing gs:// URLs needs a service-account key file with a private key",
        ) from exc
    return credentials


def _check_options(url: str, options: PutOptions) -> None:
    if options.tags:
        raise NotSupportedError(f"{url}: GCS has no object tags", hint="store the values as metadata instead")


def _resumable_chunk_size(part_size: int) -> int:
    return max(_CHUNK_QUANTUM, part_size - part_size % _CHUNK_QUANTUM)


def _object_info(blob: Any, *, with_metadata: bool = False) -> ObjectInfo:
    metadata: Mapping[str, str] = dict(blob.metadata or {}) if with_metadata else {}
    return ObjectInfo(
        key=blob.name,
        size=int(blob.size or 0),
        last_modified=blob.updated,
        etag=blob.etag,
        metadata=metadata,
        content_type=blob.content_type,
    )


class _CountedRetry(Retry):
    """google-api-core's Retry under the request layer of the retry policy (retry.py): at most
    ``policy.retries`` retries per request, the same doubling waits as the other HTTP stacks, and a
    server's Retry-After as a floor under the wait (api-core itself ignores it).

    api_core's Retry only bounds time, and one Retry object serves every chunk request of a
    resumable upload, so each call it wraps gets its own count.
    """

    def __init__(self, policy: RequestRetries, deadline: float) -> None:
        super().__init__(
            predicate=_is_transient,
            initial=policy.first_delay,
            maximum=policy.max_delay,
            multiplier=2.0,
            timeout=deadline,
        )
        self._policy = policy
        self._deadline_seconds = deadline

    def __call__(
        self, func: Callable[..., Any], on_error: Callable[[Exception], Any] | None = None
    ) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            remaining = self._policy.retries
            latest_retry_after: float | None = None

            def predicate(exc: Exception) -> bool:
                nonlocal remaining, latest_retry_after
                remaining -= 1
                latest_retry_after = _retry_after(exc)
                return remaining >= 0 and _is_transient(exc)

            return retry_target(
                partial(func, *args, **kwargs),
                predicate,
                self._policy.sleeps(lambda: latest_retry_after),
                timeout=self._deadline_seconds,
                on_error=on_error,
            )

        return wrapped


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return exc.code in TRANSIENT_STATUS
    if isinstance(exc, InvalidResponse):
        return exc.response.status_code in TRANSIENT_STATUS
    if isinstance(exc, auth_exceptions.TransportError):
        return True
    return isinstance(exc, _TRANSIENT_TYPES)


def _translate(
    exc: Exception, url: str, bucket: str, endpoint: str, bucket_missing: Callable[[], bool]
) -> DicomCloudError | None:
    """Our error for a library exception, or None for exceptions that are not the store's."""
    if isinstance(exc, api_exceptions.RetryError) and isinstance(exc.cause, Exception):
        exc = exc.cause
    if isinstance(exc, auth_exceptions.DefaultCredentialsError):
        return AuthenticationError(f"no Google credentials found for {url}", hint=_CREDENTIALS_HINT)
    if isinstance(exc, auth_exceptions.RefreshError):
        return AuthenticationError(f"Google refused the credentials for {url}", hint=_CREDENTIALS_HINT)
    if isinstance(exc, DataCorruption):
        return IntegrityError(f"{url}: checksum mismatch between client and server")
    status = _status_of(exc)
    if status is not None:
        error = _from_status(status, _server_reason(exc), url, bucket, bucket_missing)
        if isinstance(error, ThrottledError):
            error.retry_after = _retry_after(exc)
        return error
    if isinstance(exc, (auth_exceptions.TransportError, requests.RequestException, *_TRANSIENT_TYPES)):
        if isinstance(exc, auth_exceptions.TransportError):
            endpoint = "Google's token service"  # credentials are refreshed before the request
        return NetworkError(f"cannot reach {endpoint} for {url}: {_network_reason(exc)}")
    return None


def _from_status(
    status: int, reason: str, url: str, bucket: str, bucket_missing: Callable[[], bool]
) -> DicomCloudError:
    detail = f" ({reason})" if reason else ""
    if status == 404:
        return _bucket_not_found(bucket) if bucket_missing() else NotFoundError(f"{url} not found")
    if status == 412:
        return AlreadyExistsError(f"{url} already exists")
    if status == 401:
        return AuthenticationError(
            f"Google refused the credentials for {url}{detail}", hint=_CREDENTIALS_HINT
        )
    if status == 403:
        return PermissionDeniedError(f"permission denied on {url}{detail}")
    if status in (429, 503):
        return ThrottledError(f"GCS asked to slow down on {url} (HTTP {status}){detail}")
    if status == 408 or status >= 500:
        return NetworkError(f"GCS failed on {url} (HTTP {status}){detail}")
    if status == 400:
        return UsageError(f"GCS rejected the request for {url}{detail}")
    return DicomCloudError(f"GCS answered HTTP {status} for {url}{detail}")


def _bucket_not_found(bucket: str) -> BucketNotFoundError:
    return BucketNotFoundError(
        f"bucket gs://{bucket} does not exist", hint="check the bucket name and the project it belongs to"
    )


def _status_of(exc: Exception) -> int | None:
    if isinstance(exc, api_exceptions.GoogleAPICallError) and exc.code is not None:
        return int(exc.code)
    if isinstance(exc, InvalidResponse):
        return int(exc.response.status_code)
    return None


def _retry_after(exc: Exception) -> float | None:
    """The Retry-After header of a throttling answer, in seconds (the delta-seconds form only)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: rare for storage APIs, and the backoff applies anyway
        return None


def _server_reason(exc: Exception) -> str:
    """The server's own one-line explanation, without the request URL the SDK prepends."""
    reason = ""
    errors = getattr(exc, "errors", None)
    if errors and isinstance(errors[0], Mapping):
        reason = str(errors[0].get("message", ""))
    if not reason:
        response = getattr(exc, "response", None)
        try:
            reason = str(response.json()["error"]["message"]) if response is not None else ""
        except Exception:  # a non-JSON body (media endpoints) gives no reason
            reason = ""
    return " ".join(reason.split())[:200]


def _network_reason(exc: BaseException) -> str:
    """The innermost OS-level cause (e.g. "Connection refused"), never a URL or header."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        nested = getattr(current, "reason", None)
        if isinstance(nested, BaseException):
            current = nested
            continue
        arg = current.args[0] if current.args else None
        current = arg if isinstance(arg, BaseException) else (current.__cause__ or current.__context__)
    if isinstance(exc, requests.Timeout | TimeoutError | urllib3.exceptions.TimeoutError):
        return "timed out"
    return type(exc).__name__
