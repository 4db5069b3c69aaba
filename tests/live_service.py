"""The DICOMweb service under a real uvicorn on a free loopback port, in a thread (tests, bench).

    service = start_service(settings)      # opens the archive named by the settings
    service.url, service.admin_token       # the token exists when the index had none
    service.stop()

Or as its own process, as deployed: ``start_service_process(workdir)`` (``dicom-cloud serve``).

Also: a fresh PostgreSQL database per run on the project's test server (127.0.0.1:5432, trust auth).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from dicom_cloud.service.app import create_app
from dicom_cloud.service.settings import ServiceSettings

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
START_TIMEOUT = 60.0


@dataclass
class LiveService:
    url: str
    admin_token: str | None
    _server: uvicorn.Server = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_service(settings: ServiceSettings) -> LiveService:
    """Start on a free port; ``public_url`` is set to it unless given (dicomweb-client sends a Host
    header without the port, so links built from the request would lack it)."""
    port = free_port()
    if settings.public_url is None:
        settings = settings.model_copy(update={"public_url": f"http://127.0.0.1:{port}"})
    tokens: list[str] = []
    app = create_app(settings, announce_token=tokens.append)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the service stopped while starting (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the service did not start in time")
        time.sleep(0.02)
    return LiveService(f"http://127.0.0.1:{port}", tokens[0] if tokens else None, server, thread)


@contextlib.contextmanager
def fresh_postgres_database():  # type: ignore[no-untyped-def]
    """Yields the URL of a new, empty database; drops it afterwards."""
    import psycopg

    name = f"dicom_cloud_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class ServiceProcess:
    """``dicom-cloud serve`` as its own process (its own interpreter and GIL, as deployed)."""

    url: str
    token: str
    pid: int
    _proc: Any = field(repr=False)

    def log_tail(self, lines: int = 40) -> str:
        text: str = self._proc.log_tail(lines)
        return text

    def stop(self) -> None:
        self._proc.stop(graceful=True, timeout=10)


def start_service_process(
    workdir: Path,
    *,
    extra_args: tuple[str, ...] = (),
    setting_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> ServiceProcess:
    """Start ``dicom-cloud serve --data-dir WORKDIR/data`` on a free port, with an admin token made
    beforehand by ``dicom-cloud token create`` (so nothing is read from the server's output).
    ``setting_args`` (``--storage``, ``--database``...) go to both commands, ``extra_args`` to serve."""
    from servers import _Proc, _request, _wait_until

    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    cli = str(Path(sys.executable).with_name("dicom-cloud"))
    data = ["--data-dir", str(data_dir), *setting_args]
    created = subprocess.run(
        [
            cli,
            "token",
            "create",
            "--tenant",
            "default",
            "--scopes",
            "admin",
            "--name",
            "bench",
            "--json",
            *data,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    token = str(json.loads(created.stdout)["token"])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [cli, "serve", *data, "--port", str(port), "--public-url", url]
    proc = _Proc("dicom-cloud-serve", [*argv, "--log-level", "warning", *extra_args], workdir, env)
    _wait_until(proc, lambda: _request("GET", url + "/healthz", timeout=2)[0] == 200, what="did not start")
    return ServiceProcess(url, token, proc.popen.pid, proc)


def worker_pids(pid: int) -> list[int]:
    """The worker processes ``dicom-cloud serve --workers N`` (process ``pid``) started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found
