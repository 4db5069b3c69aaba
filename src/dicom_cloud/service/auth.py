"""Who is calling: bearer credentials -> :class:`Principal` (tenant, scopes, and for share links one study).

Three kinds of credential arrive as ``Authorization: Bearer <credential>``:

- API tokens, issued by the service (``routes/tokens.py``) and kept hashed by the archive;
- share links' secrets, which grant ``read`` on one study of one tenant until they expire or are revoked;
- JWTs from an OIDC issuer (when ``oidc_issuer`` is set): signature checked against the issuer's JWKS
  (fetched, cached for ``oidc_jwks_ttl_seconds``, fetched again when a token names an unknown key),
  ``iss``, ``aud`` and ``exp`` checked; the tenant and scopes come from configurable claims.

Scopes are ordered: ``admin`` includes ``write``, which includes ``read``.

Browsers send no ``Authorization`` header; they carry the same credentials in cookies instead
(set by ``POST /login`` and by opening a share link, ``routes/web.py`` and ``routes/shares.py``):

- ``dc_session``: an API token (or JWT) the user typed into the login page; HttpOnly.
- ``dc_share``: the secret of a share link the browser opened; HttpOnly.
- ``dc_csrf``: readable by the page's JavaScript, derived from the session credential.

A request with an ``Authorization`` header is judged by it alone (cookies ignored). Otherwise the
session cookie, else the share cookie, is the credential; then unsafe methods (POST, PUT, PATCH,
DELETE) must prove they come from this service's own pages: the ``X-CSRF-Token`` header must equal
:func:`csrf_token` of the credential (double submit, bound to the session so a cookie planted by
a sibling domain does not pass), and an ``Origin`` header, when sent, must be this service's.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt

from .http_errors import ForbiddenError, UnauthenticatedError
from .settings import ServiceSettings

log = logging.getLogger(__name__)

Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "write", "admin")
_IMPLIED: dict[str, frozenset[str]] = {
    "read": frozenset({"read"}),
    "write": frozenset({"read", "write"}),
    "admin": frozenset({"read", "write", "admin"}),
}

#: The JWKS and discovery documents are small; anything larger is refused.
_MAX_DOCUMENT = 1024 * 1024


def expand_scopes(scopes: object) -> frozenset[str]:
    """Granted scopes with the ones they imply; unknown names are ignored."""
    result: set[str] = set()
    for scope in scopes if isinstance(scopes, list | tuple | set | frozenset) else []:
        result |= _IMPLIED.get(str(scope), frozenset())
    return frozenset(result)


@dataclass(frozen=True)
class Principal:
    """The caller of one request. ``subject`` is an id safe to log (token id, JWT ``sub``, share id)."""

    tenant: str
    scopes: frozenset[str]
    subject: str
    kind: Literal["token", "jwt", "share"]
    #: For share links: the only study this principal may read.
    study: str | None = None

    def require(self, scope: Scope) -> None:
        if scope not in self.scopes:
            raise ForbiddenError(f"this credential lacks the {scope!r} scope")

    def require_study(self, study_uid: str) -> None:
        """Share links reach their own study and nothing else (answered as not found elsewhere)."""
        if self.study is not None and self.study != study_uid:
            raise ForbiddenError("a share link gives access to its own study only")


#: Resolves an opaque secret (API token or share link) to a principal, or None when unknown.
SecretResolver = Callable[[str], Awaitable[Principal | None]]


def looks_like_jwt(credential: str) -> bool:
    parts = credential.split(".")
    return len(parts) == 3 and all(parts) and credential.startswith("ey")


@dataclass
class _Jwks:
    fetched_at: float
    client: jwt.PyJWKClient


@dataclass
class OidcVerifier:
    """Checks JWTs from one issuer. Network reads run in worker threads."""

    issuer: str
    audience: str | None
    jwks_url: str | None
    tenant_claim: str
    scope_claim: str
    algorithms: tuple[str, ...]
    ttl: float
    default_tenant: str | None = None
    #: Least seconds between two fetches caused by unknown key ids (tokens naming random kids
    #: must not make the service hammer the issuer).
    refetch_cooldown: float = 30.0
    _jwks: _Jwks | None = field(default=None, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> OidcVerifier | None:
        if not settings.oidc_issuer:
            return None
        return cls(
            issuer=settings.oidc_issuer,
            audience=settings.oidc_audience,
            jwks_url=settings.oidc_jwks_url,
            tenant_claim=settings.oidc_tenant_claim,
            scope_claim=settings.oidc_scope_claim,
            algorithms=settings.oidc_algorithms,
            ttl=settings.oidc_jwks_ttl_seconds,
            default_tenant=settings.oidc_default_tenant,
        )

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise UnauthenticatedError("the bearer token is not a valid JWT") from None
        if header.get("alg") not in self.algorithms:
            raise UnauthenticatedError("the JWT is signed with an algorithm this service does not accept")
        client = await self._client()
        try:
            key = await asyncio.to_thread(client.get_signing_key_from_jwt, token)
        except jwt.PyJWKClientConnectionError:
            log.warning("oidc.jwks_unreachable")
            raise UnauthenticatedError("the issuer's signing keys could not be fetched") from None
        except jwt.PyJWTError:
            raise UnauthenticatedError("the JWT is signed by a key the issuer does not publish") from None
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=list(self.algorithms),
                issuer=self.issuer,
                audience=self.audience,
                options={"require": ["exp", "iss"], "verify_aud": self.audience is not None},
                leeway=30,
            )
        except jwt.ExpiredSignatureError:
            raise UnauthenticatedError("the JWT has expired") from None
        except jwt.PyJWTError as exc:
            raise UnauthenticatedError(f"the JWT was refused: {exc}") from None
        tenant = claims.get(self.tenant_claim, self.default_tenant)
        if not isinstance(tenant, str) or not tenant:
            raise UnauthenticatedError(f"the JWT has no {self.tenant_claim!r} claim naming the tenant")
        raw_scopes = claims.get(self.scope_claim, "")
        scopes = raw_scopes.split() if isinstance(raw_scopes, str) else raw_scopes
        return Principal(
            tenant=tenant, scopes=expand_scopes(scopes), subject=str(claims.get("sub", "?")), kind="jwt"
        )

    async def _client(self) -> jwt.PyJWKClient:
        async with self._lock:
            now = time.monotonic()
            if self._jwks is None or now - self._jwks.fetched_at > self.ttl:
                url = self.jwks_url
                if url is None:
                    url = await asyncio.to_thread(self._discover)
                # PyJWKClient caches the key set for ``lifespan`` and fetches again on an unknown kid.
                client = jwt.PyJWKClient(
                    url,
                    cache_keys=True,
                    lifespan=self.ttl,
                    timeout=10,
                    cooldown_duration=self.refetch_cooldown,
                )
                self._jwks = _Jwks(now, client)
            return self._jwks.client

    def _discover(self) -> str:
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - configured https URL
                document = json.loads(answer.read(_MAX_DOCUMENT))
        except (OSError, ValueError):
            log.warning("oidc.discovery_failed")
            raise UnauthenticatedError("the OIDC issuer's configuration could not be fetched") from None
        jwks_uri = document.get("jwks_uri") if isinstance(document, dict) else None
        if not isinstance(jwks_uri, str):
            raise UnauthenticatedError("the OIDC issuer's configuration names no jwks_uri")
        return jwks_uri


@dataclass
class Authenticator:
    """Tries the credential as a JWT (when it is one and OIDC is on), else as an opaque secret."""

    resolve_secret: SecretResolver
    oidc: OidcVerifier | None
    api_tokens: bool = True

    async def authenticate(self, credential: str | None) -> Principal:
        if not credential:
            raise UnauthenticatedError(
                "this route needs credentials", hint="send Authorization: Bearer <API token or JWT>"
            )
        if self.oidc is not None and looks_like_jwt(credential):
            return await self.oidc.verify(credential)
        principal = await self.resolve_secret(credential)
        if principal is None or (principal.kind == "token" and not self.api_tokens):
            raise UnauthenticatedError("the bearer token is unknown, revoked or expired")
        return principal


def bearer_credential(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer`` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise UnauthenticatedError("the Authorization header must be 'Bearer <token>'")
    return value.strip()


#: The cookies and header of browser authentication (module docstring).
SESSION_COOKIE = "dc_session"
SHARE_COOKIE = "dc_share"
CSRF_COOKIE = "dc_csrf"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class RequestCredential:
    """The credential of one request and where it came from."""

    value: str
    #: ``header`` (Authorization: Bearer), ``session`` or ``share`` (cookies).
    source: Literal["header", "session", "share"]

    @property
    def from_cookie(self) -> bool:
        return self.source != "header"


def request_credential(bearer: str | None, cookies: Mapping[str, str]) -> RequestCredential | None:
    """The header's bearer credential, else the session cookie, else the share cookie. A signed-in
    user who opens a share link of another tenant keeps their session (docs/web.md)."""
    if bearer:
        return RequestCredential(bearer, "header")
    for name, source in ((SESSION_COOKIE, "session"), (SHARE_COOKIE, "share")):
        value = cookies.get(name, "").strip()
        if value:
            return RequestCredential(value, source)  # type: ignore[arg-type]
    return None


def csrf_token(credential: str) -> str:
    """The anti-CSRF value of a session: a hash of its secret (not the secret: the page's
    JavaScript reads it). Another site can neither read nor compute it."""
    return hashlib.sha256(b"dicom-cloud-csrf-v1\n" + credential.encode()).hexdigest()[:40]


def check_csrf(
    method: str, headers: Mapping[str, str], credential: RequestCredential, own_origins: frozenset[str]
) -> None:
    """Refuse (403) a cookie-authenticated unsafe request that does not come from our own pages.
    Requests authenticated by an Authorization header are never affected (no browser adds one to
    a forged request)."""
    if not credential.from_cookie or method.upper() in SAFE_METHODS:
        return
    origin = headers.get("origin")
    if origin is not None and origin.rstrip("/") not in own_origins:
        raise ForbiddenError(
            "cross-site request refused: it comes from another origin",
            hint="send Authorization: Bearer <token> from API clients",
        )
    sent = headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode(), csrf_token(credential.value).encode()):
        raise ForbiddenError(
            "a request authenticated by the session cookie must carry the X-CSRF-Token header",
            hint="the page sends it from the dc_csrf cookie; API clients send Authorization: Bearer",
        )
