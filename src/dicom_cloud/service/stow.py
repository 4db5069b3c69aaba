"""STOW-RS bodies as they arrive: each part checked by its first bytes, held in memory or passed
on as a stream, stored by the archive, held parts in batches.

- A part whose media type is not ``application/dicom``, or whose first 132 bytes are not a
  Part 10 preamble and ``DICM``, is refused at once; the rest of it is skipped unread (never
  held, never parsed).
- A part up to ``stow_part_memory_bytes`` is held whole and stored with the whole parts before
  and after it by ``Archive.store_instances`` (batches of up to half that memory: one parse
  trip and one index transaction per batch instead of per part); when the URL names a study,
  the archive refuses a part of another study from that same parse.
- A larger part is passed, from its held head on, as a stream to
  ``Archive.store_instance_stream`` (staged as it arrives, ingested as a stream): memory stays
  at the head, whatever the part's size.
- A stored instance is answered with the UIDs of the archive's own record (one parse per
  instance). The identity is read from a bounded prefix (``read_identity``'s ``max_read``) in a
  worker thread only where the archive's parse cannot serve: a part refused as malformed (to
  name it in the answer), and a streamed part (its study checked before it is stored). The
  archive alone decides what it stores. No parsing, hashing or joining of bytes runs on the
  event loop.

The caller holds :func:`memory_share` of the service's request memory for the whole request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, replace

from ..archive import Archive, OtherStudyError, StoredInstance
from ..dicom.header import REASON_NO_DICM, REASON_TOO_LONG, DicomIdentity, read_identity
from ..errors import AlreadyExistsError, DicomCloudError, DicomFormatError
from .dicomjson import (
    DICOM,
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_DUPLICATE,
    FAILURE_OUT_OF_RESOURCES,
    FAILURE_PROCESSING,
    FAILURE_STUDY_MISMATCH,
)
from .http_errors import PayloadTooLargeError
from .multipart import RelatedReader

#: A Part 10 object begins with a 128-byte preamble and ``DICM``.
PART10_HEAD = 132
#: Copies of a held part at the peak of its ingest: the part, the archive's copy with the
#: preamble zeroed, and an encrypted copy.
INGEST_COPIES = 3
#: Chunks passed on to a streamed store are joined up to this size (fewer, larger writes).
STREAM_CHUNK = 1024 * 1024
#: Most whole parts stored in one batch (one index transaction).
BATCH_PARTS = 200
#: Longest header prefix parsed for the identity (the archive's own limit for headers).
IDENTITY_MAX_READ = 8 * 1024 * 1024


def memory_share(part_memory: int, content_length: str | None) -> int:
    """The bytes a STOW-RS request reserves: one held part (at most ``part_memory``, at most the
    declared body) and its ingest's copies; a streamed part needs less (its head and a chunk)."""
    held = part_memory
    if content_length is not None and content_length.isdigit():
        held = min(held, int(content_length))
    return INGEST_COPIES * held


@dataclass(frozen=True)
class PartOutcome:
    """What became of one part: stored (``stored``), or refused (``failure``, a STOW reason,
    and ``comment``, why in words free of patient data)."""

    identity: DicomIdentity | None
    stored: StoredInstance | None = None
    failure: int | None = None
    comment: str = ""


class StowReceiver:
    """Stores the parts of one STOW-RS body for one tenant (``study``: the study of the URL)."""

    def __init__(self, archive: Archive, tenant: str, study: str | None, part_memory: int) -> None:
        self.archive = archive
        self.tenant = tenant
        self.study = study
        self.part_memory = part_memory

    async def outcomes(self, reader: RelatedReader) -> AsyncIterator[PartOutcome]:
        """The outcome of every part of the body, in order.

        Whole parts are stored in batches (``Archive.store_instances``: one parse trip, one
        lookup, one index transaction per batch; the study of a URL naming one checked there);
        a batch holds at most half of ``part_memory`` (or one part) and
        :data:`BATCH_PARTS` parts, and is stored before a part that is not batched (refused, too
        large to hold) is answered. Memory stays within :func:`memory_share`: the batch (half),
        its two copies while it is stored, and the part read meanwhile.
        """
        batch: list[list[bytes]] = []
        batch_size = 0
        while (content_type := await reader.next_part()) is not None:
            if content_type == DICOM:
                held = await self._hold(reader)
                if isinstance(held, list):
                    size = sum(map(len, held))
                    if batch and (batch_size + size > self.part_memory // 2 or len(batch) >= BATCH_PARTS):
                        async for outcome in self._store_batch(batch):
                            yield outcome
                        batch, batch_size = [], 0
                    batch.append(held)
                    batch_size += size
                    continue
            else:
                held = None
            if batch:
                async for outcome in self._store_batch(batch):
                    yield outcome
                batch, batch_size = [], 0
            if held is None:
                yield self._not_dicom(content_type)  # its content is skipped unread
            else:
                yield await self._store_held(reader, held)
        if batch:
            async for outcome in self._store_batch(batch):
                yield outcome

    async def _hold(self, reader: RelatedReader) -> list[bytes] | tuple[list[bytes]] | PartOutcome:
        """A DICOM part read: its chunks when whole within ``part_memory`` (a list), its first
        chunks when larger (a 1-tuple of them: the rest is still to read), or its refusal."""
        held: list[bytes] = []
        size = 0
        while size < PART10_HEAD and (chunk := await reader.read()):
            held.append(chunk)
            size += len(chunk)
        if size < PART10_HEAD or not _starts_part10(held):
            # The rest is skipped unread.
            return PartOutcome(None, failure=FAILURE_CANNOT_UNDERSTAND, comment=REASON_NO_DICM)
        while size <= self.part_memory and (chunk := await reader.read()):
            held.append(chunk)
            size += len(chunk)
        return held if size <= self.part_memory else (held,)

    async def _store_held(
        self, reader: RelatedReader, held: list[bytes] | tuple[list[bytes]] | PartOutcome
    ) -> PartOutcome:
        """The outcome of a part :meth:`_hold` did not batch (a refusal, or a part too large to hold)."""
        if isinstance(held, PartOutcome):
            return held
        assert isinstance(held, tuple)
        return await self._store_streamed(held[0], reader)

    async def _store_batch(self, batch: list[list[bytes]]) -> AsyncIterator[PartOutcome]:
        """Store whole parts together; the outcome of each, in order. A store that is down fails
        the request (raised) once the parts this batch stored are named, so that the route
        removes them with the request's other instances."""
        datas = await asyncio.to_thread(lambda: [b"".join(chunks) for chunks in batch])
        batch.clear()  # the chunks are let go: the joined parts are what is held now
        results = await self.archive.store_instances(self.tenant, datas, study=self.study)
        fatal: BaseException | None = None
        for data, result in zip(datas, results, strict=True):
            if isinstance(result, StoredInstance):
                yield PartOutcome(None, stored=result)
                continue
            if isinstance(result, OtherStudyError):
                yield PartOutcome(result.identity, failure=FAILURE_STUDY_MISMATCH, comment=result.message)
                continue
            try:
                outcome = await _stored(None, _raised(result))
            except DicomCloudError as exc:
                fatal = fatal or exc
                continue
            # The identity is read only to name a refused part in the answer.
            yield replace(outcome, identity=await asyncio.to_thread(_identify, data))
        if fatal is not None:
            raise fatal

    @staticmethod
    def _not_dicom(content_type: str) -> PartOutcome:
        return PartOutcome(
            None, failure=FAILURE_CANNOT_UNDERSTAND, comment=f"the part is {content_type}, not {DICOM}"
        )

    async def _store_streamed(self, held: list[bytes], reader: RelatedReader) -> PartOutcome:
        """A part too large to hold: the identity from the first bytes held, then the held chunks
        and the rest of the part as a stream (the held chunks are let go as they are passed on)."""
        identity = await asyncio.to_thread(_identify_head, held)
        if (mismatch := self._other_study(identity)) is not None:
            return mismatch
        return await _stored(
            identity, self.archive.store_instance_stream(self.tenant, _rest_of_part(held, reader))
        )

    def _other_study(self, identity: DicomIdentity | None) -> PartOutcome | None:
        if self.study is not None and identity is not None and identity.study_instance_uid != self.study:
            return PartOutcome(
                identity, failure=FAILURE_STUDY_MISMATCH, comment="the instance is of another study"
            )
        return None


def _starts_part10(chunks: Sequence[bytes]) -> bool:
    head = b"".join(chunks)[:PART10_HEAD]  # at most the first chunk or two
    return head[128:132] == b"DICM"


def _identify(data: bytes) -> DicomIdentity | None:
    """The identity of a whole part, read from its bounded prefix (for a worker thread)."""
    try:
        max_read = min(IDENTITY_MAX_READ, max(len(data), 256))
        return read_identity(data, first_read=min(64 * 1024, max_read), max_read=max_read)
    except DicomCloudError:
        return None  # UIDs for the answer only; the archive says why it refuses the part


def _identify_head(chunks: Sequence[bytes]) -> DicomIdentity | None:
    """The identity from the first bytes of a part too large to hold (for a worker thread):
    1 MiB of them, or up to IDENTITY_MAX_READ when its header is longer (copies stay small)."""
    for limit in (1024 * 1024, IDENTITY_MAX_READ):
        head = bytearray()
        for chunk in chunks:
            head += chunk[: limit - len(head)]
            if len(head) >= limit:
                break
        try:
            return read_identity(head, first_read=64 * 1024, max_read=len(head), size=len(head) + 1)
        except DicomCloudError as exc:
            if getattr(exc, "reason", None) != REASON_TOO_LONG:
                return None  # UIDs for the answer only; the archive says why it refuses the part
    return None


async def _rest_of_part(held: list[bytes], reader: RelatedReader) -> AsyncIterator[bytes]:
    """The part from its held chunks to its end, in chunks of about STREAM_CHUNK bytes."""
    pending: list[bytes] = []
    pending_size = 0
    held.reverse()  # popped from the end: the first chunk first
    while True:
        chunk = held.pop() if held else await reader.read()
        if not chunk:
            break
        pending.append(chunk)
        pending_size += len(chunk)
        if pending_size >= STREAM_CHUNK:
            yield b"".join(pending)
            pending, pending_size = [], 0
    if pending:
        yield b"".join(pending)


async def _raised(error: BaseException) -> StoredInstance:
    """An awaitable raising ``error``: a batch's refusal handed to :func:`_stored`."""
    raise error


async def _stored(identity: DicomIdentity | None, storing: Awaitable[StoredInstance]) -> PartOutcome:
    """The outcome of the archive's store call; a store that is down fails the whole request."""
    try:
        stored = await storing
    except DicomFormatError as exc:
        reason, comment = FAILURE_CANNOT_UNDERSTAND, exc.message
    except AlreadyExistsError as exc:
        reason, comment = FAILURE_DUPLICATE, exc.message
    except PayloadTooLargeError as exc:
        reason, comment = FAILURE_OUT_OF_RESOURCES, exc.message
    except DicomCloudError as exc:
        if exc.http_status >= 500 and exc.retryable:
            raise  # the store is down: the whole request fails, nothing is half-answered
        reason, comment = FAILURE_PROCESSING, exc.message
    else:
        return PartOutcome(identity, stored=stored)
    return PartOutcome(identity, failure=reason, comment=comment)
