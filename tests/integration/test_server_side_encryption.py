"""Server-side encryption on every provider, against the local servers as far as they implement it.

What each server does with what dicom-cloud sends (docs/server-side-encryption.md):

- SeaweedFS implements SSE-S3, SSE-C and, with a KMS configured, SSE-KMS: it refuses reads of an SSE-C
  object without the key (400) or with another key (403), and stores no plaintext of it.
- Azurite accepts encryption scopes and customer-provided keys and ignores both (it checks the SAS
  signature, scope included). What the client sends is checked on the wire, through a recording proxy.
- fake-gcs-server accepts customer-supplied keys and Cloud KMS key names and ignores both. What the SDK
  sends is checked by recording its HTTP requests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.client
import os
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

import servers
from dicom_cloud.backends import StoreConfig, open_store
from dicom_cloud.errors import NetworkError, PermissionDeniedError, UsageError
from dicom_cloud.store import MultipartPlan, Store
from servers import AzureServer, GCSServer, S3Server

MiB = 1024 * 1024
KEY = bytes(range(32))  # a customer key; its base64 and SHA-256 are what the wire must carry
KEY_B64 = base64.b64encode(KEY).decode()
KEY_SHA256_B64 = base64.b64encode(hashlib.sha256(KEY).digest()).decode()
GCS_KMS_KEY = "projects/p/locations/global/keyRings/ring/cryptoKeys/key"
#: SeaweedFS's built-in development KMS creates one key under this alias when it starts.
SEAWEED_KMS_ALIAS = "alias/seaweedfs-default"

_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_SERVER_SIDE_ENCRYPTION",
    "AWS_SSE_KMS_KEY_ID",
    "AWS_SSE_CUSTOMER_KEY_BASE64",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_BLOB_ENDPOINT",
    "AZURE_ENCRYPTION_KEY",
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in _CREDENTIAL_ENV:
        monkeypatch.delenv(var, raising=False)


def run(url: str, config: StoreConfig, body: Callable[[Store], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        store = open_store(url, config)
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def cfg(**kwargs: Any) -> StoreConfig:
    return StoreConfig(max_retries=1, connect_timeout=5, **kwargs)


async def round_trip(store: Store, tmp_path: Path) -> None:
    """Single put, multipart put, whole, ranged and streamed reads, stat and copy under ``store``."""
    big = os.urandom(11 * MiB + 123)
    source = tmp_path / "big.bin"
    source.write_bytes(big)
    await store.put("enc/small", b"hello, encrypted world")
    await store.put_file("enc/big", source, plan=MultipartPlan(part_size=5 * MiB, concurrency=2))
    assert bytes(await store.get("enc/small")) == b"hello, encrypted world"
    assert (await store.stat("enc/big")).size == len(big)
    assert (
        bytes(await store.get_range("enc/big", 5 * MiB - 10, 5 * MiB + 10))
        == big[5 * MiB - 10 : 5 * MiB + 10]
    )
    streamed = b"".join([bytes(c) async for c in store.stream("enc/big", chunk_size=4 * MiB)])
    assert streamed == big
    if store.features.server_side_copy:
        await store.copy("enc/small", "enc/copy")
        assert bytes(await store.get("enc/copy")) == b"hello, encrypted world"
    listed = sorted([info.key async for info in store.list("enc/")])
    assert {"enc/small", "enc/big"} <= set(listed)


# --------------------------------------------------------------------------------------------------------
# Configuration (no server)


def test_customer_key_is_checked_and_never_shown() -> None:
    config = StoreConfig(sse_customer_key=KEY)
    for text in (repr(config), str(config), f"{config}"):
        assert "sse_customer_key=<hidden, 32 bytes>" in text
        assert KEY_B64 not in text and repr(KEY) not in text and KEY.hex() not in text
    with pytest.raises(UsageError, match="32 bytes"):
        StoreConfig(sse_customer_key=KEY[:31])
    with pytest.raises(UsageError, match="bytes"):
        StoreConfig(sse_customer_key=KEY_B64)  # type: ignore[arg-type]


def test_encryption_options_are_checked() -> None:
    assert StoreConfig(sse_kms_key_id="alias/k").server_side_encryption == "aws:kms"
    assert StoreConfig(server_side_encryption="aws:kms:dsse", sse_kms_key_id="k").sse_kms_key_id == "k"
    with pytest.raises(UsageError, match="unknown server-side encryption"):
        StoreConfig(server_side_encryption="sse-c")
    with pytest.raises(UsageError, match="KMS key id"):
        StoreConfig(server_side_encryption="AES256", sse_kms_key_id="k")
    with pytest.raises(UsageError, match="encryption scope"):
        StoreConfig(azure_encryption_scope="Bad_Scope")
    with pytest.raises(UsageError, match="Cloud KMS key"):
        StoreConfig(gcs_kms_key_name="my-key")


def test_options_of_another_provider_are_refused_only_when_nothing_uses_them() -> None:
    StoreConfig(azure_encryption_scope="scope-1").check_encryption_applies({"s3", "azure"})
    StoreConfig(server_side_encryption="AES256").check_encryption_applies({"file", "gs"})
    cases: list[tuple[StoreConfig, set[str]]] = [
        (StoreConfig(azure_encryption_scope="scope-1"), {"s3", "file"}),
        (StoreConfig(gcs_kms_key_name=GCS_KMS_KEY), {"azure"}),
        (StoreConfig(sse_kms_key_id="k"), {"gs", "file"}),
        (StoreConfig(server_side_encryption="aws:kms"), {"azure"}),
        (StoreConfig(sse_customer_key=KEY), {"file", "memory"}),
    ]
    for config, schemes in cases:
        with pytest.raises(UsageError, match="applies only to"):
            config.check_encryption_applies(schemes)


def test_conflicting_options_for_one_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT", "acct")
    monkeypatch.setenv("AZURE_STORAGE_KEY", base64.b64encode(b"k" * 32).decode())
    with pytest.raises(UsageError, match="one kind of server-side encryption"):
        open_store("s3://bucket", StoreConfig(sse_customer_key=KEY, server_side_encryption="AES256"))
    with pytest.raises(UsageError, match="not both"):
        open_store("azure://container", StoreConfig(sse_customer_key=KEY, azure_encryption_scope="scope-1"))
    with pytest.raises(UsageError, match="not both"):
        open_store("gs://bucket", StoreConfig(sse_customer_key=KEY, gcs_kms_key_name=GCS_KMS_KEY))
    # Each store ignores the other providers' options (one configuration serves both ends of a copy).
    open_store("s3://bucket", StoreConfig(azure_encryption_scope="scope-1", gcs_kms_key_name=GCS_KMS_KEY))
    open_store("gs://bucket", StoreConfig(sse_kms_key_id="k", azure_encryption_scope="scope-1"))


def test_customer_key_never_travels_over_plain_http_to_another_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    with pytest.raises(UsageError, match="plain HTTP"):
        open_store(
            "s3://bucket", StoreConfig(endpoint="http://storage.example.com:9000", sse_customer_key=KEY)
        )
    open_store("s3://bucket", StoreConfig(endpoint="https://storage.example.com", sse_customer_key=KEY))
    open_store("s3://bucket", StoreConfig(endpoint="http://localhost:9000", sse_customer_key=KEY))
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://gcs.example.com:4443")
    with pytest.raises(UsageError, match="plain HTTP"):
        open_store("gs://bucket", StoreConfig(sse_customer_key=KEY))


# --------------------------------------------------------------------------------------------------------
# S3: SeaweedFS


@pytest.fixture
def s3_env(seaweedfs: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for var, value in seaweedfs.env().items():
        monkeypatch.setenv(var, value)
    return seaweedfs


def _volume_bytes(server: S3Server, bucket: str) -> bytes:
    """Everything SeaweedFS stored for ``bucket`` (each bucket is a collection of volume files)."""
    assert server._proc is not None
    data = server._proc.log_path.parent / "data"
    return b"".join(path.read_bytes() for path in sorted(data.rglob(f"{bucket}_*.dat")))


def test_s3_sse_c(s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    url = f"s3://{s3_bucket}"
    secret, clear = os.urandom(64 * 1024), os.urandom(64 * 1024)

    async def body(store: Store) -> None:
        assert not store.features.etag_is_md5  # on AWS an SSE-C object's ETag is not its MD5
        await round_trip(store, tmp_path)
        await store.put("enc/secret", secret)

    run(url, cfg(sse_customer_key=KEY), body)
    run(url, cfg(), lambda store: store.put("plain/clear", clear))

    # The server knows the object needs the key: a HEAD without it is refused...
    status, _ = s3_env.s3_head(f"/{s3_bucket}/enc/small")
    assert status == 400
    # ...as are reads through a store without the key (400) or with another key (403).
    with pytest.raises(UsageError, match="400"):
        run(url, cfg(), lambda store: store.get("enc/small"))
    with pytest.raises(PermissionDeniedError):
        run(url, cfg(sse_customer_key=os.urandom(32)), lambda store: store.get("enc/small"))
    # The multipart object and the server-side copy are under the key too.
    with pytest.raises(UsageError):
        run(url, cfg(), lambda store: store.get_range("enc/big", 0, 10))
    with pytest.raises(UsageError):
        run(url, cfg(), lambda store: store.get("enc/copy"))
    # And the volume files hold no plaintext of it (but do of an unencrypted object: the search works).
    stored = _volume_bytes(s3_env, s3_bucket)
    assert clear[1000:1064] in stored
    assert secret[1000:1064] not in stored


def test_s3_sse_kms_refused_without_a_kms(s3_env: S3Server, s3_bucket: str) -> None:
    """The shared SeaweedFS has no KMS configured: it answers 500; the error says what was asked."""
    config = cfg(sse_kms_key_id="alias/no-such-key")
    with pytest.raises(NetworkError) as caught:
        run(f"s3://{s3_bucket}", config, lambda store: store.put("kms/a", b"data"))
    assert "500" in str(caught.value)
    assert caught.value.hint and "aws:kms with KMS key alias/no-such-key" in caught.value.hint
    status, _ = s3_env.s3_head(f"/{s3_bucket}/kms/a")
    assert status == 404  # nothing was written unencrypted


#: SeaweedFS's development KMS ("local" provider), enabled through the "kms" block of its S3 config.
_LOCAL_KMS = {"default_provider": "local", "providers": {"local": {"type": "local"}}}


@pytest.fixture(scope="module")
def seaweedfs_kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A second SeaweedFS with its development KMS (about 3 s to start)."""
    real_json = servers.json

    class _WithKMS:
        @staticmethod
        def dumps(obj: Any, **kwargs: Any) -> str:
            return str(real_json.dumps({**obj, "kms": _LOCAL_KMS}, **kwargs))

    # start_seaweedfs writes its -s3.config with json.dumps: add the kms block to that one file.
    servers.json = _WithKMS  # type: ignore[assignment]
    try:
        server = servers.start_seaweedfs(tmp_path_factory.mktemp("seaweedfs-kms"))
    except RuntimeError as exc:
        pytest.fail(f"seaweedfs with KMS could not start: {exc}", pytrace=False)
    finally:
        servers.json = real_json
    yield server
    server.stop()


def test_s3_sse_kms(seaweedfs_kms: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var, value in seaweedfs_kms.env().items():
        monkeypatch.setenv(var, value)
    bucket = "kms-bucket"
    seaweedfs_kms.create_bucket(bucket)
    url = f"s3://{bucket}"
    run(url, cfg(sse_kms_key_id=SEAWEED_KMS_ALIAS), lambda store: round_trip(store, tmp_path))
    for key in ("enc/small", "enc/big"):
        status, headers = seaweedfs_kms.s3_head(f"/{bucket}/{key}")
        assert status == 200
        assert headers.get("x-amz-server-side-encryption") == "aws:kms", headers
        assert headers.get("x-amz-server-side-encryption-aws-kms-key-id"), headers
    # SSE-KMS objects read back without any key (the server holds it); a store without SSE reads them.
    assert bytes(run(url, cfg(), lambda store: store.get("enc/small"))) == b"hello, encrypted world"
    # A key the KMS does not know: refused, with the key named in the hint.
    with pytest.raises(NetworkError) as caught:
        run(url, cfg(sse_kms_key_id="alias/unknown"), lambda store: store.put("kms/x", b"x"))
    assert caught.value.hint and "alias/unknown" in caught.value.hint
    # No key id (AWS would use its aws/s3 key): SeaweedFS refuses too.
    with pytest.raises(NetworkError) as caught:
        run(url, cfg(server_side_encryption="aws:kms"), lambda store: store.put("kms/y", b"y"))
    assert caught.value.hint and "aws:kms" in caught.value.hint


def test_s3_sse_s3(s3_env: S3Server, s3_bucket: str) -> None:
    secret = os.urandom(64 * 1024)
    run(f"s3://{s3_bucket}", cfg(server_side_encryption="AES256"), lambda store: store.put("a", secret))
    status, headers = s3_env.s3_head(f"/{s3_bucket}/a")
    assert status == 200 and headers.get("x-amz-server-side-encryption") == "AES256"
    assert bytes(run(f"s3://{s3_bucket}", cfg(), lambda store: store.get("a"))) == secret
    assert secret[1000:1064] not in _volume_bytes(s3_env, s3_bucket)


# --------------------------------------------------------------------------------------------------------
# Azure: Azurite, behind a proxy that records what the client sends


class _Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        super().__init__(("127.0.0.1", 0), _Forward)


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Recorder

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        self.server.requests.append((self.command, self.path, {k.lower(): v for k, v in headers.items()}))
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=30)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
            self.send_response(answer.status, answer.reason)
            for name, value in answer.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(name, value)
            length_header = answer.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length_header or str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def azure_proxy(azurite: AzureServer) -> Iterator[tuple[_Recorder, str]]:
    """A recording proxy in front of Azurite, and the account endpoint through it."""
    parts = urllib.parse.urlsplit(azurite.endpoint)
    proxy = _Recorder(f"{parts.scheme}://{parts.netloc}")
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy, f"http://127.0.0.1:{proxy.server_address[1]}{parts.path}"
    finally:
        proxy.shutdown()
        proxy.server_close()


def _connection_string(azurite: AzureServer, endpoint: str) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={azurite.account};AccountKey={azurite.key};"
        f"BlobEndpoint={endpoint};"
    )


def _container_sas(azurite: AzureServer, container: str) -> str:
    """A plain container SAS (no scope), as a user would hold in AZURE_STORAGE_SAS_TOKEN."""
    now = datetime.now(UTC)
    start = (now - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    expiry = (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    fields = ["racwdlt", start, expiry, f"/blob/{azurite.account}/{container}", "", "", "https,http"]
    fields += ["2021-08-06", "c", "", "", "", "", "", "", ""]
    digest = hmac.new(base64.b64decode(azurite.key), "\n".join(fields).encode(), hashlib.sha256).digest()
    query = {"sv": "2021-08-06", "st": start, "se": expiry, "sr": "c", "sp": "racwdlt", "spr": "https,http"}
    return urllib.parse.urlencode({**query, "sig": base64.b64encode(digest).decode()})


def test_azure_customer_provided_key(
    azurite: AzureServer,
    azure_container: str,
    azure_proxy: tuple[_Recorder, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    proxy, endpoint = azure_proxy
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", _connection_string(azurite, endpoint))
    url = f"azure://{azure_container}"

    async def body(store: Store) -> None:
        assert not store.features.server_side_copy  # Azurite has no Put Blob From URL
        await round_trip(store, tmp_path)

    run(url, cfg(sse_customer_key=KEY), body)
    blob_requests = [(m, p, h) for m, p, h in proxy.requests if f"/{azure_container}/enc/" in p]
    writes = [h for m, _, h in blob_requests if m == "PUT"]
    reads = [h for m, _, h in blob_requests if m in ("GET", "HEAD")]
    assert writes and reads
    for headers in writes + reads:  # the key, its hash and the algorithm, on every blob request
        assert headers.get("x-ms-encryption-key") == KEY_B64
        assert headers.get("x-ms-encryption-key-sha256") == KEY_SHA256_B64
        assert headers.get("x-ms-encryption-algorithm") == "AES256"
    # Azurite accepts the key and ignores it: a read without the key succeeds there (Azure refuses it).
    assert bytes(run(url, cfg(), lambda store: store.get("enc/small"))) == b"hello, encrypted world"


def test_azure_encryption_scope_with_account_key(
    azurite: AzureServer,
    azure_container: str,
    azure_proxy: tuple[_Recorder, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """With an account key the store signs container SAS tokens naming the scope (ses)."""
    proxy, endpoint = azure_proxy
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", _connection_string(azurite, endpoint))
    url = f"azure://{azure_container}"

    async def body(store: Store) -> None:
        await round_trip(store, tmp_path)
        await store.delete(["enc/copy", "enc/big"])
        assert [info.key async for info in store.list("enc/")] == ["enc/small"]

    run(url, cfg(azure_encryption_scope="dicom-scope-1"), body)
    assert proxy.requests
    for _, path, headers in proxy.requests:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        assert query.get("ses") == ["dicom-scope-1"] and "sig" in query, path
        assert not headers.get("authorization", "").startswith("SharedKey")
    # Azurite checks the SAS signature, scope included: the same read with another scope is refused.
    read = next(path for method, path, _ in proxy.requests if method == "GET" and "/enc/small?" in path)
    upstream = urllib.parse.urlsplit(azurite.endpoint)
    for scope, expected in (("dicom-scope-1", 200), ("another-scope", 403)):
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=10)
        try:
            conn.request(
                "GET",
                read.replace("ses=dicom-scope-1", f"ses={scope}"),
                headers={"x-ms-version": "2021-08-06"},
            )
            assert conn.getresponse().status == expected, scope
        finally:
            conn.close()
    # The scope changes nothing for readers: a store without it reads the blob.
    assert bytes(run(url, cfg(), lambda store: store.get("enc/small"))) == b"hello, encrypted world"


def test_azure_encryption_scope_with_sas_token(
    azurite: AzureServer,
    azure_container: str,
    azure_proxy: tuple[_Recorder, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """With a SAS token (or Entra ID) the store sends x-ms-encryption-scope on its requests."""
    proxy, endpoint = azure_proxy
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT", azurite.account)
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", _container_sas(azurite, azure_container))
    monkeypatch.setenv("AZURE_STORAGE_BLOB_ENDPOINT", endpoint)
    run(
        f"azure://{azure_container}",
        cfg(azure_encryption_scope="dicom-scope-2"),
        lambda s: round_trip(s, tmp_path),
    )
    writes = [h for m, p, h in proxy.requests if m == "PUT" and f"/{azure_container}/enc/" in p]
    assert writes
    assert all(h.get("x-ms-encryption-scope") == "dicom-scope-2" for h in writes)


# --------------------------------------------------------------------------------------------------------
# GCS: fake-gcs-server, with the SDK's requests recorded


@pytest.fixture
def gcs_requests(
    fake_gcs: GCSServer, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, str, dict[str, str]]]:
    for var, value in fake_gcs.env().items():
        monkeypatch.setenv(var, value)
    recorded: list[tuple[str, str, dict[str, str]]] = []
    real_send = requests.Session.send

    def send(self: requests.Session, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        headers = {k.lower(): str(v) for k, v in request.headers.items()}
        recorded.append((request.method or "", request.url or "", headers))
        return real_send(self, request, **kwargs)

    monkeypatch.setattr(requests.Session, "send", send)
    return recorded


def _media_requests(recorded: list[tuple[str, str, dict[str, str]]], bucket: str) -> list[dict[str, str]]:
    """Requests that carry object content: uploads, media downloads and rewrites."""
    out = []
    for _, url, headers in recorded:
        if bucket not in url:
            continue
        if "/upload/" in url or "alt=media" in url or "/download/" in url or "rewriteTo" in url:
            out.append(headers)
    return out


def test_gcs_customer_supplied_key(
    gcs_bucket: str, gcs_requests: list[tuple[str, str, dict[str, str]]], tmp_path: Path
) -> None:
    url = f"gs://{gcs_bucket}"
    run(url, cfg(sse_customer_key=KEY), lambda store: round_trip(store, tmp_path))
    media = _media_requests(gcs_requests, gcs_bucket)
    assert len(media) >= 4
    for headers in media:
        assert headers.get("x-goog-encryption-algorithm") == "AES256"
        assert headers.get("x-goog-encryption-key") == KEY_B64
        assert headers.get("x-goog-encryption-key-sha256") == KEY_SHA256_B64
    rewrites = [h for _, u, h in gcs_requests if "rewriteTo" in u]
    assert rewrites and all(h.get("x-goog-copy-source-encryption-key") == KEY_B64 for h in rewrites)
    # fake-gcs-server ignores the key: a read without it succeeds there (GCS refuses it).
    assert bytes(run(url, cfg(), lambda store: store.get("enc/small"))) == b"hello, encrypted world"


def test_gcs_kms_key(
    gcs_bucket: str, gcs_requests: list[tuple[str, str, dict[str, str]]], tmp_path: Path
) -> None:
    run(f"gs://{gcs_bucket}", cfg(gcs_kms_key_name=GCS_KMS_KEY), lambda store: round_trip(store, tmp_path))
    quoted = urllib.parse.quote(GCS_KMS_KEY, safe="")
    uploads = [u for m, u, _ in gcs_requests if m == "POST" and "/upload/" in u and "uploadId" not in u]
    assert len(uploads) >= 2  # the single-request upload and the start of the resumable one
    assert all(f"kmsKeyName={quoted}" in u for u in uploads), uploads
    rewrites = [u for _, u, _ in gcs_requests if "rewriteTo" in u]
    assert rewrites and all(f"destinationKmsKeyName={quoted}" in u for u in rewrites), rewrites
    # No customer key goes with a KMS key.
    assert not any("x-goog-encryption-key" in h for _, _, h in gcs_requests)


# --------------------------------------------------------------------------------------------------------
# Azure: whole-blob writes carry Content-MD5, which the server checks


def test_azure_puts_carry_content_md5_checked_by_the_server(
    azurite: AzureServer,
    azure_container: str,
    azure_proxy: tuple[_Recorder, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dicom_cloud.backends import azure_blocks
    from dicom_cloud.errors import AlreadyExistsError, IntegrityError
    from dicom_cloud.store import PutOptions

    proxy, endpoint = azure_proxy
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", _connection_string(azurite, endpoint))
    url = f"azure://{azure_container}"
    data = os.urandom(70_000)
    options = PutOptions(content_type="application/dicom", metadata={"dicom_cloud_crc32c": "0badcafe"})

    async def write(store: Store) -> Any:
        await store.put("md5/a.dcm", data, options)
        with pytest.raises(AlreadyExistsError):
            await store.put("md5/a.dcm", b"other", PutOptions(if_absent=True))
        return await store.read("md5/a.dcm")

    info, got = run(url, cfg(), write)
    assert bytes(got) == data and info.metadata["dicom_cloud_crc32c"] == "0badcafe"
    assert info.content_type == "application/dicom"
    [put] = [h for m, p, h in proxy.requests if m == "PUT" and p.split("?")[0].endswith("/md5/a.dcm")][:1]
    assert put["content-md5"] == base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()

    # Bytes that do not match their Content-MD5 (damaged on the way) are refused by the server.
    wrong = hashlib.md5(b"something else", usedforsecurity=False).digest()
    monkeypatch.setattr(azure_blocks, "_md5", lambda _: wrong)
    with pytest.raises(IntegrityError):
        run(url, cfg(), lambda store: store.put("md5/b.dcm", data, options))
    assert not [n for n in run(url, cfg(), lambda store: _names(store, "md5/")) if n.endswith("b.dcm")]


async def _names(store: Store, prefix: str) -> list[str]:
    return [info.key async for info in store.list(prefix)]
