"""The one interface every storage backend implements, and the records it speaks in.

A :class:`Store` is one bucket, container or local directory. Keys are ``/``-separated
strings relative to it, never starting with ``/``. Everything the transfer engine, the
service and the Orthanc plugin do to storage goes through these methods; backends hold
no transfer logic (no concurrency across objects, no progress, no retries beyond what
their client library does per request).

Contract, for every backend (checked by ``tests/integration/test_store_contract.py``):

- ``stat`` and every read raise :class:`~dicom_cloud.errors.NotFoundError` for a missing
  key, and :class:`~dicom_cloud.errors.BucketNotFoundError` when the bucket itself is missing.
- ``list`` yields objects in ascending byte order of key (the order S3 lists in), so that
  two listings can be merged in one pass with memory that does not grow with their length.
- ``put*`` are atomic: a reader sees the old object or the whole new one, never a part.
- ``delete`` of a missing key is not an error (as in S3).
- Optional abilities are declared in :class:`Features`; callers check them and fall back.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias

from .errors import DicomCloudError, NotSupportedError

if TYPE_CHECKING:
    from .resumable import ResumableUploads

#: What :meth:`Store.put_many` says of each object, in order: its error, or None when written.
PutOutcomes: TypeAlias = list[DicomCloudError | None]

#: Objects :meth:`Store.put_many` writes at once on stores whose writes are requests.
PUT_MANY_CONCURRENCY = 16

#: Metadata key under which dicom-cloud records the CRC32C (8 hex digits) of the whole object.
#: Underscores, not dashes: Azure metadata names must be identifiers.
CHECKSUM_METADATA_KEY = "dicom_cloud_crc32c"


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or a stat says about one object."""

    key: str
    size: int
    last_modified: datetime | None = None
    #: The store's entity tag, quotes removed. On S3 a single-part upload's ETag is its MD5.
    etag: str | None = None
    #: User metadata; only filled by ``stat`` (listings do not return it).
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: Content type, when the store reports it.
    content_type: str | None = None


@dataclass(frozen=True)
class BucketInfo:
    """One bucket or container of an account."""

    name: str
    #: When it was created, where the provider's listing says (S3, GCS; not Azure).
    created: datetime | None = None


@dataclass(frozen=True)
class Features:
    """Optional abilities of a store. The core checks these instead of the store's kind."""

    #: Copies between two keys of this store happen inside the server.
    server_side_copy: bool = False
    #: ``sign`` produces URLs that work without our credentials.
    presign: bool = False
    #: Object tags (S3 tagging, Azure index tags) are supported as well as metadata.
    object_tags: bool = False
    #: A single-part put's ETag is the MD5 of the content (S3 semantics), so it verifies uploads.
    etag_is_md5: bool = False
    #: ``open_writer`` gives a file that concurrent ranged downloads fill at offsets.
    random_access_write: bool = False
    #: ``list_buckets`` names the buckets or containers the credentials reach (the store may then
    #: be opened without a bucket of its own, for that call only).
    list_buckets: bool = False
    #: ``read_now`` reads with blocking system calls (local disk): a caller already in a worker
    #: thread reads there, without a hop of its own.
    read_now: bool = False


@dataclass(frozen=True)
class PutOptions:
    """How to write one object."""

    content_type: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    #: Fail with AlreadyExistsError instead of replacing an existing object.
    if_absent: bool = False
    #: Storage class of the new object: an S3 storage class (``STANDARD_IA``...) or an Azure access
    #: tier (``Cool``...). Stores that have no such notion ignore it.
    storage_class: str | None = None


@dataclass(frozen=True)
class PutResult:
    etag: str | None


@dataclass(frozen=True)
class MultipartPlan:
    """How a large put is cut: parts of ``part_size`` bytes, ``concurrency`` at a time."""

    part_size: int = 16 * 1024 * 1024
    concurrency: int = 8


class RandomAccessWriter(Protocol):
    """An object being written at arbitrary offsets; invisible until ``commit``, which also keeps
    the metadata and content type of ``options`` with it (when given)."""

    def write_at(self, offset: int, data: bytes | memoryview) -> None: ...
    def commit(self, if_absent: bool = False, options: PutOptions | None = None) -> None: ...
    def abort(self) -> None: ...


class RangeReader(Protocol):
    """Parts of objects read with blocking calls into one reused buffer each, in threads of its
    own (``Store.range_reader``): ranged downloads without a copy of every chunk on the way."""

    async def read(self, key: str, start: int, end: int, sink: Callable[[int, memoryview], None]) -> None:
        """Bytes ``[start, end)`` of ``key`` handed to ``sink`` in order as ``(offset, chunk)``, from
        a worker thread; a chunk's memory is reused once ``sink`` returns. Cancelled, it stops
        before the next chunk; ``sink`` must stay safe to call until the thread has noticed (a
        ``RandomAccessWriter`` refuses writes once aborted)."""
        ...

    def close(self) -> None:
        """Let its threads go (reads still running end on their own)."""
        ...


class Store(abc.ABC):
    """One bucket, container or directory, addressed by keys."""

    #: Scheme of the URLs this store answers (``s3``, ``gs``, ``azure``, ``file``, ``memory``).
    scheme: str
    #: Bucket, container, or root directory: used in messages and URLs.
    bucket: str
    features: Features = Features()

    def url(self, key: str = "") -> str:
        """The user-facing URL of a key in this store."""
        return f"{self.scheme}://{self.bucket}/{key}"

    async def list_buckets(self) -> list[BucketInfo]:
        """The account's buckets or containers, by name (only where ``features.list_buckets``)."""
        raise NotSupportedError(f"{self.scheme}:// locations cannot list buckets")

    @abc.abstractmethod
    async def stat(self, key: str) -> ObjectInfo:
        """Size, date, ETag and metadata of one object. NotFoundError if missing."""

    @abc.abstractmethod
    def list(self, prefix: str = "", *, recursive: bool = True) -> AsyncIterator[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (a plain string prefix), in ascending key order.

        With ``recursive=False`` only the level directly under ``prefix`` is listed: objects and
        "directories" (ObjectInfo with a key ending in ``/`` and size 0) merged in key order.
        A prefix ending in ``/`` (or empty) is the cheap case on every backend.
        """

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | memoryview:
        """The whole object, in memory. For objects below the multipart threshold."""

    async def read(self, key: str) -> tuple[ObjectInfo, bytes | memoryview]:
        """The whole object with its info and metadata. Backends override to use one request."""
        info = await self.stat(key)
        return info, await self.get(key)

    @abc.abstractmethod
    async def get_range(self, key: str, start: int, end: int) -> bytes | memoryview:
        """Bytes ``start`` (inclusive) to ``end`` (exclusive) of the object."""

    @abc.abstractmethod
    def stream(
        self, key: str, *, chunk_size: int = 1024 * 1024, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes | memoryview]:
        """Bytes ``start`` to ``end`` (exclusive; default: to the end) as chunks of about
        ``chunk_size``, holding at most about one chunk in memory."""

    @abc.abstractmethod
    async def put(self, key: str, data: bytes | memoryview, options: PutOptions = PutOptions()) -> PutResult:
        """Write a whole object from memory in one request."""

    async def put_many(self, items: Sequence[tuple[str, bytes | memoryview, PutOptions]]) -> PutOutcomes:
        """Write several whole objects (``(key, data, options)``), each as :meth:`put` writes it;
        the error of each, in order (None: written). An error that is not a
        :class:`~dicom_cloud.errors.DicomCloudError` is raised once every write has ended.
        Objects are written :data:`PUT_MANY_CONCURRENCY` at a time; a local disk overrides this
        to write them all in one worker-thread trip (a trip per object cost more than the write
        of a small one)."""
        slots = asyncio.Semaphore(PUT_MANY_CONCURRENCY)

        async def one(key: str, data: bytes | memoryview, options: PutOptions) -> None:
            async with slots:
                await self.put(key, data, options)

        outcomes = await asyncio.gather(*(one(*item) for item in items), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, DicomCloudError):
                raise outcome
        return [outcome if isinstance(outcome, DicomCloudError) else None for outcome in outcomes]

    @abc.abstractmethod
    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes | memoryview],
        options: PutOptions = PutOptions(),
        plan: MultipartPlan = MultipartPlan(),
    ) -> PutResult:
        """Write an object of unknown or large size from a stream of chunks (multipart where supported)."""

    async def put_file(
        self, key: str, path: Path, options: PutOptions = PutOptions(), plan: MultipartPlan = MultipartPlan()
    ) -> PutResult:
        """Write a local file of any size. Backends may override to read it in their own threads."""
        from .localio import read_chunks

        return await self.put_stream(key, read_chunks(path, plan.part_size), options, plan)

    @abc.abstractmethod
    async def delete(self, keys: Sequence[str]) -> None:
        """Delete objects; missing keys are ignored."""

    async def copy(self, src_key: str, dst_key: str) -> None:
        """Copy inside this store without moving bytes through the client (``features.server_side_copy``)."""
        raise NotSupportedError(f"{self.scheme}:// cannot copy objects inside the server")

    async def sign(self, key: str, expires: timedelta, method: Literal["GET", "PUT"] = "GET") -> str:
        """A URL that grants ``method`` on ``key`` until ``expires`` from now (``features.presign``)."""
        raise NotSupportedError(
            f"{self.scheme}:// cannot make presigned URLs",
            hint="share links exist for s3://, gs:// and azure:// locations",
        )

    def read_now(self, key: str) -> tuple[ObjectInfo, bytes | memoryview]:
        """:meth:`read` as a blocking call, for a worker thread (``features.read_now``)."""
        raise NotSupportedError(f"{self.scheme}:// objects are read by awaiting read()")

    def open_writer(self, key: str, size: int) -> RandomAccessWriter:
        """A writer for ``size`` bytes at ``key`` filled at any offsets (``features.random_access_write``)."""
        raise NotSupportedError(f"{self.scheme}:// cannot write objects at offsets")

    def resumable_uploads(self) -> ResumableUploads | None:
        """Multipart uploads that a later process can continue (docs/resume.md), or None when
        this store (or the credentials it was opened with) cannot offer them."""
        return None

    def range_reader(self) -> RangeReader | None:
        """Blocking ranged reads into reused buffers (the large-download path), or None when this
        store reads ranges through :meth:`stream` only."""
        return None

    async def remove_empty_directories(self, prefix: str, *, older_than: timedelta) -> int:
        """Remove the directories below ``prefix`` (a key ending in ``/``) that hold nothing and
        have not changed for ``older_than``; returns how many. Object stores have no directories
        (a "folder" is gone with its last object): nothing to do."""
        return 0

    async def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release connections. The store is unusable afterwards."""
