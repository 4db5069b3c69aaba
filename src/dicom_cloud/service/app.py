"""The app factory: settings + archive -> a FastAPI application.

``create_app(settings)`` opens the archive named by the settings when the app starts and closes it
when it stops; tests pass an archive they opened themselves. Everything else is wiring: routers,
error handlers, CORS, the access log and metrics middleware, the bearer authenticator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.routing import BaseRoute

from .. import __version__
from ..archive import Archive, ArchiveSettings
from ..crypto.envelope import ClientEncryption
from ..crypto.keysource import load_keys
from ..errors import UsageError
from ..extras import require
from .auth import Authenticator, OidcVerifier
from .credential_cache import CredentialCache
from .deps import Reader, secret_resolver
from .handlers import install_error_handlers
from .instance_retrieval import InstanceRetrieval
from .memory import RequestMemory
from .observability import AccessLogMiddleware, Metrics
from .presign import S3PutSigner
from .presign_clouds import cloud_put_signer
from .routes import dicomweb, health, labels, shares, tokens, uploads, viewer, wado_uri, web
from .settings import ServiceSettings

if TYPE_CHECKING:
    from ..archive.queue import IngestQueue

log = logging.getLogger("dicom_cloud.service")

DESCRIPTION = """\
DICOMweb (STOW-RS, QIDO-RS, WADO-RS, DELETE) over object storage, with direct presigned uploads,
study labels, share links and API tokens. Every route except `/healthz` (and, when the
`public_docs` setting is on, `/docs` and `/openapi.json`) needs
`Authorization: Bearer <API token | share-link token | OIDC JWT>`, or a browser's session
cookie set by `POST /login` (unsafe methods then need the `X-CSRF-Token` header). The web pages
(`/`, `/login`) and the OHIF viewer (`/viewer/`) are served beside the API.
"""


def archive_settings(settings: ServiceSettings) -> ArchiveSettings:
    return ArchiveSettings(
        storage_url=settings.storage_url,
        database_url=settings.database_url,
        encryption=encryption(settings),
        extra_query_tags=settings.query_tags,
        max_instance_size=settings.upload_max_bytes,
    )


def encryption(settings: ServiceSettings) -> ClientEncryption | None:
    """Master keys (settings, then DICOM_CLOUD_MASTER_KEY, then the CLI's config file) and whether
    to encrypt what is written. Keys without ``encrypt`` still decrypt objects written encrypted."""
    keys = load_keys(settings.master_key, settings.previous_keys)
    if settings.encrypt and keys.ring is None:
        raise UsageError(
            "encrypt needs a master key",
            hint="set master_key = 'ID:PATH' or DICOM_CLOUD_MASTER_KEY (make one: openssl rand -base64 32)",
        )
    if keys.ring is None:
        return None
    return ClientEncryption(
        ring=keys.ring, encrypt_as=settings.encryption_format if settings.encrypt else None
    )


async def bootstrap_admin(
    archive: Archive, settings: ServiceSettings, announce: Callable[[str], None] | None = None
) -> str | None:
    """On first start (no token ever made for the bootstrap tenant) make an admin token and show
    it once. Returns the token, or None when tokens exist already."""
    if not settings.bootstrap_admin or await archive.list_tokens(settings.bootstrap_tenant):
        return None
    secret, record = await archive.create_token(settings.bootstrap_tenant, "bootstrap admin", ["admin"])
    log.info("bootstrap.token_created", extra={"tenant": record.tenant, "token_id": record.id})
    (announce or _print_once)(secret)
    return secret


def _print_once(secret: str) -> None:
    # Printed, not logged: logs are shipped and kept; this line is for the operator's terminal.
    print(
        "\n  First start: an admin API token was created. It is shown only this once:\n\n"
        f"    {secret}\n\n  Send it as 'Authorization: Bearer <token>'; POST /tokens makes more.\n",
        file=sys.stderr,
        flush=True,
    )


#: Seconds between two sweeps of expired upload sessions (any instance may sweep; it is idempotent).
UPLOAD_SWEEP_INTERVAL = 600.0


async def _sweep_uploads(archive: Archive) -> None:
    """Expire pending upload sessions past their deadline and remove their staged objects."""
    while True:
        try:
            expired = await archive.expire_uploads()
            if expired:
                log.info("uploads.expired", extra={"sessions": expired})
        except Exception as exc:  # a failed sweep is retried at the next interval
            log.warning("uploads.sweep_failed", extra={"error": type(exc).__name__})
        await asyncio.sleep(UPLOAD_SWEEP_INTERVAL)


async def _sweep_orphans(archive: Archive, interval: float, grace: float) -> None:
    """Every ``interval`` seconds, remove objects no index row points at and empty staging folders
    older than ``grace`` (what a crash between the object writes and the row commit leaves). The
    first sweep comes after a random part of the interval, so that instances and workers started
    together do not list the store at the same moment; concurrent sweeps are harmless."""
    await asyncio.sleep(random.uniform(0, interval))  # spreads the sweeps, no secret
    while True:
        try:
            sweep = await archive.sweep_orphans(older_than=timedelta(seconds=grace))
            if sweep.orphans or sweep.empty_folders:
                log.info(
                    "orphans.swept",
                    extra={
                        "tenants": sweep.tenants,
                        "scanned": sweep.scanned,
                        "orphans": sweep.orphans,
                        "removed": sweep.removed,
                        "empty_folders": sweep.empty_folders,
                    },
                )
        except Exception as exc:  # a failed sweep is retried at the next interval
            log.warning("orphans.sweep_failed", extra={"error": type(exc).__name__})
        await asyncio.sleep(interval)


async def _open_ingest_queue(settings: ServiceSettings) -> IngestQueue | None:
    """The ingest queue (``ingest_queue``), or None: uploads are then ingested in the request."""
    if not settings.ingest_queue:
        return None
    require("postgres", "ingest_queue")
    from ..archive.queue import IngestQueue

    return await IngestQueue.open(settings.database_url)


def create_app(
    settings: ServiceSettings,
    archive: Archive | None = None,
    *,
    announce_token: Callable[[str], None] | None = None,
) -> FastAPI:
    """The service. With ``archive`` None, the archive is opened from ``settings`` at start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        opened = archive is None
        current = archive if archive is not None else await Archive.open(archive_settings(settings))
        app.state.archive = current
        try:
            app.state.ingest_queue = await _open_ingest_queue(settings)
        except BaseException:
            if opened:
                await current.close()
            raise
        # Azure and GCS direct-upload URLs need the opened store (GCS signs with its credentials).
        app.state.cloud_signer = cloud_put_signer(settings.storage_url, lambda: current.store)
        app.state.credential_cache = cache = CredentialCache(settings.auth_cache_seconds)
        app.state.authenticator = Authenticator(
            secret_resolver(current, cache),
            OidcVerifier.from_settings(settings),
            api_tokens=settings.api_tokens,
        )
        sweepers = [asyncio.create_task(_sweep_uploads(current))]
        if settings.orphan_sweep_interval_seconds > 0:
            sweepers.append(
                asyncio.create_task(
                    _sweep_orphans(
                        current, settings.orphan_sweep_interval_seconds, settings.orphan_grace_seconds
                    )
                )
            )
        try:
            await bootstrap_admin(current, settings, announce_token)
            yield
        finally:
            for sweeper in sweepers:
                sweeper.cancel()
            for sweeper in sweepers:
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
            if app.state.cloud_signer is not None:
                await app.state.cloud_signer.close()
            if app.state.ingest_queue is not None:
                await app.state.ingest_queue.close()
            if opened:
                await current.close()

    public_docs = settings.docs_are_public
    app = FastAPI(
        title="dicom-cloud",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs" if public_docs else None,
        openapi_url="/openapi.json" if public_docs else None,
        redoc_url=None,
    )
    if not public_docs:
        _add_private_docs(app)
    metrics = Metrics()
    app.state.settings = settings
    app.state.request_memory = RequestMemory(
        settings.request_memory_bytes, settings.request_memory_wait_seconds
    )
    app.state.metrics = metrics
    app.state.put_signer = S3PutSigner.for_storage(settings.storage_url)
    install_error_handlers(app)
    for module in (health, dicomweb, wado_uri, uploads, labels, shares, tokens, web, viewer):
        app.include_router(module.router)
    # Last: the viewer's files requested from the root, after every route they must not shadow.
    app.include_router(viewer.root_router)
    # Innermost: CORS headers and the access log apply to its answers as to the routes'.
    app.add_middleware(
        InstanceRetrieval,
        route=_route_of(dicomweb.router, dicomweb.retrieve_instance),
        max_size=dicomweb.WHOLE_ANSWER_LIMIT,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
            expose_headers=["Content-Type", "Content-Length"],
            max_age=600,
        )
    app.add_middleware(AccessLogMiddleware, metrics=metrics)
    return app


def _route_of(router: APIRouter, endpoint: Callable[..., Any]) -> BaseRoute:
    return next(r for r in router.routes if getattr(r, "endpoint", None) is endpoint)


def _add_private_docs(app: FastAPI) -> None:
    """/openapi.json and /docs for callers with a credential (any scope), as every other route.
    The page's own fetch of the document sends none: load /openapi.json into a viewer instead."""

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(principal: Reader) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(principal: Reader) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")


#: Environment variable through which ``dicom-cloud serve --workers N`` hands its resolved settings
#: (JSON) to its worker processes.
SETTINGS_ENV = "DICOM_CLOUD_SERVE_SETTINGS"


async def bootstrap_once(settings: ServiceSettings) -> None:
    """What must happen once before several workers start: the index brought to the newest schema,
    and the first-start admin token made and shown."""
    async with await Archive.open(archive_settings(settings)) as archive:
        await bootstrap_admin(archive, settings)


def app_from_environment() -> FastAPI:
    """The app of one worker process of ``dicom-cloud serve --workers N`` (uvicorn's factory)."""
    from .observability import setup_json_logging

    settings = ServiceSettings.model_validate_json(os.environ[SETTINGS_ENV])
    setup_json_logging(settings.log_level)
    return create_app(settings)


def openapi_document(settings: ServiceSettings) -> dict[str, Any]:
    """The OpenAPI document, without starting anything (for docs and tests)."""
    return create_app(settings).openapi()
