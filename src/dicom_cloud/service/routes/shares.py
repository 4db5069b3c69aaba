"""Share links: time-limited, revocable, read-only access to one study.

``POST /studies/{study}/shares`` answers a token (shown once) and a URL. The URL
(``/shared/{token}``) answers, without other credentials, the study's attributes and series and
says how to read it; the token itself is a bearer credential with ``read`` on that study only
(QIDO, WADO, metadata, frames, rendered, thumbnails), so a DICOMweb viewer can use it as is.

A browser opening the URL (``Accept: text/html``) gets the study in the OHIF viewer instead of
JSON: the answer sets the link's secret as an HttpOnly cookie (``dc_share``, until the link
expires) and redirects to ``/viewer/viewer?StudyInstanceUIDs=<uid>``; the viewer's requests
carry the cookie. An unknown, expired or revoked link is a page that says so.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, Field

from ...archive import ShareLink
from ..auth import SHARE_COOKIE
from ..deps import ArchiveDep, CredentialCacheDep, SettingsDep, Writer, principal_of_share
from ..dicomjson import service_root
from ..http_errors import MalformedRequestError, UnauthenticatedError
from ..pages import PAGE_HEADERS, message_page, wants_html
from ..viewer import MOUNT
from .dicomweb import Uid
from .web import secure_cookies

router = APIRouter(tags=["shares"])


class ShareIn(BaseModel):
    expires_in_seconds: int = Field(86400, ge=1, description="lifetime (at most share_max_ttl_seconds)")


class ShareOut(BaseModel):
    id: int
    study_instance_uid: str
    created: datetime
    expires: datetime
    revoked: datetime | None


class NewShare(ShareOut):
    token: str = Field(..., description="bearer credential: shown once")
    url: str = Field(..., description="the link to hand out")


def _out(link: ShareLink) -> ShareOut:
    return ShareOut(
        id=link.id,
        study_instance_uid=link.study_instance_uid,
        created=link.created,
        expires=link.expires,
        revoked=link.revoked,
    )


@router.post("/studies/{study}/shares", status_code=201, summary="Create a share link for a study")
async def create_share(
    request: Request, study: Uid, body: ShareIn, principal: Writer, archive: ArchiveDep, settings: SettingsDep
) -> NewShare:
    if body.expires_in_seconds > settings.share_max_ttl_seconds:
        raise MalformedRequestError(f"a share link may last at most {settings.share_max_ttl_seconds} seconds")
    # The study must exist for this tenant (NotFoundError otherwise): no links to nothing.
    await archive.instances(principal.tenant, study)
    token, link = await archive.create_share(
        principal.tenant, study, timedelta(seconds=body.expires_in_seconds)
    )
    url = f"{service_root(request, settings)}/shared/{token}"
    return NewShare(token=token, url=url, **_out(link).model_dump())


@router.get("/studies/{study}/shares", summary="List a study's share links")
async def list_shares(study: Uid, principal: Writer, archive: ArchiveDep) -> list[ShareOut]:
    return [_out(link) for link in await archive.list_shares(principal.tenant, study)]


@router.delete("/shares/{share_id}", summary="Revoke a share link")
async def revoke_share(
    share_id: Annotated[int, Path(ge=1, le=2**62)],
    principal: Writer,
    archive: ArchiveDep,
    credentials: CredentialCacheDep,
) -> ShareOut:
    revoked = await archive.revoke_share(principal.tenant, share_id)
    credentials.clear()  # refused from the next request on, by this worker at least
    return _out(revoked)


@router.get("/shared/{token}", summary="Open a share link (the token in the path is the credential)")
async def open_share(
    request: Request,
    token: Annotated[str, Path(min_length=1, max_length=200)],
    archive: ArchiveDep,
    settings: SettingsDep,
) -> Any:
    browser = wants_html(request.headers.get("accept"))
    link = await archive.resolve_share(token)
    if link is None:
        if browser:
            return message_page(
                "This share link no longer works",
                "The link has expired or has been revoked, or it was copied incompletely. "
                "Ask the person who shared the study for a new link.",
                401,
            )
        raise UnauthenticatedError("this share link is unknown, expired or revoked")
    principal = principal_of_share(link)
    request.state.principal = principal
    if browser:
        return _open_in_viewer(request, settings, token, link)
    root = service_root(request, settings)
    study = link.study_instance_uid
    studies = await archive.search_studies(link.tenant, {"StudyInstanceUID": study}, base_url=root)
    series = await archive.search_series(link.tenant, {}, study_instance_uid=study, base_url=root)
    return {
        "study_instance_uid": study,
        "expires": link.expires.isoformat(),
        "dicomweb_root": root,
        "study_url": f"{root}/studies/{study}",
        "authorization": "send the token of this link as 'Authorization: Bearer <token>'",
        "study": studies[0] if studies else None,
        "series": series,
    }


def _open_in_viewer(request: Request, settings: SettingsDep, token: str, link: ShareLink) -> Response:
    """The study in the viewer: the secret becomes a cookie for as long as the link lives."""
    remaining = int((link.expires - datetime.now(UTC)).total_seconds())
    target = f"{MOUNT}/viewer?StudyInstanceUIDs={quote(link.study_instance_uid)}"
    response = RedirectResponse(target, status_code=303, headers=PAGE_HEADERS)
    response.set_cookie(
        SHARE_COOKIE,
        token,
        max_age=max(1, remaining),
        path="/",
        secure=secure_cookies(request, settings),
        httponly=True,
        samesite="strict",
    )
    return response
