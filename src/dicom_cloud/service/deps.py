"""Named FastAPI dependencies: the archive, the settings, the metrics and the current principal.

Every route that touches data declares one of ``Reader``, ``Writer`` or ``Admin``: the
dependency authenticates the bearer credential (or a browser's cookie, with its CSRF check),
checks the scope, and records the principal on the request (the access log names its tenant and
id, never the credential).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..archive import ApiToken, Archive, ShareLink
from .auth import (
    Authenticator,
    Principal,
    Scope,
    SecretResolver,
    check_csrf,
    expand_scopes,
    request_credential,
)
from .credential_cache import CredentialCache
from .http_errors import UnauthenticatedError
from .observability import Metrics
from .settings import ServiceSettings

#: Declares the bearer scheme in the OpenAPI document (the "Authorize" button of /docs).
bearer_scheme = HTTPBearer(auto_error=False, description="API token, share-link token or OIDC JWT")

# The dependencies below are coroutines although they only read app.state: FastAPI runs a plain
# function dependency in a worker thread, a thread hop per dependency and request (8% of the
# service's samples under per-instance WADO-RS).


async def get_archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


async def get_settings(request: Request) -> ServiceSettings:
    settings: ServiceSettings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def principal_of_token(token: ApiToken) -> Principal:
    return Principal(token.tenant, expand_scopes(list(token.scopes)), f"token:{token.id}", "token")


def principal_of_share(link: ShareLink) -> Principal:
    return Principal(link.tenant, frozenset({"read"}), f"share:{link.id}", "share", link.study_instance_uid)


async def get_credential_cache(request: Request) -> CredentialCache:
    cache: CredentialCache = request.app.state.credential_cache
    return cache


def secret_resolver(archive: Archive, cache: CredentialCache) -> SecretResolver:
    """Resolves opaque secrets: API tokens first, then share-link tokens; valid ones are kept in
    ``cache`` for a few seconds (their expiry still checked on every request)."""

    async def resolve(secret: str) -> Principal | None:
        key = cache.key(secret)
        if (principal := cache.get(key)) is not None:
            return principal
        token = await archive.authenticate(secret)
        if token is not None:
            principal = principal_of_token(token)
            cache.put(key, principal, token.expires)
            return principal
        link = await archive.resolve_share(secret)
        if link is None:
            return None
        principal = principal_of_share(link)
        cache.put(key, principal, link.expires)
        return principal

    return resolve


async def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    if credentials is None and request.headers.get("authorization"):
        raise UnauthenticatedError("the Authorization header must be 'Bearer <token>'")
    return await request_principal(request, credentials.credentials if credentials else None)


async def request_principal(request: Request, bearer: str | None) -> Principal:
    """The principal of ``bearer`` (the Authorization header's token), else of the request's
    session or share cookie with its CSRF check; recorded on the request for the access log."""
    authenticator: Authenticator = request.app.state.authenticator
    credential = request_credential(bearer, request.cookies)
    principal = await authenticator.authenticate(credential.value if credential else None)
    if credential is not None and credential.from_cookie:  # a header's credential needs no CSRF check
        check_csrf(request.method, request.headers, credential, own_origins(request))
    request.state.principal = principal
    return principal


def own_origins(request: Request) -> frozenset[str]:
    """The origins this service's pages are served from: the request's own, and ``public_url``'s."""
    origins = {f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"}
    settings: ServiceSettings = request.app.state.settings
    if settings.public_url:
        scheme, _, rest = settings.public_url.partition("://")
        origins.add(f"{scheme}://{rest.split('/', 1)[0]}")
    return frozenset(origins)


def _scoped(scope: Scope) -> object:
    async def check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        principal.require(scope)
        return principal

    check.__name__ = f"require_{scope}"
    return check


Reader = Annotated[Principal, Depends(_scoped("read"))]
Writer = Annotated[Principal, Depends(_scoped("write"))]
Admin = Annotated[Principal, Depends(_scoped("admin"))]
ArchiveDep = Annotated[Archive, Depends(get_archive)]
SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
CredentialCacheDep = Annotated[CredentialCache, Depends(get_credential_cache)]
