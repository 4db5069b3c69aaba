"""Presigned upload sessions: the files a client declared, the staging key each one goes to, and
the state of the session (pending → completing → completed; or expired).

With an ingest queue (archive/queue.py) a completion is queued first: pending → queued →
completing (a worker took it; again after a worker died) → completed, or failed when every
attempt failed (completing again queues it anew)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ..errors import NotFoundError, UsageError
from .bucket import BucketLayout
from .index import utc
from .models import UploadSessionRow
from .records import DeclaredFile, UploadSession, UploadState

MAX_FILES: Final = 1000
MAX_LIFETIME: Final = timedelta(days=7)
_STATES: Final = ("pending", "queued", "completing", "completed", "failed", "expired")
_CRC: Final = re.compile(r"[0-9a-f]{8}")


def _declared(f: Mapping[str, Any]) -> DeclaredFile:
    put_by = f.get("put_by")
    return DeclaredFile(
        str(f["name"]),
        int(str(f["size"])),
        str(f["crc32c"]) if f.get("crc32c") else None,
        content_type=str(f["content_type"]) if f.get("content_type") else None,
        put_by=datetime.fromisoformat(str(put_by)) if put_by else None,
    )


def _stored(f: DeclaredFile) -> dict[str, Any]:
    """A declared file as kept in the session row (JSON; keys added later are optional)."""
    out: dict[str, Any] = {"name": f.name, "size": f.size, "crc32c": f.crc32c}
    if f.content_type:
        out["content_type"] = f.content_type
    if f.put_by is not None:
        out["put_by"] = f.put_by.astimezone(UTC).isoformat()
    return out


def _session(row: UploadSessionRow) -> UploadSession:
    files = tuple(_declared(f) for f in row.files)
    return UploadSession(
        id=row.id,
        tenant=row.tenant,
        files=files,
        staging_keys=tuple(row.staging_keys),
        state=row.state,  # type: ignore[arg-type]
        created=utc(row.created),
        expires=utc(row.expires),
        result=row.result,
    )


def check_files(files: Sequence[DeclaredFile], max_size: int) -> list[DeclaredFile]:
    if not files:
        raise UsageError("an upload declares at least one file")
    if len(files) > MAX_FILES:
        raise UsageError(
            f"an upload declares at most {MAX_FILES} files", hint="split it into several uploads"
        )
    out = []
    for i, f in enumerate(files):
        if not isinstance(f.size, int) or not 0 < f.size <= max_size:
            raise UsageError(f"file {i}: size must be between 1 and {max_size} bytes")
        if not f.name or len(f.name) > 1024 or any(ord(c) < 32 or c == "\x7f" for c in f.name):
            raise UsageError(f"file {i}: name must have 1 to 1024 characters, no control characters")
        crc = f.crc32c.lower() if f.crc32c else None
        if crc is not None and not _CRC.fullmatch(crc):
            raise UsageError(f"file {i}: crc32c must be 8 hex digits")
        out.append(DeclaredFile(f.name, f.size, crc, content_type=f.content_type, put_by=f.put_by))
    return out


def new_session_id() -> str:
    return secrets.token_hex(16)


def create(
    session: Session,
    tenant: str,
    files: Sequence[DeclaredFile],
    expires_in: timedelta,
    max_size: int,
    session_id: str | None = None,
) -> UploadSession:
    """A new pending session (``session_id``: one chosen by :func:`new_session_id` before its
    files were staged, as a queued STOW-RS request does)."""
    if not timedelta(0) < expires_in <= MAX_LIFETIME:
        raise UsageError("an upload session lasts more than 0 seconds and at most 7 days")
    checked = check_files(files, max_size)
    session_id = session_id or new_session_id()
    now = datetime.now(UTC)
    row = UploadSessionRow(
        id=session_id,
        tenant=tenant,
        files=[_stored(f) for f in checked],
        staging_keys=[BucketLayout.staging_key(tenant, session_id, i) for i in range(len(checked))],
        state="pending",
        created=now,
        expires=now + expires_in,
        result=None,
    )
    session.add(row)
    session.flush()
    return _session(row)


def _row(session: Session, tenant: str, session_id: str) -> UploadSessionRow:
    row = session.scalar(
        select(UploadSessionRow).where(UploadSessionRow.tenant == tenant, UploadSessionRow.id == session_id)
    )
    if row is None:
        raise NotFoundError("no such upload session")
    return row


def get(session: Session, tenant: str, session_id: str) -> UploadSession:
    return _session(_row(session, tenant, session_id))


def set_state(
    session: Session,
    tenant: str,
    session_id: str,
    state: UploadState,
    result: Mapping[str, Any] | None = None,
) -> UploadSession:
    if state not in _STATES:
        raise UsageError(f"unknown upload state '{state}'")
    row = _row(session, tenant, session_id)
    row.state = state
    if result is not None:
        row.result = dict(result)
    session.flush()
    return _session(row)


def claim(session: Session, tenant: str, session_id: str, now: datetime) -> tuple[UploadSession, bool]:
    """Move a pending, unexpired session to ``completing``, atomically (one conditional UPDATE, so
    two service instances completing the same session at once cannot both win).

    Returns the session and whether this caller claimed it. An expired pending session is marked
    ``expired`` and returned unclaimed, as is a session already completing or completed.
    """
    owned = (UploadSessionRow.tenant == tenant, UploadSessionRow.id == session_id)
    claimed = session.execute(
        update(UploadSessionRow)
        .where(*owned, UploadSessionRow.state == "pending", UploadSessionRow.expires > now)
        .values(state="completing")
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount == 1:  # type: ignore[attr-defined]
        return get(session, tenant, session_id), True
    return _unclaimed(session, tenant, session_id, now), False


def claim_for_queue(
    session: Session, tenant: str, session_id: str, now: datetime
) -> tuple[UploadSession, bool]:
    """Move a pending, unexpired session (or a failed one, to try again) to ``queued``, atomically
    as :func:`claim`. Returns the session and whether this caller queued it; an expired pending
    session is marked ``expired`` and returned unclaimed."""
    owned = (UploadSessionRow.tenant == tenant, UploadSessionRow.id == session_id)
    claimed = session.execute(
        update(UploadSessionRow)
        .where(
            *owned,
            ((UploadSessionRow.state == "pending") & (UploadSessionRow.expires > now))
            | (UploadSessionRow.state == "failed"),
        )
        .values(state="queued")  # a failed session keeps the outcomes recorded so far
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount == 1:  # type: ignore[attr-defined]
        return get(session, tenant, session_id), True
    return _unclaimed(session, tenant, session_id, now), False


def _unclaimed(session: Session, tenant: str, session_id: str, now: datetime) -> UploadSession:
    """The session a claim did not take, marked ``expired`` first if it was pending past its expiry."""
    session.execute(
        update(UploadSessionRow)
        .where(
            UploadSessionRow.tenant == tenant,
            UploadSessionRow.id == session_id,
            UploadSessionRow.state == "pending",
            UploadSessionRow.expires <= now,
        )
        .values(state="expired")
        .execution_options(synchronize_session=False)
    )
    session.expire_all()
    return get(session, tenant, session_id)


def claim_for_worker(session: Session, tenant: str, session_id: str) -> tuple[UploadSession, bool]:
    """Move a ``queued`` session to ``completing`` for the job that ingests it. A session already
    ``completing`` is claimed too: the queue hands a job to one worker at a time, so that state
    is what a worker that died (or was stopped) mid-job left. Anything else is not claimed."""
    claimed = session.execute(
        update(UploadSessionRow)
        .where(
            UploadSessionRow.tenant == tenant,
            UploadSessionRow.id == session_id,
            UploadSessionRow.state.in_(("queued", "completing")),
        )
        .values(state="completing")
        .execution_options(synchronize_session=False)
    )
    session.expire_all()
    return get(session, tenant, session_id), claimed.rowcount == 1  # type: ignore[attr-defined]


def expire_due(session: Session, now: datetime, limit: int = 100) -> list[UploadSession]:
    """Mark pending sessions past their deadline ``expired`` (any tenant); returns them."""
    rows = list(
        session.scalars(
            select(UploadSessionRow)
            .where(UploadSessionRow.state == "pending", UploadSessionRow.expires <= now)
            .order_by(UploadSessionRow.expires)
            .limit(limit)
        )
    )
    for row in rows:
        row.state = "expired"
    session.flush()
    return [_session(r) for r in rows]


def leftover_ids(session: Session, tenant: str, session_ids: Sequence[str]) -> set[str]:
    """Which of ``session_ids`` name no open upload session of the tenant: finished ones
    (completed or expired), and ids no session row has (a large STOW-RS part staged in its
    request, or a queued STOW-RS request staging its parts before the session is recorded)."""
    rows = session.execute(
        select(UploadSessionRow.id, UploadSessionRow.state).where(
            UploadSessionRow.tenant == tenant, UploadSessionRow.id.in_(list(session_ids))
        )
    )
    open_ids = {row.id for row in rows if row.state not in ("completed", "expired")}
    return set(session_ids) - open_ids
