"""Per-instance WADO-RS answered before FastAPI's routing and dependency resolution.

A viewer fetches a study instance by instance (``GET /studies/{study}/series/{series}/instances/
{instance}``), so that request is the service's most frequent. Through the router, matching the
path against every route and resolving the dependency tree (credential, scope, archive, three
validated UIDs) were about a fifth of the interpreter's time per request (py-spy), more than
finding the instance in the index.

This middleware answers the plain case itself, with the same functions the route uses: a GET of
that path with no query string, a credential that reads the study, an Accept satisfied by the
instance as stored, an instance small enough for one body. Anything else, and any error
(missing instance, bad credential, store fault), goes on to the route unchanged, which then
answers as it always does, errors included: the two paths cannot disagree on what is refused.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from ..archive import Archive
from ..errors import DicomCloudError
from .auth import bearer_credential
from .deps import request_principal
from .dicomjson import DICOM, UID_MAX, check_accepts
from .multipart import new_boundary, related_body, related_content_type
from .negotiation import instance_part_type, instance_syntax

_UID = r"([0-9]+(?:\.[0-9]+)*)"
_PATH = re.compile(rf"/studies/{_UID}/series/{_UID}/instances/{_UID}")


class InstanceRetrieval:
    """Pure ASGI middleware: the plain per-instance WADO-RS GET (module docstring), else ``app``.

    ``route`` is the router's route of the same path: it is recorded in the scope as the router
    would record it (the access log and the metrics name requests by its template)."""

    def __init__(self, app: ASGIApp, route: BaseRoute, max_size: int) -> None:
        self.app = app
        self.route = route
        self.max_size = max_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope["query_string"]:
            await self.app(scope, receive, send)
            return
        match = _PATH.fullmatch(_route_path(scope))
        if match is None or max(map(len, match.groups())) > UID_MAX:
            await self.app(scope, receive, send)
            return
        try:
            start, body = await self._answer(Request(scope), *match.groups())
        except DicomCloudError:
            start = body = None  # the route answers, with its own error status
        if start is None or body is None:
            await self.app(scope, receive, send)
            return
        await send(start)
        await send({"type": "http.response.body", "body": body})

    async def _answer(
        self, request: Request, study: str, series: str, instance: str
    ) -> tuple[dict[str, object], bytes] | tuple[None, None]:
        """The response's start message and body, or Nones for the route to answer."""
        archive: Archive = request.app.state.archive
        principal = await request_principal(request, bearer_credential(request.headers.get("authorization")))
        principal.require("read")
        principal.require_study(study)
        check_accepts(request, media_type="multipart/related", related_type=DICOM)
        record, data = await archive.instance_with_bytes(
            principal.tenant, study, series, instance, max_size=self.max_size
        )
        stored = record.transfer_syntax_uid
        if data is None or instance_syntax(request, {stored}) not in (None, stored):
            return None, None  # streamed or transcoded: the route's work
        request.scope["route"] = self.route
        boundary = new_boundary()
        body = related_body([(instance_part_type(stored), data)], boundary)
        headers = [
            (b"content-length", str(len(body)).encode("ascii")),
            (b"content-type", related_content_type(boundary, DICOM).encode("ascii")),
        ]
        return {"type": "http.response.start", "status": 200, "headers": headers}, body


def _route_path(scope: Scope) -> str:
    """The path below the root path, as the router matches it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root + "/") else path
