"""C-STORE into the archive: the instance a peer sends goes through the archive's own ingest, the
one STOW-RS uses (Part 10 check, preamble zeroed, strict header policy, same conflicts, encryption
when configured), into the tenant of the association.

The success status is sent only once ``Archive.store_instance`` has returned: the object, its
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
from typing import Any

from pydicom.dataset import Dataset

from ..archive import Archive
from ..budget import ByteBudget
from ..errors import ConflictError, DicomCloudError, DicomFormatError, NetworkError
from .scp import NOT_AUTHORIZED, Listener

log = logging.getLogger("dicom_cloud.dimse")

SUCCESS = 0x0000
DUPLICATE = 0x0111
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0xC001


class MemoryWait(DicomCloudError):
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


class ArchiveStore:
    """The EVT_C_STORE handler of the archive face."""

    def __init__(self, listener: Listener, archive: Archive, budget: ByteBudget) -> None:
        self._listener = listener
        self._archive = archive
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
                    self._archive.store_instance(caller.tenant, data),
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
