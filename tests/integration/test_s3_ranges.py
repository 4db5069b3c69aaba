"""The S3 ranged reader of large downloads (backends/s3_ranges.py) against SeaweedFS, directly and
through the fault proxy: every byte in order, a cut answer continued from its last byte, errors
of the tree, a cancelled read that lets go of its sink at once, and the stores that step aside."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from dicom_cloud.backends import StoreConfig, open_store
from dicom_cloud.errors import AuthenticationError, NotFoundError, ThrottledError
from dicom_cloud.store import RangeReader, Store
from faultproxy import FaultProxy, Rule
from servers import S3Server

MiB = 1024 * 1024
DATA = random.Random(5).randbytes(5 * MiB + 123)
#: Seconds within which a cancelled read must have returned: it takes half a second at most (the CLI
#: has 2 s to stop); the bound allows a busy machine, as test_interrupts.py does, and stays far
#: below the 30 s waits it must not sit out (a delayed answer, a connect that does not complete).
STOPPED_WITHIN = 5.0


@pytest.fixture
def env(seaweedfs: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield seaweedfs


@pytest.fixture
def proxy(env: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    parts = urlsplit(env.endpoint)
    assert parts.hostname and parts.port
    with FaultProxy(parts.hostname, parts.port, seed=11) as faults:
        monkeypatch.setenv("AWS_ENDPOINT_URL", faults.endpoint)
        yield faults


def _store(bucket: str, **config: object) -> Store:
    return open_store(f"s3://{bucket}", StoreConfig(**config))  # type: ignore[arg-type]


def _reader(store: Store) -> RangeReader:
    reader = store.range_reader()
    assert reader is not None, "an S3 store with keys should offer its ranged reader"
    return reader


async def _seed(bucket: str, key: str) -> None:
    store = _store(bucket)
    await store.put(key, DATA)
    await store.close()


def _read(reader: RangeReader, key: str, start: int, end: int) -> tuple[bytes, list[int]]:
    """The bytes read, and the offsets the sink was given (in order)."""
    got = bytearray(end - start)
    offsets: list[int] = []

    def sink(offset: int, chunk: memoryview) -> None:
        got[offset - start : offset - start + len(chunk)] = chunk
        offsets.append(offset)

    asyncio.run(reader.read(key, start, end, sink))
    return bytes(got), offsets


def test_reads_every_byte_in_order(env: S3Server, s3_bucket: str) -> None:
    asyncio.run(_seed(s3_bucket, "r/whole.bin"))
    store = _store(s3_bucket)
    reader = _reader(store)
    for start, end in ((0, len(DATA)), (MiB - 1, 3 * MiB + 5), (len(DATA) - 1, len(DATA))):
        got, offsets = _read(reader, "r/whole.bin", start, end)
        assert got == DATA[start:end]
        assert offsets == sorted(offsets) and offsets[0] == start


def test_a_cut_answer_is_continued_from_its_last_byte(proxy: FaultProxy, s3_bucket: str) -> None:
    asyncio.run(_seed(s3_bucket, "r/cut.bin"))
    proxy.add(Rule("drop_response_body", method="GET", count=2))
    proxy.add(Rule("slowdown", method="GET", count=1))
    store = _store(s3_bucket, max_retries=4)
    got, offsets = _read(_reader(store), "r/cut.bin", 0, len(DATA))
    assert got == DATA
    assert proxy.counts["drop_response_body"] == 2 and proxy.counts["slowdown"] == 1
    # Nothing handed to the sink twice: each retry asked for the rest only.
    assert len(offsets) == len(set(offsets))


def test_errors_are_the_trees(env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(s3_bucket)
    with pytest.raises(NotFoundError):
        _read(_reader(store), "r/missing.bin", 0, 10)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + env.secret_key)
    with pytest.raises(AuthenticationError):
        _read(_reader(_store(s3_bucket)), "r/missing.bin", 0, 10)


def test_sustained_throttling_ends_as_throttled(proxy: FaultProxy, s3_bucket: str) -> None:
    asyncio.run(_seed(s3_bucket, "r/slow.bin"))
    proxy.add(Rule("slowdown", method="GET"))
    store = _store(s3_bucket, max_retries=1)
    with pytest.raises(ThrottledError):
        _read(_reader(store), "r/slow.bin", 0, len(DATA))
    assert proxy.counts["slowdown"] == 2  # the request and its one retry


def test_a_cancelled_read_lets_go_of_its_sink_at_once(proxy: FaultProxy, s3_bucket: str) -> None:
    asyncio.run(_seed(s3_bucket, "r/stall.bin"))
    proxy.add(Rule("delay", method="GET", seconds=30))  # an answer that does not come
    reader = _reader(_store(s3_bucket))
    calls_after: list[int] = []
    cancelled = threading.Event()

    def sink(offset: int, chunk: memoryview) -> None:
        if cancelled.is_set():
            calls_after.append(offset)

    async def main() -> float:
        task = asyncio.create_task(reader.read("r/stall.bin", 0, len(DATA), sink))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        task.cancel()
        cancelled.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    assert asyncio.run(main()) < STOPPED_WITHIN
    assert calls_after == []


def test_stores_that_cannot_sign_step_aside(
    env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _store(s3_bucket).range_reader() is not None
    assert _store(s3_bucket, sse_customer_key=bytes(32)).range_reader() is None
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert _store(s3_bucket).range_reader() is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    assert _store(s3_bucket).range_reader() is None


def test_a_read_cancelled_while_connecting_is_not_waited_for(
    env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint whose accept queue is full never completes a connection: a cancelled read
    does not wait for the connect timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    host, port = listener.getsockname()
    fillers = []
    for _ in range(3):  # connections nobody accepts: later SYNs are dropped
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect((host, port))
        fillers.append(filler)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    reader = _reader(_store(s3_bucket, connect_timeout=30))

    async def main() -> float:
        task = asyncio.create_task(reader.read("r/any.bin", 0, 10, lambda offset, chunk: None))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    try:
        assert asyncio.run(main()) < STOPPED_WITHIN
    finally:
        for sock in (*fillers, listener):
            sock.close()
