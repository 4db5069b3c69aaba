"""Liveness and metrics. ``/healthz`` needs no credentials; ``/metrics`` needs the admin scope
unless ``metrics_public`` is set (for scrapers inside a private network)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import MetricsDep, bearer_scheme, current_principal

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness (no credentials needed)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _metrics_access(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> None:
    if request.app.state.settings.metrics_public:
        return
    principal = await current_principal(request, credentials)
    principal.require("admin")


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    summary="Prometheus metrics (admin scope)",
)
async def metrics(metrics: MetricsDep, _: Annotated[None, Depends(_metrics_access)]) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
