"""S3 endpoints over HTTPS with a site's own CA: SeaweedFS behind a TLS-terminating proxy on
127.0.0.1, trusted through ``SSL_CERT_FILE`` (docs/credentials.md, "Endpoints over HTTPS").

Both of the client's HTTP stacks speak TLS here: obstore's (listings, small objects, uploads) and
the ranged reader's (the parts of a large download), so each must find the CA the same way."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_cli import assert_same_tree, cli_env, run_cli

from dicom_cloud.backends import StoreConfig, open_store
from dicom_cloud.errors import UntrustedCertificateError
from dicom_cloud.store import PutOptions
from faultproxy import FaultProxy
from servers import S3Server
from tls_certs import ServerCertificate, make_server_certificate

MiB = 1024 * 1024


@dataclass
class TLSEndpoint:
    proxy: FaultProxy
    certificate: ServerCertificate
    root: str  # s3://bucket
    server_env: dict[str, str]  # keys and the HTTPS endpoint, no trust settings


@pytest.fixture
def tls_s3(seaweedfs: S3Server, s3_bucket: str, tmp_path: Path) -> Iterator[TLSEndpoint]:
    certificate = make_server_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate.cert, certificate.key)
    upstream = urlsplit(seaweedfs.endpoint)
    assert upstream.hostname and upstream.port
    with FaultProxy(upstream.hostname, upstream.port, tls=context) as proxy:
        env = {**seaweedfs.env(), "AWS_ENDPOINT_URL": proxy.endpoint}
        yield TLSEndpoint(proxy, certificate, f"s3://{s3_bucket}", env)


def _another_ca(tmp_path: Path) -> Path:
    """A trust store without the server's CA: another CA's certificate."""
    (tmp_path / "other").mkdir()
    return make_server_certificate(tmp_path / "other").ca


def test_upload_and_download_over_https_with_a_private_ca(tls_s3: TLSEndpoint, tmp_path: Path) -> None:
    rng = random.Random(7)
    files = {f"small/{i:02d}.dcm": rng.randbytes(rng.randrange(1, 64 * 1024)) for i in range(20)}
    files["large.dcm"] = rng.randbytes(11 * MiB + 5)  # a multipart upload, a ranged download
    source = tmp_path / "src"
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    env = cli_env(tls_s3.server_env, SSL_CERT_FILE=str(tls_s3.certificate.ca))
    sizes = ["--multipart-threshold", "5MiB", "--part-size", "5MiB"]
    run_cli("upload", f"{source}/", f"{tls_s3.root}/tls/", "-r", *sizes, env=env).ok()
    down = tmp_path / "down"
    run_cli("download", f"{tls_s3.root}/tls/", f"{down}/", "-r", *sizes, env=env).ok()
    assert_same_tree(down, files)
    assert tls_s3.proxy.counts["requests"] > len(files)  # every request went through TLS


@pytest.mark.parametrize(
    ("command", "size"),
    [("upload", 1000), ("upload", 6 * MiB), ("download", 1000), ("download", 6 * MiB)],
    ids=["small-upload", "multipart-upload", "small-download", "ranged-download"],
)
def test_an_untrusted_certificate_is_a_clear_error(
    tls_s3: TLSEndpoint, tmp_path: Path, command: str, size: int
) -> None:
    """Without the CA, each HTTP stack refuses the certificate: exit 6 at once (a certificate is not
    retried), a message naming the endpoint and the reason, the hint, no traceback."""
    local = tmp_path / "one.dcm"
    url = f"{tls_s3.root}/untrusted/one.dcm"
    sizes = ["--multipart-threshold", "5MiB", "--part-size", "5MiB"]
    if command == "upload":
        local.write_bytes(b"x" * size)
        argv = ["upload", str(local), url, *sizes]
    else:
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / "one.dcm").write_bytes(b"x" * size)
        trusted = cli_env(tls_s3.server_env, SSL_CERT_FILE=str(tls_s3.certificate.ca))
        run_cli("upload", str(tmp_path / "src" / "one.dcm"), url, *sizes, env=trusted).ok()
        argv = ["download", url, str(local), *sizes]
    untrusted = cli_env(tls_s3.server_env, SSL_CERT_FILE=str(_another_ca(tmp_path)))
    result = run_cli(*argv, "-v", env=untrusted)  # -v: retries of objects or listings are logged
    assert result.code == 6, result.stderr
    assert "Traceback" not in result.stderr
    assert f"the TLS certificate of {tls_s3.proxy.endpoint}" in result.stderr or (
        f"S3 at {tls_s3.proxy.endpoint} is not trusted" in result.stderr
    ), result.stderr
    assert "hint: if the server uses your own certificate authority, set SSL_CERT_FILE" in result.stderr
    assert "dicom_cloud.retry" not in result.stderr, result.stderr  # nothing asked again
    assert not local.exists() or command == "upload"


def test_the_reader_and_the_resumable_uploads_refuse_it_too(
    tls_s3: TLSEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI meets an untrusted certificate in obstore's requests first (the destination check):
    the ranged reader (http.client) and the resumable uploads (requests) are asked directly."""
    for name, value in tls_s3.server_env.items():
        monkeypatch.setenv(name, value)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)  # with a proxy the reader steps aside
    monkeypatch.setenv("SSL_CERT_FILE", str(_another_ca(tmp_path)))
    store = open_store(tls_s3.root + "/", StoreConfig())
    reader, uploads = store.range_reader(), store.resumable_uploads()
    assert reader is not None and uploads is not None
    with pytest.raises(UntrustedCertificateError, match="not trusted") as read_error:
        asyncio.run(reader.read("any.bin", 0, 10, lambda offset, chunk: None))
    with pytest.raises(UntrustedCertificateError, match="not trusted") as begin_error:
        asyncio.run(uploads.begin("any.bin", 10 * MiB, 5 * MiB, PutOptions()))
    assert not read_error.value.retryable and not begin_error.value.retryable
    asyncio.run(uploads.close())
    asyncio.run(store.close())
