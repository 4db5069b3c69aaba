"""The request layer of the retry policy: the same waits for every HTTP stack, Retry-After honoured
where the stack shows it (rest.py against a real loopback HTTP server), and S3's checksum choice."""

from __future__ import annotations

import asyncio
import http.server
import random
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import ClassVar

import pytest

from dicom_cloud.backends import StoreConfig
from dicom_cloud.backends.objectstore import retry_config
from dicom_cloud.backends.objectstore_s3 import s3_checksum_algorithm
from dicom_cloud.backends.rest import Request, RestClient
from dicom_cloud.errors import ThrottledError, UsageError
from dicom_cloud.retry import RequestRetries, parse_retry_after


def test_waits_double_with_full_jitter_up_to_the_ceiling() -> None:
    policy = RequestRetries(first_delay=0.1, max_delay=8.0)
    rng = random.Random(7)
    for retry in range(1, 12):
        ceiling = min(8.0, 0.1 * 2 ** (retry - 1))
        for _ in range(50):
            assert 0.0 <= policy.delay(retry, rng=rng) <= ceiling


def test_retry_after_is_a_floor_capped_by_the_ceiling() -> None:
    policy = RequestRetries(first_delay=0.1, max_delay=8.0)
    assert policy.delay(1, retry_after=2.0) == 2.0
    assert policy.delay(1, retry_after=60.0) == 8.0


def test_retry_after_header_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("-1") is None
    assert parse_retry_after(None) is None


def test_sleeps_read_the_latest_retry_after() -> None:
    seen: list[float | None] = [None, 3.0]
    sleeps = RequestRetries(first_delay=0.01).sleeps(lambda: seen[-1])
    assert next(sleeps) == 3.0


def test_obstore_gets_the_same_numbers() -> None:
    config = retry_config(StoreConfig(max_retries=3, request_timeout=42.0))
    assert config["max_retries"] == 3
    assert config["retry_timeout"] == timedelta(seconds=42.0)
    backoff = config["backoff"]
    assert backoff["init_backoff"] == timedelta(seconds=RequestRetries().first_delay)
    assert backoff["max_backoff"] == timedelta(seconds=RequestRetries().max_delay)


def test_s3_checksum_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOM_CLOUD_S3_CHECKSUM", raising=False)
    assert s3_checksum_algorithm(StoreConfig()) == "SHA256"
    monkeypatch.setenv("DICOM_CLOUD_S3_CHECKSUM", "crc64nvme")
    assert s3_checksum_algorithm(StoreConfig()) == "CRC64NVME"
    monkeypatch.setenv("DICOM_CLOUD_S3_CHECKSUM", "none")
    assert s3_checksum_algorithm(StoreConfig()) is None
    monkeypatch.setenv("DICOM_CLOUD_S3_CHECKSUM", "md5")
    with pytest.raises(UsageError):
        s3_checksum_algorithm(StoreConfig())


class _Throttling(http.server.BaseHTTPRequestHandler):
    """Answers 503 with Retry-After: 1 to the first ``refusals`` requests, then 200."""

    refusals = 1
    seen: ClassVar[list[float]] = []

    def do_GET(self) -> None:
        type(self).seen.append(time.monotonic())
        if len(type(self).seen) <= type(self).refusals:
            self.send_response(503)
            self.send_header("Retry-After", "1")
        else:
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def throttling_server() -> Iterator[str]:
    _Throttling.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Throttling)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_rest_client_waits_as_long_as_retry_after_says(throttling_server: str) -> None:
    _Throttling.refusals = 1
    client = RestClient(what="test server", max_retries=2)
    try:
        response = asyncio.run(client.send(lambda: Request("GET", throttling_server, {})))
    finally:
        client.close()
    assert response.status_code == 200
    first, second = _Throttling.seen
    assert second - first >= 0.95  # the server's second, not a sub-second backoff draw


def test_rest_client_hands_retry_after_to_the_object_layer(throttling_server: str) -> None:
    _Throttling.refusals = 10
    client = RestClient(what="test server", max_retries=0)
    try:
        with pytest.raises(ThrottledError) as raised:
            asyncio.run(client.send(lambda: Request("GET", throttling_server, {})))
    finally:
        client.close()
    assert raised.value.retry_after == 1.0
