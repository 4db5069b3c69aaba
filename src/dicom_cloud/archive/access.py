"""API tokens and share links: random secrets shown once, kept only as their SHA-256.

A token is ``dcat_`` + 43 URL-safe characters (32 random bytes); a share token ``dcsh_`` + the
same. The prefix lets secret scanners and people recognise them; the hash is over the whole
string. A token grants its scopes to its tenant until revoked or, when made with a lifetime,
until it expires; a share link grants read access to one study until it expires or is revoked.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import NotFoundError, UsageError
from .index import study_exists, utc
from .models import ApiTokenRow, ShareLinkRow
from .records import SCOPES, ApiToken, Scope, ShareLink

TOKEN_PREFIX: Final = "dcat_"  # noqa: S105 - a prefix, not a secret
SHARE_PREFIX: Final = "dcsh_"
MAX_SHARE_LIFETIME: Final = timedelta(days=365)
#: Longest lifetime of an expiring API token (ten years: beyond it, make one that never expires).
MAX_TOKEN_LIFETIME: Final = timedelta(days=3650)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def _token(row: ApiTokenRow) -> ApiToken:
    scopes = tuple(s for s in SCOPES if s in row.scopes.split())
    return ApiToken(
        row.id,
        row.tenant,
        row.name,
        scopes,
        utc(row.created),
        utc(row.revoked) if row.revoked else None,
        utc(row.expires) if row.expires else None,
    )


def _share(row: ShareLinkRow) -> ShareLink:
    return ShareLink(
        row.id,
        row.tenant,
        row.study_instance_uid,
        utc(row.created),
        utc(row.expires),
        utc(row.revoked) if row.revoked else None,
    )


def create_token(
    session: Session,
    tenant: str,
    name: str,
    scopes: Sequence[Scope],
    expires_in: timedelta | None = None,
) -> tuple[str, ApiToken]:
    if isinstance(scopes, str):
        raise UsageError("scopes are a list (read, write, admin)")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise UsageError("a token needs one or more scopes among read, write and admin")
    if not name.strip() or len(name) > 256 or any(ord(c) < 32 or c == "\x7f" for c in name):
        raise UsageError("a token's name has 1 to 256 characters, none of them control characters")
    if expires_in is not None and not timedelta(0) < expires_in <= MAX_TOKEN_LIFETIME:
        raise UsageError("an expiring token lasts more than 0 seconds and at most 3650 days")
    token = _new_secret(TOKEN_PREFIX)
    now = datetime.now(UTC)
    row = ApiTokenRow(
        tenant=tenant,
        name=name.strip(),
        token_hash=token_hash(token),
        scopes=" ".join(s for s in SCOPES if s in scopes),
        created=now,
        expires=now + expires_in if expires_in is not None else None,
    )
    session.add(row)
    session.flush()
    return token, _token(row)


def _plausible(token: str, prefix: str) -> bool:
    return isinstance(token, str) and token.startswith(prefix) and len(token) <= 128 and token.isascii()


def authenticate(session: Session, token: str, now: datetime | None = None) -> ApiToken | None:
    """The record of a known token, neither revoked nor expired at ``now``; None otherwise."""
    if not _plausible(token, TOKEN_PREFIX):
        return None
    digest = token_hash(token)
    row = session.scalar(select(ApiTokenRow).where(ApiTokenRow.token_hash == digest))
    # The lookup is by hash, so timing reveals nothing of the token; compare anyway.
    if row is None or not hmac.compare_digest(row.token_hash, digest) or row.revoked is not None:
        return None
    record = _token(row)
    return None if record.expired(now) else record


def list_tokens(session: Session, tenant: str) -> list[ApiToken]:
    rows = session.scalars(select(ApiTokenRow).where(ApiTokenRow.tenant == tenant).order_by(ApiTokenRow.id))
    return [_token(r) for r in rows]


def revoke_token(session: Session, tenant: str, token_id: int) -> ApiToken:
    row = session.scalar(select(ApiTokenRow).where(ApiTokenRow.tenant == tenant, ApiTokenRow.id == token_id))
    if row is None:
        raise NotFoundError("no such token")
    if row.revoked is None:
        row.revoked = datetime.now(UTC)
    session.flush()
    return _token(row)


def create_share(
    session: Session, tenant: str, study_instance_uid: str, expires_in: timedelta
) -> tuple[str, ShareLink]:
    if not timedelta(0) < expires_in <= MAX_SHARE_LIFETIME:
        raise UsageError("a share link lasts more than 0 seconds and at most 365 days")
    if not study_exists(session, tenant, study_instance_uid):
        raise NotFoundError("no such study")
    token = _new_secret(SHARE_PREFIX)
    now = datetime.now(UTC)
    row = ShareLinkRow(
        tenant=tenant,
        study_instance_uid=study_instance_uid,
        token_hash=token_hash(token),
        created=now,
        expires=now + expires_in,
    )
    session.add(row)
    session.flush()
    return token, _share(row)


def resolve_share(session: Session, token: str, now: datetime | None = None) -> ShareLink | None:
    if not _plausible(token, SHARE_PREFIX):
        return None
    row = session.scalar(select(ShareLinkRow).where(ShareLinkRow.token_hash == token_hash(token)))
    if row is None or row.revoked is not None:
        return None
    link = _share(row)
    if (now or datetime.now(UTC)) >= link.expires:
        return None
    return link


def list_shares(session: Session, tenant: str, study_instance_uid: str | None) -> list[ShareLink]:
    query = select(ShareLinkRow).where(ShareLinkRow.tenant == tenant)
    if study_instance_uid is not None:
        query = query.where(ShareLinkRow.study_instance_uid == study_instance_uid)
    return [_share(r) for r in session.scalars(query.order_by(ShareLinkRow.id))]


def revoke_share(session: Session, tenant: str, share_id: int) -> ShareLink:
    row = session.scalar(
        select(ShareLinkRow).where(ShareLinkRow.tenant == tenant, ShareLinkRow.id == share_id)
    )
    if row is None:
        raise NotFoundError("no such share link")
    if row.revoked is None:
        row.revoked = datetime.now(UTC)
    session.flush()
    return _share(row)
