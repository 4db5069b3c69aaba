"""The web pages: the studies at ``/``, a study at ``/web/study/{uid}``, login and logout.

The pages are server-rendered shells with plain JavaScript (``service/web/static/app.js``) that
calls the JSON API with the browser's session cookie: what the page shows and does is exactly
what the API allows the token behind the cookie. The pages themselves hold no data and answer
without a session; the script sends the browser to ``/login`` when the API answers 401.

``POST /login`` checks the token like a bearer credential (API token or OIDC JWT; share links
are refused: they open their study through their own URL) and sets the session cookie
(HttpOnly, ``SameSite=Strict``, ``Secure`` over HTTPS) and the CSRF cookie the script echoes in
``X-CSRF-Token`` (``service/auth.py``). ``POST /logout`` clears them.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from ... import __version__
from ...errors import DicomCloudError, NotFoundError
from ..auth import CSRF_COOKIE, SESSION_COOKIE, SHARE_COOKIE, Authenticator, csrf_token
from ..deps import SettingsDep, own_origins
from ..pages import PAGE_HEADERS, message_page, page
from ..settings import ServiceSettings
from .viewer import viewer_files

router = APIRouter(include_in_schema=False)

#: A login form is a few hundred bytes; anything much larger is not one.
_MAX_FORM = 16 * 1024
_STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}

Next = Annotated[str, Query(max_length=2000)]


def safe_next(target: str | None) -> str:
    """Where to go after login: a path of this service only (never another site: '//x', '/\\x')."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


def secure_cookies(request: Request, settings: ServiceSettings) -> bool:
    """``Secure`` cookies when the browser reaches us over HTTPS (directly or at ``public_url``)."""
    return request.url.scheme == "https" or (settings.public_url or "").startswith("https://")


@router.get("/")
async def studies_page(request: Request, settings: SettingsDep) -> HTMLResponse:
    return page(
        "studies.html",
        version=__version__,
        viewer="1" if viewer_files(request).installed else "0",
        upload_max_bytes=settings.upload_max_bytes,
        upload_max_files=settings.upload_max_files,
        share_max_ttl=settings.share_max_ttl_seconds,
    )


@router.get("/web/study/{study}")
async def study_page(
    request: Request,
    study: Annotated[str, Path(pattern=r"^[0-9.]{1,64}$")],
    settings: SettingsDep,
) -> HTMLResponse:
    return page(
        "study.html",
        version=__version__,
        study=study,
        viewer="1" if viewer_files(request).installed else "0",
        share_max_ttl=settings.share_max_ttl_seconds,
    )


@router.get("/web/static/{name}")
async def static_file(name: str) -> Response:
    if name not in _STATIC:
        raise NotFoundError(f"no static file {name}")
    from importlib import resources

    path = resources.files("dicom_cloud.service") / "web" / "static" / name
    return FileResponse(str(path), media_type=_STATIC[name], headers={"Cache-Control": "no-cache"})


@router.get("/login")
async def login_page(next: Next = "/") -> HTMLResponse:
    return page("login.html", next=safe_next(next), error="", error_class="hidden")


@router.post("/login")
async def login(request: Request, settings: SettingsDep) -> Response:
    origin = request.headers.get("origin")
    if origin is not None and origin.rstrip("/") not in own_origins(request):
        return message_page("Sign-in refused", "The sign-in form was sent from another site.", 403)
    body = await request.body()
    if len(body) > _MAX_FORM:
        return message_page("Sign-in refused", "The sign-in form is too large.", 413)
    form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
    token = (form.get("token") or [""])[0].strip()
    target = safe_next((form.get("next") or ["/"])[0])
    authenticator: Authenticator = request.app.state.authenticator
    failure = ""
    if not token:
        failure = "Paste an API token to sign in."
    else:
        try:
            principal = await authenticator.authenticate(token)
        except DicomCloudError:
            failure = "This token is unknown, revoked or expired."
        else:
            if principal.kind == "share":
                failure = "This is a share-link token: open the share link itself instead."
    if failure:
        answer = page("login.html", 401, next=target, error=failure, error_class="error")
        return answer
    response = RedirectResponse(target, status_code=303, headers=PAGE_HEADERS)
    secure = secure_cookies(request, settings)
    age = settings.session_max_age_seconds
    response.set_cookie(
        SESSION_COOKIE, token, max_age=age, path="/", secure=secure, httponly=True, samesite="strict"
    )
    response.set_cookie(
        CSRF_COOKIE,
        csrf_token(token),
        max_age=age,
        path="/",
        secure=secure,
        httponly=False,
        samesite="strict",
    )
    return response


@router.post("/logout")
async def logout(request: Request, settings: SettingsDep) -> Response:
    # No CSRF token needed: being signed out by another site harms nothing; the Origin check
    # still keeps other sites from doing it.
    origin = request.headers.get("origin")
    if origin is not None and origin.rstrip("/") not in own_origins(request):
        return message_page("Sign-out refused", "The sign-out was requested by another site.", 403)
    response = RedirectResponse("/login", status_code=303, headers=PAGE_HEADERS)
    secure = secure_cookies(request, settings)
    for name in (SESSION_COOKIE, CSRF_COOKIE, SHARE_COOKIE):
        response.delete_cookie(name, path="/", secure=secure, httponly=name != CSRF_COOKIE, samesite="strict")
    return response
