"""Structured JSON logs and Prometheus metrics of every request, free of PHI and secrets.

What a request log line holds: method, the route *template* (``/studies/{study}``, never the path:
paths carry UIDs), status, duration, the principal's kind, tenant and subject id. Never the query
string (QIDO queries carry patient names), never headers (credentials), never bodies.

Metrics live in one registry per app (so several apps in one test process do not collide) and are
served at ``/metrics`` in the Prometheus text format.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("dicom_cloud.service.access")

#: Attributes of a LogRecord that are not extra fields.
_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event (the message) and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The exception's type only: messages of foreign exceptions may quote data.
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


def setup_json_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.formatter.converter = time.gmtime  # type: ignore[union-attr]
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Their access logs print full paths and query strings: ours replaces them.
    logging.getLogger("uvicorn.access").disabled = True
    # Libraries that log their own workings at info (alembic announces each of its plugins at
    # every start-up; its migrations, which an operator wants to see, log elsewhere).
    for noisy in ("urllib3", "google", "httpx", "httpcore", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Metrics:
    """The service's Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dicom_cloud_http_requests_total",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "dicom_cloud_http_request_duration_seconds",
            "Time to the end of the response, by method and route template",
            ["method", "route"],
            registry=self.registry,
        )
        self.instances_stored = Counter(
            "dicom_cloud_instances_stored_total",
            "Instances offered for storage (STOW-RS and completed uploads), by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.bytes_sent = Counter(
            "dicom_cloud_http_response_bytes_total",
            "Bytes of response bodies, by route template",
            ["route"],
            registry=self.registry,
        )


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class AccessLogMiddleware:
    """Times each request to its last byte, counts it, logs one line (pure ASGI: keeps streaming)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            elapsed = time.perf_counter() - start
            route = route_template(scope)
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.duration.labels(method, route).observe(elapsed)
            self.metrics.bytes_sent.labels(route).inc(sent)
            principal = scope.get("state", {}).get("principal")
            extra: dict[str, Any] = {
                "method": method,
                "route": route,
                "status": status,
                "duration_ms": round(elapsed * 1000, 2),
                "bytes": sent,
            }
            if principal is not None:
                extra.update(auth=principal.kind, tenant=principal.tenant, subject=principal.subject)
            log.info("request", extra=extra)
