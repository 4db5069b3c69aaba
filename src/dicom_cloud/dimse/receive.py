"""``dicom-cloud receive``: a C-STORE SCP that lands what modalities send in a bucket, with no
index: the transfer engine writes each instance as ``dicom-cloud upload`` would (``--layout``,
``--encrypt``, ``--deidentify``, ``--dicom-tags``, ``--on-conflict``, the selection flags), and
the job's journal records every instance written.

Each received instance is first written to a spool directory (private to the user), then handed to
one long-running transfer from the spool to the destination; the C-STORE is answered once the
engine reports the object written and verified at the destination, and the spool file is then
removed. Spool files left by a run that was killed (received, never acknowledged) are sent first
when ``receive`` starts again with the same spool: the journal skips those the killed run had
finished writing.

Statuses: 0x0000 written (or identical bytes already there, or left out by a selection flag);
0x0111 other bytes already under the name (--on-conflict fail); 0xC000 not DICOM (--validate, or
a header the engine cannot read); 0xA700 the destination failed or memory stayed full: the
modality sends again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from ..budget import ByteBudget
from ..dicom.manifest import ManifestWriter
from ..errors import ConflictError, DicomCloudError, DicomFormatError
from ..journal import Journal
from ..location import Location
from ..transfer import Transfer, TransferEvent, TransferItem, TransferOptions, TransferSummary
from .config import DimseSettings
from .scp import NOT_AUTHORIZED, Listener
from .store import (
    CANNOT_UNDERSTAND,
    DUPLICATE,
    OUT_OF_RESOURCES,
    SUCCESS,
    MemoryWait,
    status,
    within_budget,
)

log = logging.getLogger("dicom_cloud.dimse")
_SPOOL_SUFFIX = ".dcm"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


class Router:
    """Received instances -> spool -> one Transfer into ``destination``."""

    def __init__(
        self,
        spool: Location,
        destination: Location,
        options: TransferOptions,
        *,
        journal: Journal | None = None,
        on_event: Callable[[TransferEvent], None] | None = None,
        manifest: ManifestWriter | None = None,
    ) -> None:
        if not spool.is_local:
            raise DicomCloudError("the spool must be a local directory")
        self._spool = spool
        self._directory = Path("/" + spool.prefix)
        self._destination = destination
        self._options = options
        self._journal = journal
        self._manifest = manifest
        self._on_event = on_event
        self._queue: asyncio.Queue[TransferItem | None] = asyncio.Queue()
        self._waiting: dict[str, asyncio.Future[TransferEvent]] = {}
        self._transfer: Transfer | None = None
        #: Spool files in flight, by the source name the engine's events carry.
        self._paths: dict[str, Path] = {}

    async def run(self) -> TransferSummary:
        """Run the transfer until :meth:`close`; spool files of an earlier run go first."""
        for leftover in sorted(self._directory.glob("*" + _SPOOL_SUFFIX)):
            await self._queue.put(self._item(leftover))
        self._transfer = Transfer(
            self._spool,
            self._destination,
            recursive=True,
            options=self._options,
            on_event=self._event,
            journal=self._journal,
            manifest=self._manifest,
            items=self._items(),
        )
        try:
            return await self._transfer.run()
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.cancel()

    async def close(self) -> None:
        await self._queue.put(None)

    async def _items(self) -> AsyncIterator[TransferItem]:
        while (item := await self._queue.get()) is not None:
            yield item

    def _item(self, path: Path) -> TransferItem:
        info = path.stat()
        self._paths[self._spool.display(str(path).lstrip("/"))] = path
        return TransferItem(
            str(path).lstrip("/"),
            self._destination.join(path.name),
            info.st_size,
            path.name,
            f"mtime:{info.st_size}:{info.st_mtime}",
        )

    def _event(self, event: TransferEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)
        if event.kind in ("completed", "skipped", "failed"):
            future = self._waiting.pop(event.src, None)
            if future is not None and not future.done():
                future.set_result(event)
        if event.kind in ("completed", "skipped", "failed"):
            path = self._paths.pop(event.src, None)
            if path is not None and event.kind != "failed":
                # Written (or needing no write): the spool copy has done its work.
                path.unlink(missing_ok=True)

    async def receive(self, data: bytes) -> int:
        """Spool ``data``, have it written to the destination, and return the C-STORE status."""
        path = self._directory / f"{uuid.uuid4().hex}{_SPOOL_SUFFIX}"
        await asyncio.to_thread(_write_private, path, data)
        item = self._item(path)
        future: asyncio.Future[TransferEvent] = asyncio.get_running_loop().create_future()
        self._waiting[self._spool.display(item.src_key)] = future
        await self._queue.put(item)
        event = await future
        if event.kind == "completed":
            return SUCCESS
        error = event.error
        if event.kind == "skipped" and not isinstance(error, DicomFormatError):
            return SUCCESS  # identical, or left out by a selection flag, or a conflict left alone
        path.unlink(missing_ok=True)
        if isinstance(error, ConflictError):
            return DUPLICATE
        if isinstance(error, DicomFormatError):
            return CANNOT_UNDERSTAND
        return OUT_OF_RESOURCES


class RouterStore:
    """The EVT_C_STORE handler of ``receive``."""

    def __init__(self, listener: Listener, router: Router, settings: DimseSettings) -> None:
        self._listener = listener
        self._router = router
        self._budget = ByteBudget(settings.max_bytes_in_flight)
        self._wait = settings.memory_wait_seconds

    def __call__(self, event: Any) -> Dataset:
        caller = self._listener.caller(event)
        if not caller.allows("store"):
            return status(NOT_AUTHORIZED, "C-STORE not allowed for this AE")
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:
            return status(CANNOT_UNDERSTAND, "not a DICOM dataset")
        try:
            code = self._listener.call(
                within_budget(self._budget, len(data), self._wait, self._router.receive(data))
            )
        except MemoryWait:
            return status(OUT_OF_RESOURCES, "busy: send again later")
        except (DicomCloudError, OSError, asyncio.CancelledError) as exc:
            log.error("C-STORE could not be routed", extra={"error": type(exc).__name__})
            return status(OUT_OF_RESOURCES, "the destination could not be written")
        return status(code)
