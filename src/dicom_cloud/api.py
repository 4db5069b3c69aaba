"""The library API: every operation the CLI, the service and the Orthanc plugin perform, by URL.

Each operation is a plain function with an async twin (``upload`` / ``upload_async``).
Locations are URLs (``s3://bucket/key``, ``gs://``, ``azure://``, ``file://`` or a path);
connection settings that are not in a URL go in a :class:`StoreConfig`; credentials come
from the environment as documented in ``docs/credentials.md``.

>>> from dicom_cloud import api
>>> summary = api.upload("study/", "s3://archive/studies/1/", recursive=True)  # doctest: +SKIP
>>> print(summary.files, summary.bytes)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .backends import StoreConfig, open_store
from .checksum import crc32c_hex
from .crypto.envelope import ClientEncryption
from .crypto.keys import KeyRing
from .errors import NotFoundError, NotSupportedError, UsageError
from .filters import Filter
from .journal import JobSpec, Journal
from .localio import resolves_within
from .location import Location, LocationOpener
from .store import CHECKSUM_METADATA_KEY, BucketInfo, ObjectInfo, PutOptions
from .transfer import EventCallback, Transfer, TransferOptions, TransferSummary, verify
from .url import StorageURL, account_scheme

if TYPE_CHECKING:  # imported where used: most commands need none of them
    from .dicom.manifest import ManifestWriter
    from .dicom.uidmap import UidMapLog
    from .sync import Copier, PlanCallback, SyncOptions, SyncSummary
    from .treediff import DifferenceCallback, VerifyResult

T = TypeVar("T")

#: Objects deleted per request (the S3 bulk-delete maximum).
DELETE_BATCH = 1000


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from synchronous code (the sync twins)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError("called a synchronous dicom-cloud function inside an event loop: use the _async twin")


# -- transfers --------------------------------------------------------------------------


async def transfer_async(
    source: str,
    destination: str,
    *,
    recursive: bool = False,
    options: TransferOptions | None = None,
    config: StoreConfig | None = None,
    on_event: EventCallback | None = None,
    require: Literal["upload", "download", "copy"] = "copy",
    manifest: str | None = None,
    deid_map: str | None = None,
    job: JobRequest | None = None,
) -> TransferSummary:
    """Copy one object or a tree from ``source`` to ``destination`` (any two locations).

    ``manifest``: a ``.jsonl``, ``.csv`` or ``.parquet`` path receiving one row per object
    (UIDs, key, size, CRC32C, status), written as the transfer goes.

    ``job``: keep a journal (journal.py) of a recursive transfer, or of a large file's upload, so
    that running it again after an interruption skips what is done and continues large uploads.
    """
    opener = LocationOpener(config)
    writer: ManifestWriter | None = None
    if manifest:
        from .dicom.manifest import ManifestWriter

        writer = ManifestWriter.open(manifest)
    uid_log: UidMapLog | None = None
    if deid_map:
        from .dicom.uidmap import UidMapLog

        uid_log = UidMapLog(deid_map)
    if uid_log is not None:
        options = replace(options or TransferOptions(), on_uid_map=uid_log.write)
    try:
        src, dst = open_transfer_locations(opener, source, destination, require)
        journal = open_journal(job, require, src, dst, recursive, options)
        transfer = Transfer(
            src,
            dst,
            recursive=recursive,
            options=options,
            on_event=on_event,
            manifest=writer,
            journal=journal,
        )
        try:
            summary = await transfer.run()
        except BaseException:
            if journal is not None:
                journal.close()  # interrupted: the journal stays for the next run
            raise
        if journal is not None:
            # A job with no failures is forgotten; failures stay recorded, retried by running it again.
            journal.finish(failed=len(summary.failed))
        if writer is not None:
            writer.close()
        return summary
    except BaseException:
        if writer is not None:
            writer.abort()  # kept as <name>.partial for inspection
        raise
    finally:
        if uid_log is not None:
            uid_log.close()
        await opener.close()


@dataclass(frozen=True)
class JobRequest:
    """Ask a transfer to keep a journal: the command line that started it (for ``resume``), and
    the options that change what is written (part of the job's identity)."""

    options: Mapping[str, Any]
    argv: tuple[str, ...] = ()
    cwd: str = ""
    #: Where job files live (default: journal.jobs_dir()).
    directory: str | None = None


def open_transfer_locations(
    opener: LocationOpener, source: str, destination: str, require: Literal["upload", "download", "copy"]
) -> tuple[Location, Location]:
    """The two locations of a transfer, refused when they do not fit the verb or the encryption."""
    src = opener.open(source)
    dst = opener.open(destination)
    opener.config.check_encryption_applies({src.url.scheme, dst.url.scheme})
    if require == "upload" and not src.is_local:
        raise UsageError(f"upload reads local files; {source} is remote", hint="use copy or download")
    if require == "download" and not dst.is_local:
        raise UsageError(f"download writes local files; {destination} is remote", hint="use copy")
    return src, dst


def open_journal(
    job: JobRequest | None,
    verb: str,
    src: Location,
    dst: Location,
    recursive: bool,
    options: TransferOptions | None,
) -> Journal | None:
    if job is None or (options is not None and options.dry_run):
        return None
    threshold = (options or TransferOptions()).multipart_threshold
    if not recursive and not (src.is_local and _file_size("/" + src.key) > threshold):
        return None  # one small object: nothing to resume that re-running does not redo as fast
    spec = JobSpec(
        verb=verb,
        source=src.display(src.key),
        destination=dst.display(dst.key),
        options={**job.options, "recursive": recursive},
        argv=job.argv,
        cwd=job.cwd,
    )
    return Journal.open(spec, Path(job.directory) if job.directory else None)


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


async def sync_async(
    source: str,
    destination: str,
    *,
    options: TransferOptions | None = None,
    sync: SyncOptions | None = None,
    config: StoreConfig | None = None,
    on_event: EventCallback | None = None,
    on_plan: PlanCallback | None = None,
    copier: Copier | None = None,
    job: JobRequest | None = None,
) -> SyncSummary:
    """Make ``destination`` hold what ``source`` holds (both are trees: prefixes or directories).

    Copies what is new or changed (size, then content checksum; the journal's record of the last
    sync as the fast path), deletes extraneous destination objects with ``SyncOptions.delete`` (at
    most ``max_delete`` of them), or merges both ways with ``bidirectional``. See sync.py.
    """
    from .sync import Sync, SyncOptions

    options = options or TransferOptions()
    sync = sync or SyncOptions()
    job = job or JobRequest(options={})
    opener = LocationOpener(config)
    try:
        src = opener.open(source)
        dst = opener.open(destination)
        opener.config.check_encryption_applies({src.url.scheme, dst.url.scheme})
        for side in (src, dst):
            _require_local_directory(side, create=side is dst and not sync.bidirectional)
        spec = JobSpec(
            verb="sync",
            source=src.display(src.prefix),
            destination=dst.display(dst.prefix),
            # One state per pair of trees, whatever the options: one-way and two-way runs share it,
            # and the lock keeps any two syncs of the same pair from running at once.
            options={},
            argv=job.argv,
            cwd=job.cwd,
        )
        journal = Journal.open(
            spec, Path(job.directory) if job.directory else None, record=not options.dry_run
        )
        try:
            summary = await Sync(
                src,
                dst,
                journal,
                transfer=options,
                options=sync,
                on_event=on_event,
                on_plan=on_plan,
                copier=copier,
            ).run()
        except BaseException:
            journal.close()
            raise
        if options.dry_run:
            journal.close()
        else:
            journal.finish(failed=len(summary.failed), keep=True)
        return summary
    finally:
        await opener.close()


async def verify_async(
    source: str,
    destination: str,
    *,
    config: StoreConfig | None = None,
    on_difference: DifferenceCallback,
    parallel: int = 16,
    name_filter: Filter | None = None,
) -> VerifyResult:
    """Compare two trees by name, size and content checksum; report each difference. When
    ``source`` names one object (a file, or an object key), compare it with the one object
    ``destination`` names (the same name inside it when it is a directory or ends with ``/``)."""
    from .treediff import verify_object, verify_trees

    opener = LocationOpener(config)
    try:
        a = opener.open(source)
        b = opener.open(destination)
        if await _names_one_object(a):
            if name_filter is not None:
                raise UsageError(
                    "--include, --exclude and --files-from select names in trees;"
                    f" {a.display()} is one object"
                )
            into = b.names_directory or (b.is_local and os.path.isdir("/" + b.key))
            b_key = b.join(a.basename()) if into else b.key
            return await verify_object(a, a.key, b, b_key, on_difference=on_difference, name=b.display(b_key))
        for side in (a, b):
            _require_local_directory(side)
        return await verify_trees(
            a, b, on_difference=on_difference, parallel=parallel, name_filter=name_filter
        )
    finally:
        await opener.close()


async def upload_async(source: str, destination: str, **kwargs: Any) -> TransferSummary:
    """Upload a local file or directory (``recursive=True``) to any location."""
    return await transfer_async(source, destination, require="upload", **kwargs)


async def download_async(source: str, destination: str, **kwargs: Any) -> TransferSummary:
    """Download an object or a prefix (``recursive=True``) to a local path."""
    return await transfer_async(source, destination, require="download", **kwargs)


async def copy_async(source: str, destination: str, **kwargs: Any) -> TransferSummary:
    """Copy between any two locations; server-side inside one bucket, streamed across providers."""
    return await transfer_async(source, destination, require="copy", **kwargs)


def upload(source: str, destination: str, **kwargs: Any) -> TransferSummary:
    """Synchronous :func:`upload_async`."""
    return _run(upload_async(source, destination, **kwargs))


def download(source: str, destination: str, **kwargs: Any) -> TransferSummary:
    """Synchronous :func:`download_async`."""
    return _run(download_async(source, destination, **kwargs))


def copy(source: str, destination: str, **kwargs: Any) -> TransferSummary:
    """Synchronous :func:`copy_async`."""
    return _run(copy_async(source, destination, **kwargs))


# -- listing ----------------------------------------------------------------------------


async def list_async(
    url: str, *, recursive: bool = False, config: StoreConfig | None = None, metadata: bool = False
) -> AsyncIterator[ObjectInfo]:
    """Objects (and, without ``recursive``, sub-"directories" ending in ``/``) under ``url``.

    A URL ending in ``/`` (or naming a bucket) lists inside it; otherwise its key is a
    plain prefix, as with ``aws s3 ls``. Keys are yielded relative to the store's root.
    Streams: memory does not grow with the number of objects.
    """
    opener = LocationOpener(config)
    try:
        location = opener.open(url)
        prefix = location.key if not location.is_local else location.prefix
        _require_local_directory(location)
        listing = location.store.list(prefix, recursive=recursive)
        if not metadata:
            async for info in listing:
                yield info
            return
        # Listings carry no metadata: one stat per object, 32 in flight, yielded in listing order.
        ahead: collections.deque[asyncio.Task[ObjectInfo]] = collections.deque()
        store = location.store

        async def with_metadata(info: ObjectInfo) -> ObjectInfo:
            return info if info.key.endswith("/") else await store.stat(info.key)

        try:
            async for info in listing:
                ahead.append(asyncio.create_task(with_metadata(info)))
                if len(ahead) >= 32:
                    yield await ahead.popleft()
            while ahead:
                yield await ahead.popleft()
        finally:
            for task in ahead:
                task.cancel()
    finally:
        await opener.close()


async def list_buckets_async(url: str, *, config: StoreConfig | None = None) -> list[BucketInfo]:
    """The buckets (S3, GCS) or containers (Azure) the credentials reach, for ``s3://``, ``gs://``
    or ``azure://`` without a bucket, sorted by name. NotSupportedError for other locations."""
    scheme = account_scheme(url)
    if scheme is None:
        raise UsageError(f"'{url}' does not name an account", hint="give s3://, gs:// or azure:// alone")
    store = open_store(StorageURL(scheme=scheme, bucket="", key=""), config or StoreConfig())
    try:
        if not store.features.list_buckets:
            raise NotSupportedError(f"{scheme}:// cannot list its buckets")
        return sorted(await store.list_buckets(), key=lambda bucket: bucket.name)
    finally:
        await store.close()


def list_buckets(url: str, *, config: StoreConfig | None = None) -> list[BucketInfo]:
    """Synchronous :func:`list_buckets_async`."""
    return _run(list_buckets_async(url, config=config))


def list_objects(url: str, *, recursive: bool = False, config: StoreConfig | None = None) -> list[ObjectInfo]:
    """Synchronous :func:`list_async`, collected into a list (use the async twin for huge trees)."""

    async def collect() -> list[ObjectInfo]:
        return [info async for info in list_async(url, recursive=recursive, config=config)]

    return _run(collect())


async def stat_async(url: str, *, config: StoreConfig | None = None) -> ObjectInfo:
    """Size, date, ETag and metadata of one object."""
    async with _opened(url, config) as location:
        return await location.store.stat(location.key)


def stat(url: str, *, config: StoreConfig | None = None) -> ObjectInfo:
    return _run(stat_async(url, config=config))


# -- single objects in memory ----------------------------------------------------------


async def read_bytes_async(
    url: str, *, config: StoreConfig | None = None, keys: KeyRing | None = None, raw: bool = False
) -> bytes:
    """The whole object at ``url``, checked against its stored checksum, and decrypted when it is
    client-side encrypted (``keys`` must then hold its master key: KeyMissingError otherwise).
    ``raw=True`` returns the stored bytes as they are (ciphertext included), still checked."""
    async with _opened(url, config) as location:
        info, data = await location.store.read(location.key)
        verify(data, info, url, etag_is_md5=location.store.features.etag_is_md5)
        if raw:
            return bytes(data)
        crypt = ClientEncryption(ring=keys)
        fmt = crypt.detect(location.key, info.metadata)
        if fmt is not None:
            return crypt.decrypt(url, fmt, info.metadata, data)
        return bytes(data)


def read_bytes(
    url: str, *, config: StoreConfig | None = None, keys: KeyRing | None = None, raw: bool = False
) -> bytes:
    return _run(read_bytes_async(url, config=config, keys=keys, raw=raw))


async def write_bytes_async(
    url: str,
    data: bytes,
    *,
    metadata: Mapping[str, str] | None = None,
    content_type: str | None = None,
    config: StoreConfig | None = None,
) -> None:
    """Write ``data`` as the object at ``url`` (atomically), with optional metadata."""
    meta = dict(metadata or {})
    meta[CHECKSUM_METADATA_KEY] = crc32c_hex(data)
    async with _opened(url, config) as location:
        options = PutOptions(content_type=content_type or "application/dicom", metadata=meta)
        await location.store.put(location.key, data, options)


def write_bytes(url: str, data: bytes, **kwargs: Any) -> None:
    _run(write_bytes_async(url, data, **kwargs))


# -- delete -----------------------------------------------------------------------------


@dataclass
class DeleteSummary:
    objects: int = 0
    bytes: int = 0
    dry_run: bool = False
    keys: list[str] = field(default_factory=list)


async def delete_async(
    url: str,
    *,
    recursive: bool = False,
    dry_run: bool = False,
    config: StoreConfig | None = None,
    on_deleted: Callable[[ObjectInfo], None] | None = None,
) -> DeleteSummary:
    """Delete one object, or every object under a prefix with ``recursive=True``.

    A missing object is a :class:`NotFoundError` (so that typos do not pass silently).
    With ``dry_run`` nothing is deleted and ``on_deleted`` is called for what would be.
    """
    summary = DeleteSummary(dry_run=dry_run)
    report = on_deleted or (lambda _: None)
    async with _opened(url, config) as location:
        store = location.store
        if not recursive:
            info = await location.stat_object("delete")
            if not dry_run:
                await store.delete([location.key])
            summary.objects, summary.bytes = 1, info.size
            report(info)
            return summary
        batch: list[ObjectInfo] = []

        async def flush() -> None:
            if batch and not dry_run:
                await store.delete([i.key for i in batch])
            for info in batch:
                summary.objects += 1
                summary.bytes += info.size
                report(info)
            batch.clear()

        prefix = location.prefix
        _require_local_directory(location)
        async for info in store.list(prefix):
            if location.is_local and not resolves_within("/" + prefix, "/" + info.key):
                # Reached through a symbolic link to a directory elsewhere: not ours to delete.
                continue
            batch.append(info)
            if len(batch) >= DELETE_BATCH:
                await flush()
        await flush()
        if summary.objects == 0 and not location.is_local:
            raise NotFoundError(f"nothing found under {location.display(prefix)}")
        return summary


def delete(url: str, **kwargs: Any) -> DeleteSummary:
    """Synchronous :func:`delete_async`."""
    return _run(delete_async(url, **kwargs))


async def count_async(url: str, *, config: StoreConfig | None = None) -> tuple[int, int]:
    """Number of objects and bytes under a prefix (what a recursive delete would remove)."""
    objects = total = 0
    async with _opened(url, config) as location:
        async for info in location.store.list(location.prefix):
            objects += 1
            total += info.size
    return objects, total


# -- share ------------------------------------------------------------------------------


async def share_async(
    url: str,
    *,
    expires: timedelta = timedelta(hours=1),
    method: Literal["GET", "PUT"] = "GET",
    config: StoreConfig | None = None,
    check_exists: bool = True,
) -> str:
    """A presigned URL for one object, valid for ``expires`` (S3, GCS and Azure)."""
    if expires <= timedelta(0):
        raise UsageError("expiry must be positive")
    async with _opened(url, config) as location:
        if check_exists and method == "GET":
            await location.store.stat(location.key)
        return await location.store.sign(location.key, expires, method)


async def share_many_async(
    url: str, *, expires: timedelta = timedelta(hours=1), config: StoreConfig | None = None
) -> AsyncIterator[tuple[str, str]]:
    """(object URL, presigned URL) for every object under a prefix; NotFoundError when there is none."""
    if expires <= timedelta(0):
        raise UsageError("expiry must be positive")
    async with _opened(url, config) as location:
        found = False
        async for info in location.store.list(location.prefix):
            if info.key.endswith("/"):
                continue  # folder markers
            found = True
            yield location.display(info.key), await location.store.sign(info.key, expires)
        if not found:
            raise NotFoundError(f"nothing found under {location.display(location.prefix)}")


def share(url: str, **kwargs: Any) -> str:
    """Synchronous :func:`share_async`."""
    return _run(share_async(url, **kwargs))


async def _names_one_object(location: Location) -> bool:
    """Whether a location names one object (a local file, an existing object key), not a tree."""
    if location.names_directory or not location.key.strip("/"):
        return False
    if location.is_local:
        return os.path.isfile("/" + location.key)
    try:
        await location.store.stat(location.key)
    except NotFoundError:
        return False
    return True


def _require_local_directory(location: Location, *, create: bool = False) -> None:
    """A missing local directory is an error (a missing bucket prefix is merely empty), unless
    it is a destination to ``create``."""
    path = "/" + location.key.rstrip("/")
    if not location.is_local or os.path.isdir(path):
        return
    if create and not Path(path).exists():
        Path(path).mkdir(parents=True, exist_ok=True)
        return
    raise NotFoundError(f"{location.display()}: no such directory")


class _opened:
    """``async with _opened(url, config) as location``: a location whose store is closed after."""

    def __init__(self, url: str, config: StoreConfig | None) -> None:
        self._opener = LocationOpener(config)
        self._url = url

    async def __aenter__(self) -> Location:
        return self._opener.open(self._url)

    async def __aexit__(self, *exc: object) -> None:
        await self._opener.close()


# -- studies ----------------------------------------------------------------------------


@dataclass
class StudySummary:
    """What a prefix holds of one study, from object metadata or headers (never pixel data)."""

    study_instance_uid: str
    series: set[str] = field(default_factory=set)
    instances: int = 0
    bytes: int = 0
    modalities: set[str] = field(default_factory=set)


async def studies_async(
    url: str, *, config: StoreConfig | None = None, parallel: int = 32
) -> tuple[list[StudySummary], int]:
    """Objects under ``url`` grouped by study, and how many objects could not be read as DICOM.

    Each object's identity comes from a ranged read of its header (one request, as a HEAD would
    be). Encrypted objects and other non-DICOM objects are counted apart.
    """
    from .dicom.header import read_identity_from_store
    from .errors import DicomFormatError

    studies: dict[str, StudySummary] = {}
    unreadable = 0
    gate = asyncio.Semaphore(parallel)
    async with _opened(url, config) as location:
        store = location.store

        async def one(info: ObjectInfo) -> None:
            nonlocal unreadable
            async with gate:
                try:
                    identity = await read_identity_from_store(store, info.key, size=info.size)
                except DicomFormatError:
                    unreadable += 1
                    return
            study = studies.setdefault(
                identity.study_instance_uid or "(none)", StudySummary(identity.study_instance_uid or "(none)")
            )
            study.series.add(identity.series_instance_uid or "(none)")
            study.instances += 1
            study.bytes += info.size
            if identity.modality:
                study.modalities.add(identity.modality)

        pending: set[asyncio.Task[None]] = set()
        async for info in store.list(location.prefix if location.is_local else location.key):
            if info.key.endswith("/"):
                continue
            task = asyncio.create_task(one(info))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if len(pending) >= parallel * 4:  # memory stays flat however many objects
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            await asyncio.gather(*pending)
    return sorted(studies.values(), key=lambda s: s.study_instance_uid), unreadable
