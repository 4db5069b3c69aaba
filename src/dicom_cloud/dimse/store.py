"""C-STORE into the archive: the instance a peer sends goes through the archive's own ingest, the
one STOW-RS uses (Part 10 check, preamble zeroed, strict header policy, same conflicts, encryption
when configured), into the tenant of the association.

Concurrent C-STOREs are committed in groups (:class:`GroupCommitter`): the handler of every
association puts its instance on one queue and waits; one committer takes up to
``GROUP_COMMIT_MAX`` waiting instances at a time and stores them through
``Archive.store_instances`` (the batch entry point of STOW-RS: one parse trip, one lookup, objects
written concurrently, one index transaction), then hands each handler its own outcome. While a
group is being stored the next one gathers, so the more associations send at once, the larger the
groups; a lone association sends groups of one, stored as ``Archive.store_instance`` would.

The success status is sent only once the instance's group has been stored: its object, its
sidecar and its index row are written. An association that ends before (aborted, the process
killed) leaves no acknowledged instance behind; the peer sends it again.

Statuses (PS3.4 B.2.3, PS3.7 C):

========  ==========================================================================
0x0000    stored, or the very same instance was already there
0x0111    duplicate SOP instance: this UID is stored with other bytes (nothing changed)
0x0124    refused: the peer is not configured for C-STORE
0xA700    out of resources: the bytes-in-flight budget stayed full, or the store failed
0xC000    cannot understand: not a valid DICOM instance (the reason is in ErrorComment)
0xC001    processing failure: anything else (logged without patient data)
========  ==========================================================================
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Final

from pydicom.dataset import Dataset

from ..archive import Archive, StoredInstance
from ..budget import ByteBudget
from ..errors import ConflictError, DicomCloudError, DicomFormatError, NetworkError, ThrottledError
from .scp import NOT_AUTHORIZED, Listener

log = logging.getLogger("dicom_cloud.dimse")

SUCCESS = 0x0000
DUPLICATE = 0x0111
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0xC001


#: Instances stored together at most: a group's bytes are held at once by the archive's ingest
#: (within its own budget), and its index rows go in one transaction.
GROUP_COMMIT_MAX: Final = 32


class MemoryWait(ThrottledError):
    """The bytes-in-flight budget stayed full for longer than allowed."""


async def within_budget(budget: ByteBudget, size: int, wait: float, work: Any) -> Any:
    """Await ``work`` (a coroutine) holding ``size`` bytes of ``budget``; MemoryWait after ``wait``
    seconds without a share (the coroutine is then closed unstarted)."""
    reservation = budget.reserve(size)
    try:
        await asyncio.wait_for(reservation.__aenter__(), wait)
    except TimeoutError:
        work.close()
        raise MemoryWait("too many bytes in flight") from None
    try:
        return await work
    finally:
        await reservation.__aexit__(None, None, None)


def status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]  # LO
    return ds


@dataclass
class _Waiting:
    tenant: str
    data: bytes
    outcome: asyncio.Future[StoredInstance]


class GroupCommitter:
    """Stores the instances of all associations in groups, on the face's event loop.

    :meth:`store` waits for the instance's own outcome: its StoredInstance, or the error
    ``Archive.store_instance`` would have raised for it (a refusal of that one instance). An error
    of the store itself (it is down) fails every instance of the group, none of which was left
    stored. Run :meth:`run` as a task for as long as the face serves.
    """

    def __init__(self, archive: Archive, group_max: int = GROUP_COMMIT_MAX) -> None:
        self._archive = archive
        self._group_max = group_max
        self._queue: asyncio.Queue[_Waiting] = asyncio.Queue()

    async def store(self, tenant: str, data: bytes) -> StoredInstance:
        outcome: asyncio.Future[StoredInstance] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Waiting(tenant, data, outcome))
        return await outcome

    async def run(self) -> None:
        try:
            while True:
                group = [await self._queue.get()]
                while len(group) < self._group_max and not self._queue.empty():
                    group.append(self._queue.get_nowait())
                await self._commit(group)
        finally:  # stopped: whoever still waits is told, not left hanging
            while not self._queue.empty():
                waiting = self._queue.get_nowait()
                if not waiting.outcome.done():
                    waiting.outcome.set_exception(NetworkError("the DICOM face is stopping"))

    async def _commit(self, group: list[_Waiting]) -> None:
        by_tenant: dict[str, list[_Waiting]] = defaultdict(list)
        for waiting in group:
            by_tenant[waiting.tenant].append(waiting)
        for tenant, members in by_tenant.items():
            try:
                outcomes = await self._archive.store_instances(tenant, [m.data for m in members])
            except DicomCloudError as exc:
                for member in members:
                    _settle(member.outcome, exc)
                continue
            except BaseException as exc:  # cancelled (stopping), or a bug: never leave a waiter
                for member in group:
                    _settle(member.outcome, NetworkError(f"the group was not stored ({type(exc).__name__})"))
                raise
            for member, outcome in zip(members, outcomes, strict=True):
                _settle(member.outcome, outcome)


def _settle(future: asyncio.Future[StoredInstance], outcome: StoredInstance | DicomCloudError) -> None:
    if future.done():  # its handler gave up (cancelled)
        return
    if isinstance(outcome, DicomCloudError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class ArchiveStore:
    """The EVT_C_STORE handler of the archive face."""

    def __init__(self, listener: Listener, committer: GroupCommitter, budget: ByteBudget) -> None:
        self._listener = listener
        self._committer = committer
        self._budget = budget

    def __call__(self, event: Any) -> Dataset:
        caller = self._listener.caller(event)
        if not caller.allows("store"):
            return status(NOT_AUTHORIZED, "C-STORE not allowed for this AE")
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:  # a dataset pynetdicom cannot frame
            return status(CANNOT_UNDERSTAND, "not a DICOM dataset")
        settings = self._listener.settings
        try:
            stored = self._listener.call(
                within_budget(
                    self._budget,
                    len(data),
                    settings.memory_wait_seconds,
                    self._committer.store(caller.tenant, data),
                )
            )
        except DicomFormatError as exc:
            return status(CANNOT_UNDERSTAND, exc.reason or "not a valid DICOM instance")
        except ConflictError:
            return status(DUPLICATE, "SOP Instance UID stored with other bytes")
        except (MemoryWait, NetworkError):
            log.warning("C-STORE refused for lack of resources", extra={"calling_ae": caller.ae_title})
            return status(OUT_OF_RESOURCES, "busy: send again later")
        except DicomCloudError as exc:
            log.error("C-STORE failed", extra={"calling_ae": caller.ae_title, "error": type(exc).__name__})
            return status(PROCESSING_FAILURE, "the archive could not store the instance")
        log.debug("C-STORE", extra={"calling_ae": caller.ae_title, "created": stored.created})
        return status(SUCCESS)
