"""The OHIF viewer at ``/viewer/`` (``service/viewer.py`` prepares its files).

The viewer's files are public (they are the same for everyone and hold no data); everything it
fetches from the DICOMweb routes is authenticated there, by the browser's session or share-link
cookie. ``/viewer/app-config.js`` is generated; any other path under ``/viewer/`` that is not a
file is the single-page application's own route and answers its ``index.html``. OHIF fetches its
lazily loaded chunks from the root, so ``root_router`` serves the viewer's top-level files there
too (registered after every other route, it never shadows one).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Path, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from ...errors import NotFoundError
from ..pages import message_page
from ..settings import ServiceSettings
from ..viewer import MOUNT, ViewerFiles, app_config

router = APIRouter(include_in_schema=False)
root_router = APIRouter(include_in_schema=False)

_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".map": "application/json",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".xml": "application/xml",
    ".txt": "text/plain; charset=utf-8",
}
#: Chunk names carry a content hash: cached for good. Everything else is checked each time.
_IMMUTABLE = ("bundle.", ".wasm")


def viewer_files(request: Request) -> ViewerFiles:
    """The installed viewer, kept once found (installing while the service runs needs no restart;
    installing another version over it does)."""
    files: ViewerFiles | None = getattr(request.app.state, "viewer_files", None)
    if files is None:
        settings: ServiceSettings = request.app.state.settings
        files = ViewerFiles(settings.viewer_path)
        if files.installed:
            request.app.state.viewer_files = files
    return files


def _not_installed() -> HTMLResponse:
    return message_page(
        "The viewer is not installed",
        "This service has no copy of the OHIF viewer yet. Its administrator installs it with "
        "'dicom-cloud viewer install' (with the same --data-dir or --viewer-dir as the service); "
        "the service finds it at the next request.",
        404,
    )


def _file_response(files: ViewerFiles, relative: str) -> Response:
    path = files.file(relative)
    immutable = any(mark in path.name for mark in _IMMUTABLE)
    return FileResponse(
        path,
        media_type=_TYPES.get(path.suffix.lower(), "application/octet-stream"),
        headers={"Cache-Control": "public, max-age=31536000, immutable" if immutable else "no-cache"},
    )


def _index(files: ViewerFiles) -> HTMLResponse:
    return HTMLResponse(files.index_html, headers={"Cache-Control": "no-cache"})


@router.get(MOUNT)
async def viewer_root() -> RedirectResponse:
    return RedirectResponse(MOUNT + "/", status_code=308)


@router.get(MOUNT + "/app-config.js")
async def viewer_config(request: Request) -> Response:
    settings: ServiceSettings = request.app.state.settings
    root_path = urlsplit(settings.public_url).path if settings.public_url else ""
    return Response(
        app_config(root_path),
        media_type="text/javascript; charset=utf-8",
        headers={"Cache-Control": "no-cache"},
    )


@router.get(MOUNT + "/{path:path}")
async def viewer_file(request: Request, path: str) -> Response:
    files = viewer_files(request)
    if not files.installed:
        return _not_installed()
    if path in ("", "index.html"):
        return _index(files)
    try:
        return _file_response(files, path)
    except NotFoundError:
        if "." in path.rsplit("/", 1)[-1]:
            raise  # a missing file, not one of the application's routes
        return _index(files)


@root_router.get("/{path:path}")
async def viewer_chunk(request: Request, path: Annotated[str, Path(max_length=300)]) -> Response:
    """A file of the viewer requested from the root (OHIF's lazily loaded chunks, wasm, fonts)."""
    files = viewer_files(request)
    first = path.split("/", 1)[0]
    if not files.installed or first not in files.top_level or first in ("index.html", "app-config.js"):
        raise NotFoundError(f"no route or file at /{path}")
    return _file_response(files, path)
