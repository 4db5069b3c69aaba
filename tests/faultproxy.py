"""A fault-injecting HTTP reverse proxy on 127.0.0.1, for tests of retries and throttling.

Clients are pointed at the proxy's ``endpoint`` instead of the server's. The proxy forwards each
request to the upstream server byte for byte, Host header included: an S3 client signs the Host it
connects to (the proxy's), and the server checks the signature against the Host it receives, so
SigV4 signatures stay valid. Between the two it applies programmable faults, chosen per request by
rules (method, path pattern, probability or every n-th request, count) with a seeded random
generator::

    with FaultProxy("127.0.0.1", 8333, seed=7) as proxy:
        proxy.add(Rule("slowdown", probability=0.1))
        proxy.add(Rule("drop_response_body", method="GET", count=3))
        ... point the client at proxy.endpoint ...
        assert proxy.counts["slowdown"] > 0

Faults (``Rule.fault``):

- ``slowdown``: 503 with an S3 ``SlowDown`` XML error body, without asking the server.
- ``server_error``: 500 ``InternalError``.  ``too_many_requests``: 429 ``SlowDown``.
- ``no_such_upload``: 404 ``NoSuchUpload``, as S3 may answer a multipart commit sent again after
  the first one finished the upload.
- ``delay``: wait ``Rule.seconds`` and then forward as usual.
- ``drop_request_body``: read part of the request body, then close the connection.
- ``drop_response_body``: forward, send the server's status, headers and half its body, then close
  (a bodiless answer is reset before its head instead).
- ``reset``: close the connection with a TCP reset as soon as the request head is read.

The first rule that matches a request and wins its draw applies; the others are not drawn. Standard
library only; runs its own event loop in a daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import ssl
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

Fault = Literal[
    "slowdown",
    "server_error",
    "too_many_requests",
    "no_such_upload",
    "delay",
    "drop_request_body",
    "drop_response_body",
    "reset",
]

_ERRORS: dict[str, tuple[int, str, str]] = {
    "slowdown": (503, "Service Unavailable", "SlowDown"),
    "server_error": (500, "Internal Server Error", "InternalError"),
    "too_many_requests": (429, "Too Many Requests", "SlowDown"),
    "no_such_upload": (404, "Not Found", "NoSuchUpload"),
}
_HEAD_LIMIT = 64 * 1024


@dataclass
class Rule:
    fault: Fault
    #: HTTP method to match (any when None).
    method: str | None = None
    #: Regular expression searched in the request target (path and query); any when None.
    path: str | None = None
    probability: float = 1.0
    #: Fire on every n-th request this rule sees instead of drawing (counts that do not depend on
    #: the order in which concurrent requests arrive).
    every: int | None = None
    #: How many times this rule may fire at most (unbounded when None).
    count: int | None = None
    #: For ``delay``: seconds to wait before forwarding.
    seconds: float = 0.5
    #: For error answers: a Retry-After header to send (seconds), when set.
    retry_after: int | None = None
    fired: int = field(default=0, init=False)
    seen: int = field(default=0, init=False)

    def matches(self, method: str, target: str) -> bool:
        if self.count is not None and self.fired >= self.count:
            return False
        if self.method is not None and self.method != method:
            return False
        return self.path is None or re.search(self.path, target) is not None


@dataclass
class _Request:
    method: str
    target: str
    head: bytes
    headers: dict[str, str]


class FaultProxy:
    def __init__(
        self, upstream_host: str, upstream_port: int, *, seed: int = 0, tls: ssl.SSLContext | None = None
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        #: Served over TLS with this context when set (the upstream is still spoken to in clear):
        #: an HTTPS endpoint in front of a server that has none, as a load balancer would be.
        self._tls = tls
        self.rules: list[Rule] = []
        #: What the proxy did: "requests", "forwarded", and one entry per fault name.
        self.counts: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self.port = 0

    # -- control (from the test's thread) --------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule and reset the counters."""
        with self._lock:
            self.rules.clear()
            self.counts.clear()

    def start(self) -> FaultProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(timeout=10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            # Connections still open (clients keep them alive): end their tasks before the loop.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving ---------------------------------------------------------------------------------

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._tls)
        self.port = self._server.sockets[0].getsockname()[1]

    def _choose(self, method: str, target: str) -> Rule | None:
        with self._lock:
            self.counts["requests"] += 1
            for rule in self.rules:
                if not rule.matches(method, target):
                    continue
                rule.seen += 1
                if rule.every is not None:
                    fires = rule.seen % rule.every == 0
                else:
                    fires = self._random.random() < rule.probability
                if fires:
                    rule.fired += 1
                    self.counts[rule.fault] += 1
                    return rule
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # one client connection carries many requests (keep-alive)
                request = await _read_head(reader)
                if request is None:
                    return
                rule = self._choose(request.method, request.target)
                keep_open = await self._handle(request, rule, reader, writer)
                if not keep_open:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(
        self, request: _Request, rule: Rule | None, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        fault = rule.fault if rule else None
        if fault == "reset":
            _abort(writer)
            return False
        if fault == "drop_request_body":
            length = int(request.headers.get("content-length", "0") or 0)
            with contextlib.suppress(Exception):
                await reader.read(max(0, length // 2))
            _abort(writer)
            return False
        if fault == "delay" and rule is not None:
            await asyncio.sleep(rule.seconds)
        body = await _read_body(reader, request.headers)
        if fault in _ERRORS and rule is not None:
            status, reason, code = _ERRORS[fault]
            payload = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>injected by the fault proxy</Message><Resource>{_xml(request.target)}</Resource>"
                "<RequestId>fault-proxy</RequestId></Error>"
            ).encode()
            extra = f"Retry-After: {rule.retry_after}\r\n" if rule.retry_after is not None else ""
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(payload)}\r\n{extra}\r\n".encode()
                + payload
            )
            await writer.drain()
            return True
        return await self._forward(request, body, writer, drop_body=fault == "drop_response_body")

    async def _forward(
        self, request: _Request, body: bytes, writer: asyncio.StreamWriter, *, drop_body: bool
    ) -> bool:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            up_writer.write(request.head + body)
            await up_writer.drain()
            head = await up_reader.readuntil(b"\r\n\r\n")
            status_line, headers = _parse_head(head)
            status = int(status_line.split(b" ")[1])
            if request.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                answer = b""
            elif "content-length" in headers:
                answer = await up_reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                answer = await _read_chunked_raw(up_reader)
            else:
                answer = await up_reader.read()
                head = head[:-2] + f"Content-Length: {len(answer)}\r\n\r\n".encode()
            with self._lock:
                self.counts["forwarded"] += 1
            if drop_body and len(answer) > 1:
                # A clean close part-way: the client sees the body end early.
                writer.write(head + answer[: len(answer) // 2])
                await writer.drain()
                writer.close()
                return False
            if drop_body:  # nothing to cut short: drop before the head instead
                _abort(writer)
                return False
            writer.write(head + answer)
            await writer.drain()
            return headers.get("connection", "").lower() != "close"
        finally:
            up_writer.close()


async def _read_head(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    if len(head) > _HEAD_LIMIT:
        raise ValueError("request head too large")
    request_line, headers = _parse_head(head)
    method, target, _ = request_line.decode("latin-1").split(" ", 2)
    # The upstream connection is used for one request: ask it to close when done (not signed).
    lines = [line for line in head[:-4].split(b"\r\n") if not line.lower().startswith(b"connection:")]
    forwarded = b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"
    return _Request(method, target, forwarded, headers)


def _parse_head(head: bytes) -> tuple[bytes, dict[str, str]]:
    first, *rest = head[:-4].split(b"\r\n")
    headers: dict[str, str] = {}
    for line in rest:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return first, headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return await _read_chunked_raw(reader)
    length = int(headers.get("content-length", "0") or 0)
    return await reader.readexactly(length) if length else b""


async def _read_chunked_raw(reader: asyncio.StreamReader) -> bytes:
    """A chunked body as it was sent (size lines included), to be forwarded unchanged."""
    parts = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        parts.append(size_line)
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while True:  # trailers, then the empty line
                line = await reader.readuntil(b"\r\n")
                parts.append(line)
                if line == b"\r\n":
                    return b"".join(parts)
        parts.append(await reader.readexactly(size + 2))


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed server or a middlebox would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
