"""The one place where errors become HTTP answers.

A :class:`~dicom_cloud.errors.DicomCloudError` answers with its class's ``http_status`` and the body
``{"error": "<ClassName>", "message": ..., "hint": ...}``. Request validation errors (bad query or
path values, malformed JSON) answer 400 with the fields named. Anything else is a bug: 500 with a
generic message, logged with the exception type only (never its text, which may quote data).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import DicomCloudError

log = logging.getLogger("dicom_cloud.service")


def error_body(error: str, message: str, hint: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": error, "message": message}
    if hint:
        body["hint"] = hint
    return body


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DicomCloudError)
    status = exc.http_status
    if status >= 500:
        log.warning("request.failed", extra={"error": type(exc).__name__, "status": status})
    headers = {"WWW-Authenticate": 'Bearer realm="dicom-cloud"'} if status == 401 else {}
    retry_after = getattr(exc, "retry_after", None)
    if status in (429, 503) and retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return JSONResponse(error_body(type(exc).__name__, exc.message, exc.hint), status, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return JSONResponse(error_body("ValidationError", "; ".join(problems) or "invalid request"), 400)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(
        error_body("HTTPError", str(exc.detail)), exc.status_code, headers=getattr(exc, "headers", None)
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("request.internal_error", extra={"error": type(exc).__name__}, exc_info=exc)
    return JSONResponse(error_body("InternalError", "internal error; the service log has the details"), 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DicomCloudError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
