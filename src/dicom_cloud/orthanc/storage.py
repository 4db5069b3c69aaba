"""The storage area Orthanc calls: create, read and remove attachments on object storage (and disk).

Orthanc calls these from many threads at once, synchronously, with whole attachments in memory.
The stores are asynchronous, so one event loop runs in a thread of its own (:class:`LoopThread`)
and each call waits for its coroutine there. Everything follows the C++ plugins (v2.5.4):

- names: :meth:`PluginConfig.object_name` (flat or legacy, RootPath, ``.enc``) on object storage,
  Orthanc's own ``aa/bb/uuid`` under ``StorageDirectory`` on the file system;
- hybrid mode: create on the primary side only; read the primary, then the secondary; remove from
  both, primary first;
- encryption: A1 (:mod:`dicom_cloud.crypto.a1`) on whatever is written, on either side, with at most
  ``MaxConcurrentInputSize`` bytes being encrypted or decrypted at once (:class:`ByteBudget`);
- ``EnableLegacyUnknownFiles``: reads try the normal name, then the ``.unk`` one; removes take both.

Failures: a create that fails raises, so Orthanc answers an error and indexes nothing. When a later
attachment of the same instance fails after its DICOM file was written (Orthanc 1.10 writes the
``.dcm`` then the ``.dcm.head`` and does not clean up), the DICOM file is removed too. A removal
that fails is recorded in :class:`PendingRemovals` and retried, never dropped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from ..budget import ByteBudget
from ..crypto import a1
from ..dicom.layout import OrthancContentType
from ..errors import DicomCloudError, NotFoundError, UsageError
from ..store import PutOptions, Store
from . import HybridMode
from .config import PluginConfig
from .removals import PendingRemovals

log = logging.getLogger(__name__)

T = TypeVar("T")
StorageName = Literal["object-storage", "file-system"]
OBJECT_STORAGE: StorageName = "object-storage"
FILE_SYSTEM: StorageName = "file-system"

#: How long after a DICOM attachment's create a failed create of another attachment on the same
#: thread is taken to belong to the same instance (Orthanc writes them back to back).
_SAME_INSTANCE_WINDOW = 60.0


class LoopThread:
    """An asyncio event loop in a daemon thread, for synchronous callers in any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="dicom-cloud-io", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@dataclass(frozen=True)
class Side:
    """One place attachments can be: object storage or Orthanc's StorageDirectory."""

    name: StorageName
    store: Store
    config: PluginConfig

    def names(self, uuid: str, content_type: int) -> list[str]:
        """Candidate keys of an attachment: the one written first, then the alternates read too."""
        if self.name == FILE_SYSTEM:
            return [f"{uuid[0:2]}/{uuid[2:4]}/{uuid}"]
        names = [self.config.object_name(uuid, content_type)]
        if self.config.legacy_unknown_files and self.config.structure == "flat":
            alternate = self.config.object_name(uuid, content_type, alternate=True)
            if alternate not in names:
                names.append(alternate)
        return names


class StorageArea:
    """What Orthanc's ``RegisterStorageArea`` gets, plus the moves of ``/move-storage``."""

    def __init__(
        self,
        config: PluginConfig,
        object_store: Store,
        removals: PendingRemovals,
        *,
        file_system: Store | None = None,
        loop: LoopThread | None = None,
    ) -> None:
        self.config = config
        self.removals = removals
        self.object_storage = Side(OBJECT_STORAGE, object_store, config)
        self.file_system: Side | None = None
        if config.hybrid_mode is not HybridMode.DISABLED:
            if file_system is None:
                raise UsageError("hybrid mode needs the StorageDirectory store")
            self.file_system = Side(FILE_SYSTEM, file_system, config)
        self._loop = loop or LoopThread()
        self._owns_loop = loop is None
        encryption = config.encryption
        self._budget = ByteBudget(encryption.max_concurrent_input_size) if encryption else None
        self._recent = threading.local()
        self._put_options = PutOptions(tags=dict(config.tags), storage_class=config.storage_class)

    # -- sides -------------------------------------------------------------------------

    @property
    def primary(self) -> Side:
        if self.config.hybrid_mode is HybridMode.WRITE_TO_FILE_SYSTEM:
            assert self.file_system is not None
            return self.file_system
        return self.object_storage

    @property
    def sides(self) -> list[Side]:
        """Primary first, then the secondary (hybrid mode only)."""
        if self.file_system is None:
            return [self.object_storage]
        primary = self.primary
        return [primary, self.file_system if primary is self.object_storage else self.object_storage]

    def side(self, name: StorageName) -> Side:
        for side in self.sides:
            if side.name == name:
                return side
        raise UsageError(f"the {name} storage is not in use (HybridMode is Disabled)")

    # -- Orthanc's callbacks -------------------------------------------------------------

    def create(self, uuid: str, content_type: int, data: bytes) -> None:
        """Write an attachment to the primary side; raises (Orthanc then indexes nothing) on failure."""
        try:
            self._loop.run(self._create(self.primary, uuid, content_type, data))
        except BaseException:
            self._forget_partial_instance(uuid, content_type)
            raise
        self._remember(uuid, content_type)

    def read(self, uuid: str, content_type: int) -> bytes:
        """The attachment's bytes, from the first side that has it."""
        return self._loop.run(self._read(uuid, content_type))

    def remove(self, uuid: str, content_type: int) -> None:
        """Remove from every side; what cannot be removed now is recorded and retried later."""
        for side in self.sides:
            self._remove_keys(side, side.names(uuid, content_type))

    # -- moves -------------------------------------------------------------------------

    def move(self, uuid: str, content_type: int, target: StorageName) -> bool:
        """Move one attachment to ``target``; False when it was there already (nothing done)."""
        return self._loop.run(self._move(uuid, content_type, target))

    def retry_removals(self) -> tuple[int, int]:
        """Try the recorded removals again: (removed now, still pending)."""
        return self.removals.retry(self._remove_now)

    def close(self) -> None:
        for side in self.sides:
            self._loop.run(side.store.close())
        if self._owns_loop:
            self._loop.close()

    # -- implementation ----------------------------------------------------------------

    async def _create(self, side: Side, uuid: str, content_type: int, data: bytes) -> None:
        payload = await self._encrypt(data) if self.config.encryption else data
        key = side.names(uuid, content_type)[0]
        options = self._put_options if side.name == OBJECT_STORAGE else PutOptions()
        await side.store.put(key, payload, options)
        if len(self.removals):
            # A key being written again is not one to remove any more (a retried removal would
            # otherwise delete the new attachment).
            self.removals.discard(side.name, [key])

    async def _read(self, uuid: str, content_type: int) -> bytes:
        for side in self.sides:
            found = await self._read_raw(side, uuid, content_type)
            if found is not None:
                return await self._decrypt(side, found[1])
        names = ", ".join(n for side in self.sides for n in side.names(uuid, content_type))
        raise NotFoundError(f"attachment {uuid} not found (looked for {names})")

    async def _read_raw(self, side: Side, uuid: str, content_type: int) -> tuple[str, bytes] | None:
        """The stored bytes and the key they were found under, or None when the side lacks them."""
        for key in side.names(uuid, content_type):
            try:
                return key, bytes(await side.store.get(key))
            except NotFoundError:
                continue
        return None

    async def _encrypt(self, data: bytes) -> bytes:
        encryption = self.config.encryption
        assert encryption is not None and self._budget is not None
        self._check_size(len(data))
        async with self._budget.reserve(len(data)):
            return await asyncio.to_thread(a1.encrypt, data, encryption.ring)

    async def _decrypt(self, side: Side, data: bytes) -> bytes:
        encryption = self.config.encryption
        if encryption is None:
            return data
        assert self._budget is not None
        if side.name == FILE_SYSTEM and not data.startswith(a1.MAGIC):
            # Files Orthanc wrote to its StorageDirectory before encryption was configured are read
            # as they are, so that a file-system store can be migrated with encryption on.
            return data
        self._check_size(len(data))
        async with self._budget.reserve(len(data)):
            return await asyncio.to_thread(a1.decrypt, data, encryption.ring)

    def _check_size(self, size: int) -> None:
        encryption = self.config.encryption
        assert encryption is not None
        if size > encryption.max_concurrent_input_size:
            limit = encryption.max_concurrent_input_size // (1024 * 1024)
            raise UsageError(
                f"an attachment of {size} bytes is larger than MaxConcurrentInputSize ({limit} MB)",
                hint="raise StorageEncryption.MaxConcurrentInputSize (in MB)",
            )

    async def _move(self, uuid: str, content_type: int, target_name: StorageName) -> bool:
        target = self.side(target_name)
        source = next(s for s in self.sides if s is not target)
        if await self._read_raw(target, uuid, content_type) is not None:
            return False  # already where it belongs
        found = await self._read_raw(source, uuid, content_type)
        if found is None:
            raise NotFoundError(f"attachment {uuid} is on neither storage")
        source_key, payload = found
        if self.config.encryption is not None and not payload.startswith(a1.MAGIC):
            payload = await self._encrypt(payload)  # a plain file-system file (see _decrypt)
        key = target.names(uuid, content_type)[0]
        options = self._put_options if target.name == OBJECT_STORAGE else PutOptions()
        await target.store.put(key, payload, options)
        self.removals.discard(target.name, [key])
        try:
            await source.store.delete([source_key])
        except DicomCloudError as exc:
            self.removals.add(source.name, [source_key], exc)
        return True

    def _remove_keys(self, side: Side, keys: list[str]) -> None:
        try:
            self._remove_now(side.name, keys)
        except DicomCloudError as exc:
            log.warning("removing %s from %s failed, recorded for retry: %s", keys, side.name, exc)
            self.removals.add(side.name, keys, exc)

    def _remove_now(self, storage: str, keys: list[str]) -> None:
        side = self.side(storage)  # type: ignore[arg-type]
        self._loop.run(side.store.delete(keys))

    # -- the DICOM file of an instance whose next attachment failed -----------------------

    def _remember(self, uuid: str, content_type: int) -> None:
        if content_type == OrthancContentType.DICOM:
            self._recent.dicom = (uuid, time.monotonic())

    def _forget_partial_instance(self, uuid: str, content_type: int) -> None:
        recent: tuple[str, float] | None = getattr(self._recent, "dicom", None)
        self._recent.dicom = None
        if content_type == OrthancContentType.DICOM or recent is None:
            return
        dicom_uuid, when = recent
        if time.monotonic() - when > _SAME_INSTANCE_WINDOW:
            return
        log.warning("attachment %s failed after DICOM file %s was written: removing it", uuid, dicom_uuid)
        side = self.primary
        self._remove_keys(side, side.names(dicom_uuid, OrthancContentType.DICOM))


def local_store(directory: Path) -> Store:
    """A local directory as a store (the file-system side, and the DicomCloudLocalStorage backend)."""
    from ..backends.local import LocalStore

    directory.mkdir(parents=True, exist_ok=True)
    return LocalStore(directory.resolve())
