"""The archive's objects in its store: keys under the archive root, written and read with the
configured client-side encryption and with their CRC32C checked.

Small objects (instances up to ``max_instance_size``, sidecars, renderings) are written and read
whole; large instances are written from a stream and read as one. Plaintext objects carry the
CRC32C of their bytes in metadata; encrypted objects carry the encryption marker (and the CRC32C
of the ciphertext when written whole), their GCM tags authenticating the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

from ..checksum import crc32c_hex
from ..crypto.envelope import ClientEncryption
from ..errors import IntegrityError
from ..store import CHECKSUM_METADATA_KEY, MultipartPlan, ObjectInfo, PutOptions, PutOutcomes, Store

log = logging.getLogger("dicom_cloud.archive")

#: Parts of streamed writes: 8 MiB, 4 in flight.
STREAM_PLAN = MultipartPlan(part_size=8 * 1024 * 1024, concurrency=4)


class ArchiveObjects:
    """Objects of one archive: ``store`` keys are the archive root followed by archive keys."""

    def __init__(self, store: Store, root: str, crypto: ClientEncryption) -> None:
        self.store = store
        self.root = root
        self.crypto = crypto

    @property
    def writes_encrypted(self) -> bool:
        return self.crypto.writes_encrypted

    def key(self, key: str) -> str:
        """The store key of an archive key."""
        return self.root + key

    def archive_key(self, store_key: str) -> str:
        """The archive key of a store key under the root."""
        return store_key[len(self.root) :]

    async def put(
        self, key: str, data: bytes, content_type: str, *, plaintext_crc: str | None = None
    ) -> None:
        """Write an object, encrypted when configured, with the CRC32C of the stored bytes
        (``plaintext_crc``, when the caller knows it, spares computing it again for plaintext)."""
        metadata: dict[str, str] = {}
        stored_crc = plaintext_crc
        if self.crypto.writes_encrypted:
            data = await asyncio.to_thread(self.crypto.encrypt, data)
            metadata.update(self.crypto.marker())
            stored_crc = None
        metadata[CHECKSUM_METADATA_KEY] = stored_crc or await _crc32c_off_loop(data)
        await self.store.put(self.key(key), data, PutOptions(content_type=content_type, metadata=metadata))

    async def put_many(self, items: Sequence[tuple[str, bytes, str, str | None]]) -> PutOutcomes:
        """Write several objects as :meth:`put` writes each (``(key, data, content type,
        plaintext CRC32C or None)``); the error of each, in order (None: written). Their
        encryption and checksums are made in one worker-thread trip, and the store writes them
        as it writes several at once (:meth:`Store.put_many`)."""
        crypto = self.crypto

        def prepared() -> list[tuple[str, bytes | memoryview, PutOptions]]:
            out: list[tuple[str, bytes | memoryview, PutOptions]] = []
            for key, data, content_type, plaintext_crc in items:
                metadata: dict[str, str] = {}
                stored: bytes | memoryview = data
                stored_crc = plaintext_crc
                if crypto.writes_encrypted:
                    stored = crypto.encrypt(data)
                    metadata.update(crypto.marker())
                    stored_crc = None
                metadata[CHECKSUM_METADATA_KEY] = stored_crc or crc32c_hex(stored)
                out.append((self.key(key), stored, PutOptions(content_type=content_type, metadata=metadata)))
            return out

        if crypto.writes_encrypted or sum(len(d) for _, d, _, crc in items if crc is None) > _HASH_ON_LOOP:
            writes = await asyncio.to_thread(prepared)
        else:
            writes = prepared()  # a few small checksums: less than a trip to a thread
        return await self.store.put_many(writes)

    async def put_stream(
        self, key: str, chunks: AsyncIterator[bytes], content_type: str, plaintext_crc: str
    ) -> None:
        """Write a large object from a stream (multipart), encrypted when configured. Plaintext
        objects carry their CRC32C, known beforehand; encrypted ones rely on their GCM tags. A
        ``chunks`` that raises before its end leaves no object (the upload is not completed)."""
        metadata: dict[str, str] = {}
        body: AsyncIterator[bytes] = chunks
        if self.crypto.writes_encrypted:
            metadata.update(self.crypto.marker())
            body = _encrypted(self.crypto, chunks)
        else:
            metadata[CHECKSUM_METADATA_KEY] = plaintext_crc
        options = PutOptions(content_type=content_type, metadata=metadata)
        await self.store.put_stream(self.key(key), body, options, STREAM_PLAN)

    async def get(self, key: str) -> bytes:
        """A whole object, CRC32C checked and decrypted. NotFoundError when missing."""
        return (await self.get_with_crc(key))[0]

    async def get_with_crc(self, key: str) -> tuple[bytes, str | None]:
        """:meth:`get`, and the CRC32C of the plaintext when it was computed on the way (objects
        stored in clear carry theirs): a caller checking it against the index need not compute it
        again. None for encrypted objects."""
        if self.reads_now:
            # Read, check and decrypt in one worker-thread call: one hop per object.
            return await asyncio.to_thread(self.get_with_crc_now, key)
        full = self.key(key)
        info, blob = await self.store.read(full)
        if len(blob) <= _HASH_ON_LOOP and self.crypto.detect(full, info.metadata) is None:
            return self._opened(full, info, blob)
        return await asyncio.to_thread(self._opened, full, info, blob)

    @property
    def reads_now(self) -> bool:
        """Whether :meth:`get_with_crc_now` can read (the store reads with blocking calls)."""
        return self.store.features.read_now

    def get_with_crc_now(self, key: str) -> tuple[bytes, str | None]:
        """:meth:`get_with_crc` as a blocking call, for a worker thread (only where
        :attr:`reads_now`)."""
        full = self.key(key)
        return self._opened(full, *self.store.read_now(full))

    def _opened(self, full: str, info: ObjectInfo, blob: bytes | memoryview) -> tuple[bytes, str | None]:
        """An object's bytes as read, CRC32C-checked when it carries one, and decrypted."""
        recorded = info.metadata.get(CHECKSUM_METADATA_KEY)
        crc = crc32c_hex(blob) if recorded is not None else None
        if recorded is not None and crc != recorded:
            raise IntegrityError(f"{self.store.url(full)} does not match its recorded CRC32C")
        fmt = self.crypto.detect(full, info.metadata)
        if fmt is None:
            return bytes(blob), crc
        return self.crypto.decrypt(self.store.url(full), fmt, info.metadata, blob), None

    async def stream(self, key: str, chunk_size: int = 1024 * 1024) -> AsyncIterator[bytes]:
        """An object's plaintext as chunks, about one chunk in memory. An encrypted object's last
        authentication happens when the stream ends (IntegrityError then); the caller checks the
        plaintext's size and CRC32C."""
        full = self.key(key)
        info = await self.store.stat(full)
        fmt = self.crypto.detect(full, info.metadata)
        decryptor = None
        if fmt is not None:
            head = bytes(await self.store.get_range(full, 0, min(16, info.size))) if info.size else b""
            decryptor = self.crypto.decryptor(self.store.url(full), fmt, info.metadata, head)
        async for chunk in self.store.stream(full, chunk_size=chunk_size):
            out = decryptor.update(chunk) if decryptor is not None else bytes(chunk)
            if out:
                yield out
        if decryptor is not None:
            tail = decryptor.finalize()
            if tail:
                yield tail

    async def delete(self, keys: Sequence[str], prefixes: Sequence[str] = ()) -> None:
        """Remove objects (and everything under ``prefixes``) after their rows are gone. A failure
        leaves unreferenced objects behind: it is logged, without keys, and not raised."""
        limit = asyncio.Semaphore(16)

        async def under(prefix: str) -> list[str]:
            async with limit:
                return [info.key async for info in self.store.list(self.key(prefix))]

        try:
            found = [self.key(k) for k in keys]
            for listed in await asyncio.gather(*(under(p) for p in prefixes)):
                found += listed
            for start in range(0, len(found), 1000):
                await self.store.delete(found[start : start + 1000])
        except Exception as exc:
            log.warning("objects left behind after a delete: %s (%d keys)", type(exc).__name__, len(keys))


#: Hashing this much takes microseconds, less than a hop to a worker thread (CRC32C runs at
#: about 25 GB/s here: 40 us for 1 MiB, where a hop costs more CPU and a wake-up).
_HASH_ON_LOOP = 1024 * 1024


async def _crc32c_off_loop(data: bytes | memoryview) -> str:
    """The CRC32C of ``data``, in a worker thread unless it is small: the event loop stays free."""
    if len(data) <= _HASH_ON_LOOP:
        return crc32c_hex(data)
    return await asyncio.to_thread(crc32c_hex, data)


async def _encrypted(crypto: ClientEncryption, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    encryptor = crypto.encryptor()
    yield encryptor.header
    async for chunk in chunks:
        out = encryptor.update(chunk)
        if out:
            yield out
    yield encryptor.finalize()
