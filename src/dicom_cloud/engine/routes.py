"""Routes: one small object per way of moving one object, each returning what it wrote.

``Router.move`` picks the route for an item from what the two stores can do and what the bytes
need (the way rclone's operations pick server-side copy, upload, download or a streamed copy):

==================  ==========================================================================
ServerSideCopy      inside one store, bytes and metadata unchanged: the server copies
WholeObject         small objects (and every de-identified one): read, check, decrypt/encrypt,
                    put; the bytes are held once, under the byte budget
MultipartUpload     a large local file: CRC32C first, then a multipart (or resumable) upload
RangedDownload      a large object into a store that writes at offsets (local disk): ranged
                    reads in parallel, written where they belong, each part's CRC32C combined
StreamedCopy        a large object between providers: a stream into a multipart upload; its
                    encrypted forms decrypt and/or encrypt on the way
DecryptingDownload  a large encrypted object to local disk: ranged reads ahead, decrypted in order
==================  ==========================================================================

Routes know nothing of retries, throttling, the journal or accounting: those wrap them
(``wrappers.py``, ``accounting.py``). What a route learns about its item goes into the
``Attempt`` it is given, and what it wrote comes back as a ``Written`` value.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..budget import ByteBudget
from ..checksum import Crc32c, crc32c_combine, crc32c_file, crc32c_hex, crc32c_update
from ..crypto.envelope import ClientEncryption, Format
from ..errors import AlreadyExistsError, IntegrityError, NotFoundError
from ..location import Location
from ..resumable import StateStore, fit_part_size, streamed_upload, upload_file_resumable
from ..store import (
    CHECKSUM_METADATA_KEY,
    MultipartPlan,
    ObjectInfo,
    PutOptions,
    RandomAccessWriter,
    RangeReader,
)
from .destination import ENVELOPE_ROOM, Claim, Content, DestinationCheck
from .model import (
    DICOM_CONTENT_TYPE,
    HELD_PARTS_PER_SLOT,
    OCTET_STREAM,
    STREAM_CHUNK,
    Attempt,
    TransferOptions,
    Written,
    ranged_part_size,
)
from .objectmeta import EtagMismatch, check_checksum, checks_md5, content_type, markers, verify, with_checksum
from .source import check_unchanged, remove_unless_unchanged, source_crc

log = logging.getLogger(__name__)

MiB = 1024 * 1024

#: Told of bytes moved for an attempt (a part of a large object).
Progress = Callable[[Attempt, int], None]

#: Bytes checked and written on the event loop itself rather than in a worker thread, when the work
#: is cheap (a CRC32C at hardware speed, a write into the page cache: tens to hundreds of
#: microseconds). The hop there and back cost more than that: thread wake-ups, and the GIL passed
#: between the loop, the worker threads and obstore's runtime (a 1 GiB download made 70,000 futex
#: calls). Inline, a 400-object study download (objects with our CRC32C) took 0.69 s against 0.77 s,
#: a 1 GiB download 1.42-1.52 s against 1.54-1.62 s (docs/benchmarks.md, 2026-12-04). Beyond this
#: size, and for MD5, ciphers and de-identification (CPU work that releases the GIL), the worker
#: thread runs beside the loop. A write into the page cache blocks the loop while the kernel throttles
#: it (at most 200 ms per pause), which does not hold up stopping on Ctrl-C; a destination on a hung
#: network mount would, as creating the partial file on the loop already did.
INLINE_LIMIT = 1 * MiB
# Ranged downloads write every chunk on the loop (RangedDownload): a chunk must be cheap to write.
assert STREAM_CHUNK <= INLINE_LIMIT


@dataclass(frozen=True)
class RouteContext:
    """What every route may use: the two locations, the run's options and keys, the memory budget,
    where to report progress, and where upload sessions are kept (the job's journal, or a
    sync's job file: resumable uploads, and the markers of streamed ones)."""

    src: Location
    dst: Location
    options: TransferOptions
    crypt: ClientEncryption
    budget: ByteBudget
    progress: Progress
    sessions: StateStore | None = None

    def upload_plan(self) -> MultipartPlan:
        """Parts in flight for one multipart upload, as many as the memory budget allows."""
        part = self.options.part_size
        slots = self.options.memory_budget // (HELD_PARTS_PER_SLOT * part)
        return MultipartPlan(part, max(1, min(self.options.part_concurrency, slots)))

    def content_type(
        self, attempt: Attempt, source: ObjectInfo | None, head: bytes | memoryview | None, *, encrypted: bool
    ) -> str:
        return content_type(
            attempt.item.src_key, source, head, encrypted=encrypted, is_dicom=attempt.identity is not None
        )


class Router:
    """Picks and runs the route of each item (the caller holds the destination name's claim)."""

    def __init__(self, ctx: RouteContext, check: DestinationCheck, *, checks_destination: bool) -> None:
        self.ctx = ctx
        self.check = check
        #: Whether what is at each destination name is looked at before writing.
        self.checks_destination = checks_destination

    async def move(self, attempt: Attempt, put: PutOptions, claim: Claim) -> Written:
        ctx = self.ctx
        options, crypt = ctx.options, ctx.crypt
        src, dst = ctx.src.store, ctx.dst.store
        checks = self.checks_destination
        if options.no_overwrite:
            put = replace(put, if_absent=True)
            if attempt.item.size > options.multipart_threshold:
                await refuse_existing(ctx.dst, attempt.item.dst_key)
        # Inside one store the server copies (metadata included) unless the bytes or the
        # metadata change; uploads from local disk always go the read-and-put way to record a CRC32C.
        if (
            src is dst
            and src.features.server_side_copy
            and not ctx.src.is_local
            and not (put.metadata or put.tags or crypt.writes_encrypted)
        ):
            if options.no_overwrite:
                await refuse_existing(ctx.dst, attempt.item.dst_key)
            if checks:
                item = attempt.item
                await self.check.check(
                    attempt, Content(size=item.size, compute=source_crc(ctx.src, crypt, item)), claim
                )
            return await ServerSideCopy(ctx)(attempt)
        # De-identification rewrites the dataset: it needs the whole instance in memory.
        if attempt.item.size <= options.multipart_threshold or options.deidentify is not None:
            return await WholeObject(ctx, self.check if checks else None, claim)(attempt, put)
        if checks:
            # Large objects: the CRC32C of what will be written is computed only if an object is
            # already at the name (encrypted ones: never known beforehand, so they count as different).
            item = attempt.item
            content = (
                Content()
                if crypt.writes_encrypted
                else Content(size=item.size, compute=source_crc(ctx.src, crypt, item))
            )
            await self.check.check(attempt, content, claim)
        info = await src.stat(attempt.item.src_key)
        fmt = crypt.detect(attempt.item.src_key, info.metadata)
        if fmt is not None and crypt.writes_encrypted:
            # Re-encryption (copy or rekey), wherever the destination is: never plaintext at rest.
            return await StreamedCopy(ctx, decrypt=fmt)(attempt, info, put)
        if fmt is not None and ctx.dst.is_local:
            return await DecryptingDownload(ctx, fmt)(attempt, info)
        if ctx.src.is_local and fmt is None and not crypt.writes_encrypted:
            return await MultipartUpload(ctx)(attempt, put)
        if dst.features.random_access_write and not crypt.writes_encrypted:
            return await RangedDownload(ctx)(attempt, info)
        return await StreamedCopy(ctx)(attempt, info, put)


async def refuse_existing(dst: Location, key: str) -> None:
    try:
        await dst.store.stat(key)
    except NotFoundError:
        return
    raise AlreadyExistsError(f"{dst.display(key)} exists")


class ServerSideCopy:
    """The server copies, metadata included; nothing passes through us."""

    def __init__(self, ctx: RouteContext) -> None:
        self.ctx = ctx

    async def __call__(self, attempt: Attempt) -> Written:
        await self.ctx.src.store.copy(attempt.item.src_key, attempt.item.dst_key)
        return Written()


class WholeObject:
    """Read whole, verify, transform (decrypt, de-identify, encrypt), put in one request.

    With a destination check, the put is create-only first: where nothing is at the name (the
    usual case) the object is written in one request, without looking first."""

    def __init__(self, ctx: RouteContext, check: DestinationCheck | None, claim: Claim) -> None:
        self.ctx = ctx
        self.check = check
        self.claim = claim

    async def __call__(self, attempt: Attempt, put: PutOptions) -> Written:
        ctx = self.ctx
        src, dst = ctx.src.store, ctx.dst.store
        key = attempt.item.src_key
        # Into a store written at offsets (local disk) the bytes are checked and written, and the
        # file renamed into place, in one worker-thread call: one hop off the event loop per object.
        step = self.prepare_and_write if dst.features.random_access_write else self.prepare_only
        async with ctx.budget.reserve(2 * attempt.item.size + ENVELOPE_ROOM):
            info, data = await src.read(key)
            check_unchanged(attempt, len(data))
            try:
                if self._inline(attempt, info):
                    data, options, plain_crc, wrote = step(data, info, put, attempt)
                else:
                    data, options, plain_crc, wrote = await asyncio.to_thread(step, data, info, put, attempt)
            except EtagMismatch:
                first = hashlib.md5(data, usedforsecurity=False).digest()
                info, data = await src.read(key)
                if hashlib.md5(data, usedforsecurity=False).digest() != first:
                    raise  # two reads, two contents: damage in transit
                # The same bytes twice: the ETag is not an MD5 of them; the other checks still apply.
                log.debug("%s: ETag is not an MD5 of the content (SSE-KMS or SSE-C?)", attempt.src_url)
                data, options, plain_crc, wrote = await asyncio.to_thread(
                    step, data, info, put, attempt, trust_etag=False
                )
            written_crc = options.metadata.get(CHECKSUM_METADATA_KEY)
            if wrote:
                return Written(written_crc, None)
            if self.check is not None:
                try:
                    result = await dst.put(attempt.item.dst_key, data, replace(options, if_absent=True))
                except AlreadyExistsError:
                    content = Content(
                        size=len(data), crc=written_crc, plain_crc=plain_crc, data=data, put=options
                    )
                    await self.check.check(attempt, content, self.claim)
                    result = await dst.put(attempt.item.dst_key, data, options)
            else:
                result = await dst.put(attempt.item.dst_key, data, options)
        return Written(written_crc, result.etag)

    def _inline(self, attempt: Attempt, info: ObjectInfo) -> bool:
        """Whether this object's checks and write are cheap enough for the event loop
        (``INLINE_LIMIT``): small, checked by CRC32C alone, neither decrypted, encrypted nor
        de-identified. MD5 and ciphers release the GIL: in a worker thread they run beside the loop."""
        ctx = self.ctx
        return (
            info.size <= INLINE_LIMIT
            and ctx.options.deidentify is None
            and not ctx.crypt.writes_encrypted
            and ctx.crypt.detect(attempt.item.src_key, info.metadata) is None
            and not checks_md5(info, etag_is_md5=ctx.src.store.features.etag_is_md5)
        )

    def prepare_only(
        self,
        data: bytes | memoryview,
        info: ObjectInfo,
        put: PutOptions,
        attempt: Attempt,
        *,
        trust_etag: bool = True,
    ) -> tuple[bytes | memoryview, PutOptions, str | None, bool]:
        """``prepare``, in the shape of ``prepare_and_write``: nothing written yet."""
        return (*self.prepare(data, info, put, attempt, trust_etag=trust_etag), False)

    def prepare_and_write(
        self,
        data: bytes | memoryview,
        info: ObjectInfo,
        put: PutOptions,
        attempt: Attempt,
        *,
        trust_etag: bool = True,
    ) -> tuple[bytes | memoryview, PutOptions, str | None, bool]:
        """``prepare``, then the bytes written to a partial file of a random-access store and
        renamed into place with their metadata. With a destination check the write is
        create-only: an object already at the name is left to the check (False is returned
        then, nothing written). Runs in a worker thread."""
        data, options, plain_crc = self.prepare(data, info, put, attempt, trust_etag=trust_etag)
        writer = self.ctx.dst.store.open_writer(attempt.item.dst_key, 0)
        try:
            writer.write_at(0, data)
            writer.commit(self.check is not None or options.if_absent, options)
        except AlreadyExistsError:
            writer.abort()
            if self.check is None:
                raise
            return data, options, plain_crc, False
        except BaseException:
            writer.abort()
            raise
        return data, options, plain_crc, True

    def prepare(
        self,
        data: bytes | memoryview,
        info: ObjectInfo,
        put: PutOptions,
        attempt: Attempt,
        *,
        trust_etag: bool = True,
    ) -> tuple[bytes | memoryview, PutOptions, str | None]:
        """Verify a whole object read into memory, decrypt or encrypt it as the rules say, and
        return the bytes to write with their metadata, and the CRC32C of the plaintext when it is
        known. Runs in a worker thread."""
        ctx = self.ctx
        crypt, options, src_url, key = ctx.crypt, ctx.options, attempt.src_url, attempt.item.src_key
        checksum = verify(data, info, src_url, etag_is_md5=trust_etag and ctx.src.store.features.etag_is_md5)
        fmt = crypt.detect(key, info.metadata)
        if fmt is not None and not (ctx.dst.is_local or crypt.writes_encrypted):
            # Ciphertext copied as it is, with the marker that says how to read it.
            cipher_type = ctx.content_type(attempt, info, None, encrypted=True)
            return (
                data,
                with_checksum(put, info, checksum, keep=markers(info), content_type=cipher_type),
                None,
            )
        if fmt is not None:
            data = crypt.decrypt(src_url, fmt, info.metadata, data)
            checksum = crc32c_hex(data)
        if options.deidentify is not None:
            from ..dicom.deidentify import deidentify

            data, uid_map = deidentify(bytes(data), options.deidentify)
            checksum = crc32c_hex(data)
            if options.on_uid_map is not None:
                options.on_uid_map(uid_map)
        if crypt.writes_encrypted:
            plain_crc = checksum
            data = crypt.encrypt(data)
            put_options = with_checksum(
                put, info, crc32c_hex(data), keep=crypt.marker(), content_type=OCTET_STREAM
            )
            return data, put_options, plain_crc
        chosen = ctx.content_type(attempt, info, data[:132], encrypted=False)
        return data, with_checksum(put, info, checksum, content_type=chosen), checksum


class MultipartUpload:
    """A large local file: CRC32C first (it goes in the metadata), then a multipart upload.

    Where sessions are kept (a job's journal), and the store can continue an upload from another
    process, the upload's session is kept there so that a re-run sends only the parts the server
    lacks. A file that changed while it was read is not left under the name as good: the object
    just written from it is removed again."""

    def __init__(self, ctx: RouteContext) -> None:
        self.ctx = ctx

    async def __call__(self, attempt: Attempt, put: PutOptions) -> Written:
        ctx = self.ctx
        item = attempt.item
        path = Path("/" + item.src_key)
        plan = ctx.upload_plan()
        if not put.content_type:
            head = await asyncio.to_thread(_file_head, path)
            put = replace(put, content_type=ctx.content_type(attempt, None, head, encrypted=False))
        uploads = ctx.dst.store.resumable_uploads() if ctx.sessions is not None else None
        if uploads is not None and ctx.sessions is not None:
            resumed = await upload_file_resumable(
                uploads,
                path,
                item.dst_key,
                part_size=fit_part_size(item.size, plan.part_size, uploads),
                options=with_checksum(put, None, None),
                state_store=ctx.sessions,
                budget=ctx.budget,
                on_progress=lambda count: ctx.progress(attempt, count),
                concurrency=plan.concurrency,
            )
            if resumed.resumed:
                log.info(
                    "%s: continued an interrupted upload, %d of %d parts already on the server",
                    attempt.dst_url,
                    resumed.parts_reused,
                    resumed.parts_total,
                )
            await remove_unless_unchanged(attempt, ctx.dst)
            return Written(resumed.crc32c, resumed.info.etag)
        checksum = await asyncio.to_thread(crc32c_file, path)
        async with ctx.budget.reserve(HELD_PARTS_PER_SLOT * plan.part_size * plan.concurrency):
            result = await ctx.dst.store.put_file(
                item.dst_key, path, with_checksum(put, None, checksum), plan
            )
        await remove_unless_unchanged(attempt, ctx.dst)
        return Written(checksum, result.etag)


def _file_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(132)


class RangedDownload:
    """Parallel ranged reads streamed into a partial local file; renamed only once verified.

    Each part is read as a stream of small chunks written at their offsets, so memory holds about
    one chunk per part in flight; each part's CRC32C is computed on the way and the object's CRC is
    combined from them at the end."""

    def __init__(self, ctx: RouteContext) -> None:
        self.ctx = ctx

    async def __call__(self, attempt: Attempt, info: ObjectInfo) -> Written:
        ctx = self.ctx
        item = attempt.item
        size = info.size
        part = ranged_part_size(size, ctx.options.part_size, ctx.options.part_concurrency)
        offsets = list(range(0, size, part))
        part_crcs = [0] * len(offsets)
        writer = ctx.dst.store.open_writer(item.dst_key, size)
        parts_in_flight = asyncio.Semaphore(ctx.options.part_concurrency)
        src_store = ctx.src.store
        reader = src_store.range_reader()

        async def fetch(index: int, start: int) -> None:
            end = min(start + part, size)
            async with parts_in_flight, ctx.budget.reserve(2 * STREAM_CHUNK):
                if reader is not None:
                    report = functools.partial(ctx.progress, attempt)
                    part_crcs[index] = await _read_part(reader, item.src_key, start, end, writer, report)
                    return
                crc = 0
                position = start
                async for chunk in src_store.stream(
                    item.src_key, chunk_size=STREAM_CHUNK, start=start, end=end
                ):
                    # On the loop (chunks of STREAM_CHUNK <= INLINE_LIMIT): see INLINE_LIMIT.
                    crc = _write_and_hash(writer, position, chunk, crc)
                    position += len(chunk)
                    ctx.progress(attempt, len(chunk))
                if position != end:
                    raise IntegrityError(
                        f"{attempt.src_url}: got {position - start} bytes of part at {start}, "
                        f"expected {end - start}"
                    )
                part_crcs[index] = crc

        try:
            tasks = [asyncio.create_task(fetch(index, start)) for index, start in enumerate(offsets)]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            whole = 0
            for index, start in enumerate(offsets):
                whole = crc32c_combine(whole, part_crcs[index], min(part, size - start))
            check_checksum(f"{whole:08x}", info, attempt.src_url)
            await asyncio.to_thread(writer.commit, ctx.options.no_overwrite)
        except BaseException:
            writer.abort()
            raise
        return Written(f"{whole:08x}")


async def _read_part(
    reader: RangeReader,
    key: str,
    start: int,
    end: int,
    writer: RandomAccessWriter,
    report: Callable[[int], None],
) -> int:
    """Bytes ``[start, end)`` read by the store's ranged reader, each chunk checked and written in
    the reader's thread (the GIL released for both), progress reported on the loop every few
    chunks (each report wakes it). Returns the part's CRC32C."""
    loop = asyncio.get_running_loop()
    crc = 0
    unreported = 0

    def sink(offset: int, chunk: memoryview) -> None:
        nonlocal crc, unreported
        writer.write_at(offset, chunk)
        crc = crc32c_update(crc, chunk)
        unreported += len(chunk)
        if unreported >= _PROGRESS_STEP:
            loop.call_soon_threadsafe(report, unreported)
            unreported = 0

    await reader.read(key, start, end, sink)
    if unreported:
        report(unreported)
    return crc


#: Bytes a ranged part reads between two progress reports.
_PROGRESS_STEP = 8 * MiB


def _write_and_hash(writer: RandomAccessWriter, offset: int, chunk: bytes | memoryview, crc: int) -> int:
    writer.write_at(offset, chunk)
    return crc32c_update(crc, chunk)


class StreamedCopy:
    """Stream the source into a multipart upload; no temporary file.

    Its encrypted forms decrypt (``decrypt``: the source's format) and re-encrypt (when the run
    writes encrypted) on the way. A failed check raises inside the stream, before its end, so the
    multipart upload is abandoned rather than completed."""

    def __init__(self, ctx: RouteContext, *, decrypt: Format | None = None) -> None:
        self.ctx = ctx
        self.decrypt = decrypt

    async def __call__(self, attempt: Attempt, info: ObjectInfo, put: PutOptions) -> Written:
        ctx = self.ctx
        item = attempt.item
        crypt = ctx.crypt
        src_url = attempt.src_url
        stored_crc = Crc32c()
        decryptor = crypt.decryptor(src_url, self.decrypt, info.metadata) if self.decrypt else None
        encryptor = crypt.encryptor() if crypt.writes_encrypted else None
        src_store = ctx.src.store

        async def chunks() -> AsyncIterator[bytes | memoryview]:
            if encryptor is not None:
                yield encryptor.header
            async for chunk in src_store.stream(item.src_key, chunk_size=ctx.options.part_size):
                stored_crc.update(chunk)
                ctx.progress(attempt, len(chunk))
                plain: bytes | memoryview = decryptor.update(chunk) if decryptor else chunk
                yield encryptor.update(plain) if encryptor else plain
            if not ctx.src.is_local:
                check_checksum(stored_crc.hexdigest(), info, src_url)
            else:  # raised inside the stream: the upload of what may mix two versions is abandoned
                check_unchanged(attempt)
            if decryptor is not None:
                # IntegrityError here abandons the upload; what it returns is the last plaintext.
                rest = await asyncio.to_thread(decryptor.finalize)
                if rest:
                    yield encryptor.update(rest) if encryptor else rest
            if encryptor is not None:
                yield encryptor.finalize()

        if encryptor is not None:
            # The ciphertext's CRC is known only at the end; its GCM tags protect it instead.
            options = with_checksum(put, info, None, keep=crypt.marker(), content_type=OCTET_STREAM)
        else:  # the same bytes: the source's CRC32C (if any) still describes them
            ciphertext = crypt.detect(item.src_key, info.metadata) is not None
            head = None
            if not (ciphertext or put.content_type) and info.content_type in (None, DICOM_CONTENT_TYPE):
                head = await src_store.get_range(item.src_key, 0, 132)  # is it Part 10?
            options = with_checksum(
                put,
                info,
                info.metadata.get(CHECKSUM_METADATA_KEY),
                keep=markers(info),
                content_type=ctx.content_type(attempt, info, head, encrypted=ciphertext),
            )
        plan = ctx.upload_plan()
        uploads = ctx.dst.store.resumable_uploads() if ctx.sessions is not None else None
        # A streamed upload cannot be continued, but it must not be left behind: an attempt
        # killed mid-stream (a cluster worker, a process) leaves a marker, and the next attempt
        # removes its unfinished upload before it begins its own.
        marked = (
            streamed_upload(uploads, ctx.sessions, item.dst_key)
            if uploads is not None and ctx.sessions is not None
            else contextlib.nullcontext()
        )
        async with marked, ctx.budget.reserve(HELD_PARTS_PER_SLOT * plan.part_size * plan.concurrency):
            result = await ctx.dst.store.put_stream(item.dst_key, chunks(), options, plan)
        return Written(options.metadata.get(CHECKSUM_METADATA_KEY), result.etag)


class DecryptingDownload:
    """An encrypted object decrypted in order into a partial file, renamed once authentic.

    The cipher runs in order, but the reads need not: parts are fetched ahead, a window of them in
    flight, and handed to the decryptor as their turn comes."""

    def __init__(self, ctx: RouteContext, fmt: Format) -> None:
        self.ctx = ctx
        self.fmt = fmt

    async def __call__(self, attempt: Attempt, info: ObjectInfo) -> Written:
        ctx = self.ctx
        item = attempt.item
        options = ctx.options
        crypt = ctx.crypt
        head = b"" if crypt.ring else await ctx.src.store.get_range(item.src_key, 0, 64)  # to name the key
        decryptor = crypt.decryptor(attempt.src_url, self.fmt, info.metadata, head)
        size = info.size
        # Smaller parts than plain downloads: each is held whole until its turn to be decrypted.
        part = min(options.part_size, 4 * MiB)
        # Held at once: the parts in flight, the one being decrypted, and the decryptor's output.
        window = max(1, min(options.part_concurrency, options.memory_budget // (3 * part) - 1))
        stored_crc = Crc32c()
        writer = ctx.dst.store.open_writer(item.dst_key, 0)
        src_store = ctx.src.store
        offsets = iter(range(0, size, part))
        ahead: collections.deque[asyncio.Task[bytes | memoryview]] = collections.deque()

        def launch() -> None:
            start = next(offsets, None)
            if start is not None:
                ahead.append(
                    asyncio.create_task(src_store.get_range(item.src_key, start, min(start + part, size)))
                )

        def decrypt_and_write(position: int, data: bytes | memoryview) -> int:
            stored_crc.update(data)
            plain = decryptor.update(data)
            writer.write_at(position, plain)
            return len(plain)

        try:
            async with ctx.budget.reserve((window + 2) * part):
                try:
                    for _ in range(window):
                        launch()
                    position = 0
                    while ahead:
                        data = await ahead.popleft()
                        launch()
                        position += await asyncio.to_thread(decrypt_and_write, position, data)
                        ctx.progress(attempt, len(data))
                finally:
                    # The reads ahead hold memory: they end before the budget is given back.
                    for task in ahead:
                        task.cancel()
                    await asyncio.gather(*ahead, return_exceptions=True)
            check_checksum(stored_crc.hexdigest(), info, attempt.src_url)
            rest = await asyncio.to_thread(decryptor.finalize)
            if rest:
                await asyncio.to_thread(writer.write_at, position, rest)
            await asyncio.to_thread(writer.commit, options.no_overwrite)
        except BaseException:
            writer.abort()
            raise
        return Written()
