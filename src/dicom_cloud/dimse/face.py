"""The archive's DIMSE face: C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET over one :class:`Archive`,
run alone (``dicom-cloud dimse``) or beside the DICOMweb service (``dicom-cloud serve
--dicom-port``), where it runs in a thread of the main process with an event loop and an archive
of its own (one listener, whatever the number of HTTP workers)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

from pynetdicom import evt

from ..archive import Archive, ArchiveSettings
from ..budget import ByteBudget
from .config import DimseSettings
from .find import ArchiveFind
from .retrieve import ArchiveGet, ArchiveMove
from .scp import Listener
from .store import ArchiveStore, GroupCommitter

#: Seconds ``start_in_thread``'s stop waits for the face to close before leaving it to the exit.
_STOP_WAIT = 0.5


def archive_listener(
    settings: DimseSettings, archive: Archive, committer: GroupCommitter, loop: asyncio.AbstractEventLoop
) -> Listener:
    """A listener answering C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET from ``archive``; its
    C-STOREs are stored by ``committer`` (whose ``run`` must be running on ``loop``)."""
    listener = Listener(settings, query_retrieve=True, loop=loop)
    budget = ByteBudget(settings.max_bytes_in_flight)
    listener.on(evt.EVT_C_STORE, ArchiveStore(listener, committer, budget))
    listener.on(evt.EVT_C_FIND, ArchiveFind(listener, archive))
    listener.on(evt.EVT_C_MOVE, ArchiveMove(listener, archive))
    listener.on(evt.EVT_C_GET, ArchiveGet(listener, archive))
    return listener


async def run_archive_face(
    settings: DimseSettings,
    archive_settings: ArchiveSettings,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Open the archive and serve DIMSE until cancelled."""
    settings = settings.check()
    async with await Archive.open(archive_settings) as archive:
        committer = GroupCommitter(archive)
        committing = asyncio.create_task(committer.run(), name="dicom-cloud-dimse-commit")
        try:
            listener = archive_listener(settings, archive, committer, asyncio.get_running_loop())
            port = listener.start()
            if on_ready is not None:
                on_ready(port)
            try:
                await asyncio.Event().wait()
            finally:
                await asyncio.to_thread(listener.stop)
        finally:
            committing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await committing


def start_in_thread(
    settings: DimseSettings, archive_settings: ArchiveSettings
) -> tuple[int, Callable[[], None]]:
    """Run the face in a thread (beside uvicorn); returns its port and the function that stops it.
    Fails here,
    in the caller's thread, when the face cannot start (port taken, bad TLS files)."""
    loop = asyncio.new_event_loop()
    ready: list[int | BaseException] = []
    started = threading.Event()

    def mark(port: int) -> None:
        ready.append(port)
        started.set()

    async def main() -> None:
        try:
            await run_archive_face(settings, archive_settings, mark)
        except BaseException as exc:
            ready.append(exc)
            started.set()
            raise

    task = loop.create_task(main())

    def run() -> None:
        asyncio.set_event_loop(loop)
        # Cancelled by stop(), or a failure already handed to the caller.
        with contextlib.suppress(BaseException):
            loop.run_until_complete(task)

    thread = threading.Thread(target=run, name="dicom-cloud-dimse", daemon=True)
    thread.start()
    started.wait()
    first = ready[0]
    if isinstance(first, BaseException):
        thread.join()
        raise first

    def stop() -> None:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(_STOP_WAIT)

    return first, stop


__all__ = ["archive_listener", "run_archive_face", "start_in_thread"]
