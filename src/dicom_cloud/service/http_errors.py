"""Errors only the HTTP face raises: each a :mod:`dicom_cloud.errors` class with its HTTP status.

They join the core tree, so the one exception handler (``service/handlers.py``) maps them like any
other error: status from ``http_status``, body ``{"error", "message", "hint"}``.
"""

from __future__ import annotations

from ..errors import AuthenticationError, PermissionDeniedError, ThrottledError, UsageError


class MalformedRequestError(UsageError):
    """The request body or its framing is broken (multipart without boundary, truncated parts)."""

    http_status = 400


class PayloadTooLargeError(UsageError):
    """The body or a declared upload is larger than the configured maximum."""

    http_status = 413


class UnsupportedMediaTypeError(UsageError):
    """The body's media type is not one this route accepts."""

    http_status = 415


class NotAcceptableError(UsageError):
    """None of the media types in Accept can be produced by this route."""

    http_status = 406


class UnauthenticatedError(AuthenticationError):
    """No credentials, or credentials the service does not accept (missing, unknown, expired)."""

    http_status = 401


class ForbiddenError(PermissionDeniedError):
    """The credentials are valid but lack the scope or the study this route needs."""

    http_status = 403


class ServiceBusyError(ThrottledError):
    """The service cannot take the request now (its memory budget is taken); try again after
    ``retry_after`` seconds (sent as Retry-After). Throttling, as a store's 503 SlowDown is."""

    def __init__(self, message: str, *, retry_after: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint, retry_after=retry_after)
