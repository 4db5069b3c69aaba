"""The fault-injecting proxy itself (tests/faultproxy.py), in front of a tiny local HTTP server."""

from __future__ import annotations

import http.client
import http.server
import threading
from collections.abc import Iterator

import pytest

from faultproxy import FaultProxy, Rule

BODY = bytes(range(256)) * 40  # 10 KiB


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.send_header("X-Seen-Host", self.headers["Host"])
        self.end_headers()
        self.wfile.write(BODY)

    def do_PUT(self) -> None:
        data = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with FaultProxy("127.0.0.1", server.server_address[1], seed=1) as running:
        yield running
    server.shutdown()


def _get(
    proxy: FaultProxy, method: str = "GET", body: bytes | None = None
) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    try:
        conn.request(method, "/bucket/key?x=1", body=body, headers={"Host": "example.test:9000"})
        response = conn.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        conn.close()


def test_forwards_unchanged_with_the_host_header(proxy: FaultProxy) -> None:
    status, body, headers = _get(proxy)
    assert (status, body) == (200, BODY)
    assert headers["X-Seen-Host"] == "example.test:9000"  # signatures over Host stay valid
    status, body, _ = _get(proxy, "PUT", b"payload")
    assert (status, body) == (200, b"payload")
    assert proxy.counts["requests"] == 2 and proxy.counts["forwarded"] == 2


def test_error_answers_and_counts(proxy: FaultProxy) -> None:
    proxy.add(Rule("slowdown", method="GET", count=2, retry_after=3))
    first, second, third = _get(proxy), _get(proxy), _get(proxy)
    assert first[0] == second[0] == 503 and b"<Code>SlowDown</Code>" in first[1]
    assert first[2]["Retry-After"] == "3"
    assert third[0] == 200  # the rule's count is spent
    assert proxy.counts["slowdown"] == 2
    proxy.clear()
    proxy.add(Rule("too_many_requests", path=r"x=1"))
    assert _get(proxy)[0] == 429
    proxy.clear()
    proxy.add(Rule("server_error", method="PUT"))
    assert _get(proxy)[0] == 200 and _get(proxy, "PUT", b"x")[0] == 500


@pytest.mark.parametrize("fault", ["drop_response_body", "reset"])
def test_dropped_connections(proxy: FaultProxy, fault: str) -> None:
    proxy.add(Rule(fault, count=1))  # type: ignore[arg-type]
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        _get(proxy)
    assert _get(proxy)[1] == BODY
    assert proxy.counts[fault] == 1


def test_drop_request_body(proxy: FaultProxy) -> None:
    proxy.add(Rule("drop_request_body", method="PUT"))
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        _get(proxy, "PUT", b"z" * 100_000)
    assert proxy.counts["forwarded"] == 0


def test_probability_is_seeded() -> None:
    def fired(seed: int) -> list[bool]:
        proxy = FaultProxy("127.0.0.1", 9, seed=seed)
        proxy.add(Rule("slowdown", probability=0.3))
        return [proxy._choose("GET", "/k") is not None for _ in range(200)]

    assert fired(5) == fired(5)
    assert 30 < sum(fired(5)) < 90


def test_delay(proxy: FaultProxy) -> None:
    import time

    proxy.add(Rule("delay", seconds=0.3, count=1))
    started = time.monotonic()
    assert _get(proxy)[1] == BODY
    assert time.monotonic() - started >= 0.3


def test_every_nth_request() -> None:
    proxy = FaultProxy("127.0.0.1", 9)
    proxy.add(Rule("reset", every=3))
    fired = [proxy._choose("GET", "/k") is not None for _ in range(9)]
    assert fired == [False, False, True] * 3
