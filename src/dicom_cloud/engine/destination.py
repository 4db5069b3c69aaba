"""What is already at a destination name: one writer per name within a run (``NameClaims``), and
the comparison of what is there with what is about to be written (``DestinationCheck``): nothing,
the same bytes (skipped), or other bytes, which --on-conflict settles."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..budget import ByteBudget
from ..checksum import crc32c_file, crc32c_hex, md5_etag
from ..crypto.envelope import ClientEncryption
from ..errors import ConflictError, DicomCloudError, NotFoundError
from ..location import Location
from ..store import CHECKSUM_METADATA_KEY, ObjectInfo, PutOptions
from .model import Attempt, ConflictLeft, Identical, TransferItem, TransferOptions
from .objectmeta import has_metadata

#: Room for an envelope's header and tags beside a whole object in memory.
ENVELOPE_ROOM = 64 * 1024


@dataclass
class Claim:
    """One destination name claimed by the items of a run that write it (one at a time)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    #: The source last written under this name in this run, for messages.
    writer: str | None = None


class NameClaims:
    """Destination names in use by this run. Whoever writes a name holds its claim from the check
    of what is there until the write is done, so two sources mapped to one name (a DICOM layout
    and two files with one SOP Instance UID) are compared instead of racing. Only names in use
    are held: memory does not grow with the number of objects."""

    def __init__(self) -> None:
        self._claims: dict[str, Claim] = {}

    @contextlib.asynccontextmanager
    async def claim(self, key: str) -> AsyncIterator[Claim]:
        entry = self._claims.setdefault(key, Claim())
        entry.users += 1
        try:
            async with entry.lock:
                yield entry
        finally:
            entry.users -= 1
            if not entry.users:
                del self._claims[key]


@dataclass(frozen=True)
class Content:
    """What is about to be written, as far as it is known, to compare with what is there."""

    #: Bytes that will be written, when known.
    size: int | None = None
    #: CRC32C of the bytes written, when known before writing.
    crc: str | None = None
    #: CRC32C of the plaintext (differs from ``crc`` when encrypting: each envelope is unique).
    plain_crc: str | None = None
    #: The bytes themselves (small objects), for objects of other tools with only an MD5 ETag.
    data: bytes | memoryview | None = None
    #: Computes ``crc`` when it is needed (large objects: only when something is at the name).
    compute: Callable[[], Awaitable[str | None]] | None = None
    #: The metadata and content type it will be written with, when known: an object already there
    #: with the same bytes and these is left as it is even under "overwrite".
    put: PutOptions | None = None


class DestinationCheck:
    """Looks at destination names before writing, under the run's conflict policy."""

    def __init__(
        self, dst: Location, options: TransferOptions, crypt: ClientEncryption, budget: ByteBudget
    ) -> None:
        self.dst = dst
        self.options = options
        self.crypt = crypt
        self.budget = budget

    async def check(self, attempt: Attempt, ours: Content, claim: Claim) -> TransferItem:
        """Look at what is already at the attempt's destination name (the caller holds the name's
        claim): nothing, the same bytes (skipped), or other bytes, which the conflict policy settles.
        Returns the item to write, renamed for keep-both; how it is written is noted in ``attempt``."""
        item = attempt.item
        try:
            existing = await self.dst.store.stat(item.dst_key)
        except NotFoundError:
            return item
        where = self.dst.display(item.dst_key)
        earlier = f" (written from {claim.writer} in this run)" if claim.writer else ""
        policy = self.options.conflict_policy
        same = await self.same_content(existing, ours)
        if policy == "overwrite":
            # The very same object (bytes, metadata, content type) is not written again; the same
            # bytes with other metadata are; a replacement is only of other bytes.
            if same and ours.put is not None and has_metadata(existing, ours.put):
                raise Identical(f"identical object already at {where}{earlier}")
            if not same:
                attempt.outcome, attempt.other = "replaced", earlier
            return item
        if same:
            raise Identical(f"identical bytes already at {where}{earlier}")
        conflict = ConflictError(
            f"{where} already holds other bytes{earlier}",
            hint="choose --on-conflict keep-both (write beside it), overwrite or skip",
        )
        # Beside it, under a name from the CRC32C (of the plaintext: an envelope differs each time),
        # the bytes may already be kept by an earlier keep-both: then they are there.
        crc = ours.plain_crc or ours.crc or (await ours.compute() if ours.compute else None)
        new_key = beside_name(item.dst_key, crc) if crc else None
        beside: ObjectInfo | None = None
        if new_key is not None:
            with contextlib.suppress(NotFoundError):
                beside = await self.dst.store.stat(new_key)
        if (
            new_key is not None
            and beside is not None
            and await self.same_content(beside, replace(ours, crc=ours.crc or crc))
        ):
            raise Identical(f"identical bytes already beside {where}, at {self.dst.display(new_key)}")
        if policy == "skip":
            raise ConflictLeft(conflict)
        if policy == "fail" or new_key is None or beside is not None:
            # fail; or keep-both without a stable name to keep the bytes under, or with other
            # bytes under it: nothing is replaced.
            raise conflict
        attempt.outcome, attempt.other = "kept-both", where
        attempt.named = new_key
        attempt.item = replace(item, dst_key=new_key)
        return attempt.item

    async def same_content(self, existing: ObjectInfo, ours: Content) -> bool:
        """Whether the object already there holds the bytes about to be written (for encrypted
        objects: the same plaintext). Unknown counts as different: nothing is replaced unseen."""
        crypt = self.crypt
        fmt = crypt.detect(existing.key, existing.metadata)
        stored = existing.metadata.get(CHECKSUM_METADATA_KEY)
        if fmt is not None:
            if ours.crc is not None and stored and stored.lower() == ours.crc:
                return True  # the very same ciphertext
            if (
                ours.plain_crc is None
                or crypt.ring is None
                or existing.size > self.options.multipart_threshold
            ):
                return False
            try:
                async with self.budget.reserve(2 * existing.size + ENVELOPE_ROOM):
                    info, blob = await self.dst.store.read(existing.key)
                    url = self.dst.display(existing.key)
                    plain = await asyncio.to_thread(crypt.decrypt, url, fmt, info.metadata, blob)
            except DicomCloudError:
                return False  # not readable with the keys given: not known to be the same
            return crc32c_hex(plain) == ours.plain_crc
        if ours.size is not None and existing.size != ours.size:
            return False
        crc = ours.crc or (await ours.compute() if ours.compute else None)
        if stored:
            return crc is not None and stored.lower() == crc
        if self.dst.is_local and crc is not None:
            return await asyncio.to_thread(crc32c_file, Path("/" + existing.key)) == crc
        etag = md5_etag(existing.etag)
        if ours.data is not None and etag is not None and self.dst.store.features.etag_is_md5:
            return hashlib.md5(ours.data, usedforsecurity=False).hexdigest() == etag
        return False


def beside_name(key: str, crc: str) -> str:
    """Where keep-both writes other bytes met under ``key``: ``name~<crc32c>.ext`` (stable across runs)."""
    stem, dot, ext = key.rpartition(".")
    return f"{stem}~{crc}.{ext}" if dot and "/" not in ext else f"{key}~{crc}"
