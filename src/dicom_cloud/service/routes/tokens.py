"""API token administration (admin scope): create, list, revoke tokens of the caller's tenant.

A token is shown once, in the answer that creates it; the archive keeps only its hash. A token
made with ``expires_in_seconds`` answers 401 once that time has passed, and is listed as expired.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from ...archive import ApiToken, Scope
from ..deps import Admin, ArchiveDep, CredentialCacheDep

router = APIRouter(tags=["tokens"])


class TokenIn(BaseModel):
    name: str = Field(..., min_length=1, max_length=200, description="what the token is for")
    scopes: list[Scope] = Field(
        ..., min_length=1, description="read, write, admin (each implies those before)"
    )
    expires_in_seconds: int | None = Field(
        None, ge=1, le=3650 * 86400, description="lifetime; absent: valid until revoked"
    )


class TokenOut(BaseModel):
    id: int
    tenant: str
    name: str
    scopes: list[str]
    created: datetime
    revoked: datetime | None
    expires: datetime | None
    expired: bool


class NewToken(TokenOut):
    token: str = Field(..., description="the secret: shown once, send it as Authorization: Bearer")


def _out(record: ApiToken) -> TokenOut:
    return TokenOut(
        id=record.id,
        tenant=record.tenant,
        name=record.name,
        scopes=list(record.scopes),
        created=record.created,
        revoked=record.revoked,
        expires=record.expires,
        expired=record.expired(),
    )


@router.post("/tokens", status_code=201, summary="Create an API token")
async def create_token(body: TokenIn, principal: Admin, archive: ArchiveDep) -> NewToken:
    lifetime = timedelta(seconds=body.expires_in_seconds) if body.expires_in_seconds else None
    secret, record = await archive.create_token(principal.tenant, body.name, body.scopes, lifetime)
    return NewToken(token=secret, **_out(record).model_dump())


@router.get("/tokens", summary="List the tenant's API tokens")
async def list_tokens(principal: Admin, archive: ArchiveDep) -> list[TokenOut]:
    return [_out(record) for record in await archive.list_tokens(principal.tenant)]


@router.delete("/tokens/{token_id}", summary="Revoke an API token")
async def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=2**62)],
    principal: Admin,
    archive: ArchiveDep,
    credentials: CredentialCacheDep,
) -> TokenOut:
    revoked = await archive.revoke_token(principal.tenant, token_id)
    credentials.clear()  # refused from the next request on, by this worker at least
    return _out(revoked)
