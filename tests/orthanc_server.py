"""A real Orthanc (``/usr/sbin/Orthanc CONFIG.json``) on free loopback ports, for tests and benchmarks.

    orthanc = start_orthanc(workdir, configuration)   # HTTP and DICOM ports are chosen here
    orthanc.post("/instances", dicom_bytes)
    orthanc.stop()

The configuration gets ``MaximumStorageCacheSize: 0`` (otherwise reads are served from Orthanc's cache
and never reach the storage area), loopback-only access without authentication, and its ports.
Orthanc comes from Debian (``apt-get install orthanc orthanc-python orthanc-dicomweb``, done by
``scripts/install-test-servers``). Standard library only, like ``servers.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servers import _Proc, _request, _wait_until, free_ports

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
PLUGINS_DIR = Path("/usr/share/orthanc/plugins")
INSTALL_HINT = (
    "run scripts/install-test-servers as root (it installs orthanc, orthanc-python, orthanc-dicomweb)"
)


class OrthancError(RuntimeError):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status
        self.body = body


@dataclass
class OrthancServer:
    url: str  # "http://127.0.0.1:PORT"
    http_port: int
    dicom_port: int
    config_path: Path
    _proc: _Proc | None = field(default=None, repr=False)

    def request(self, method: str, path: str, body: bytes = b"", timeout: float = 60.0) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/octet-stream"} if body else {}
        return _request(method, self.url + path, headers, body, timeout=timeout)

    def _ok(self, method: str, path: str, body: bytes = b"") -> bytes:
        status, answer = self.request(method, path, body)
        if status != 200:
            raise OrthancError(status, answer)
        return answer

    def get(self, path: str) -> bytes:
        return self._ok("GET", path)

    def get_json(self, path: str) -> Any:
        return json.loads(self._ok("GET", path))

    def post(self, path: str, body: bytes | str = b"") -> Any:
        data = body.encode() if isinstance(body, str) else body
        return json.loads(self._ok("POST", path, data) or b"null")

    def delete(self, path: str) -> None:
        self._ok("DELETE", path)

    def log_tail(self, lines: int = 40) -> str:
        return self._proc.log_tail(lines) if self._proc else ""

    def alive(self) -> bool:
        return self._proc is not None and self._proc.alive()

    @property
    def pid(self) -> int | None:
        """The Orthanc process (for its CPU time, read from /proc by the benchmarks)."""
        return self._proc.popen.pid if self._proc is not None else None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop(graceful=True, timeout=10)


def orthanc_installed() -> bool:
    return ORTHANC_BIN.exists() and (PLUGINS_DIR / "libOrthancPython.so").exists()


def start_orthanc(
    workdir: Path, configuration: dict[str, Any], *, env: dict[str, str] | None = None, wait: bool = True
) -> OrthancServer:
    """Start Orthanc with ``configuration`` (ports, cache and access settings are filled in here).

    Provider variables of the test process (``AWS_*``, ``AZURE_*``, ``GOOGLE_*``, ``STORAGE_EMULATOR_HOST``)
    are blanked for Orthanc, so that only its configuration and ``env`` speak to the plugin.
    """
    if not orthanc_installed():
        raise RuntimeError(f"Orthanc is not installed ({ORTHANC_BIN}): {INSTALL_HINT}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_ports(2)
    config = dict(configuration)
    config.update(
        HttpPort=http_port,
        DicomPort=dicom_port,
        MaximumStorageCacheSize=0,
        RemoteAccessAllowed=False,
        AuthenticationEnabled=False,
        HttpTimeout=120,
    )
    config.setdefault("StorageDirectory", str(workdir / "storage"))
    config.setdefault("IndexDirectory", config["StorageDirectory"])
    if "DicomWeb" in config:
        config["DicomWeb"] = {**config["DicomWeb"], "Host": f"127.0.0.1:{http_port}"}
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    full_env = {k: "" for k in os.environ if k.startswith(("AWS_", "AZURE_", "GOOGLE_", "STORAGE_EMULATOR"))}
    full_env.pop("AWS_CA_BUNDLE", None)
    full_env.update(PYTHONDONTWRITEBYTECODE="1", **(env or {}))
    proc = _Proc("orthanc", [str(ORTHANC_BIN), str(config_path)], workdir, env=full_env)
    server = OrthancServer(f"http://127.0.0.1:{http_port}", http_port, dicom_port, config_path, proc)
    if wait:
        _wait_until(proc, lambda: server.request("GET", "/system", timeout=2)[0] == 200, what="did not start")
    return server


def wait_exit(server: OrthancServer, timeout: float = 30.0) -> int:
    """Wait for an Orthanc that should refuse to start; its exit code."""
    assert server._proc is not None
    code = server._proc.popen.wait(timeout)
    server._proc.stop(graceful=False)
    return code
