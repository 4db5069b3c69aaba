"""Large STOW-RS requests handed to the ingest queue: staged as they arrive, ingested by workers.

With ``ingest_queue`` on, a ``POST /studies`` whose Content-Length is above ``stow_queue_bytes``
is not stored in the request: its parts are written to staging as they arrive (one upload
session, a file per part), the session is queued, and the answer is ``202`` with the session's
status URL, as a queued upload completion answers (docs/service.md, "Ingest queue"). The
workers ingest the parts as they ingest presigned uploads: same checks, same conflicts, outcomes
per part on the status URL. A request that fails while it is read (malformed framing, a part too
large, the client gone) leaves nothing staged and nothing queued.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse

from .auth import Principal
from .deps import ArchiveDep, SettingsDep
from .memory import RequestMemory
from .multipart import RelatedReader, body_chunks
from .routes.uploads import queue_completion
from .stow import memory_share

if TYPE_CHECKING:  # the queue needs the postgres extra; a service without it never has one
    from ..archive.queue import IngestQueue


def is_queued(request: Request, settings: SettingsDep, study: str | None) -> IngestQueue | None:
    """The queue, if this STOW-RS request goes to it: ingest queue on, ``POST /studies`` (a
    request naming its study is checked part by part in the request), and a declared length
    above ``stow_queue_bytes``."""
    queue: IngestQueue | None = getattr(request.app.state, "ingest_queue", None)
    declared = request.headers.get("content-length")
    if queue is None or study is not None or not settings.stow_queue_bytes:
        return None
    if not (declared and declared.isdigit() and int(declared) > settings.stow_queue_bytes):
        return None
    return queue


async def queue_stow(
    request: Request,
    queue: IngestQueue,
    principal: Principal,
    archive: ArchiveDep,
    settings: SettingsDep,
    boundary: str,
    default_type: str,
) -> JSONResponse:
    """Stage the parts, queue the session, answer 202 + Location (the status URL)."""
    memory: RequestMemory = request.app.state.request_memory
    share = memory_share(settings.stow_part_memory_bytes, request.headers.get("content-length"))
    async with memory.reserve(share):
        reader = RelatedReader(body_chunks(request, settings.stow_max_bytes), boundary, default_type)
        session = await archive.stage_upload(principal.tenant, _parts(reader))
    answer = await queue_completion(request, queue, archive, principal.tenant, session.id, settings)
    assert isinstance(answer, JSONResponse)  # a new session is never completed already
    return answer


async def _parts(reader: RelatedReader) -> AsyncIterator[tuple[str, AsyncIterator[bytes]]]:
    while (content_type := await reader.next_part()) is not None:
        yield content_type, _content(reader)


async def _content(reader: RelatedReader) -> AsyncIterator[bytes]:
    while chunk := await reader.read():
        yield chunk
