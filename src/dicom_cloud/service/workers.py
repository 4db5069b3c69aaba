"""The worker processes of ``dicom-cloud serve --workers N``.

Each worker is a uvicorn server in its own process (its own interpreter and GIL). The parent binds
one listening socket and hands it to every worker; the workers take connections from it least
connections first (:mod:`.acceptor`), so a client's few keep-alive connections spread over the
workers instead of landing on one.

The parent only supervises: it starts the workers, restarts one that dies, and on SIGTERM or
SIGINT stops them all. Settings reach the workers through :data:`~.app.SETTINGS_ENV`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import uvicorn

from ..errors import UsageError
from .acceptor import NOT_ACCEPTING, BalancedServer, ConnectionCounts, shared_counts

log = logging.getLogger("dicom_cloud.service")

#: Exit code of a worker whose app did not start (uvicorn's own): the supervisor gives up.
STARTUP_FAILURE = 3
#: Seconds a worker is given to stop before it is killed.
STOP_TIMEOUT = 30.0
#: Connections the kernel holds for the workers to accept.
BACKLOG = 2048


def balanced_workers_supported() -> bool:
    """Whether the workers can share one socket with least-connections accepting (an event loop
    that watches a listening socket: every POSIX system)."""
    return os.name == "posix"


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named, as asyncio's transports expect of TCP; TCP_NODELAY is set on every accepted
    # connection by the acceptor (with Nagle's algorithm on, every small answer waited 40 ms for
    # the client's delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    return sock


def _worker(sock: socket.socket, counts: ConnectionCounts, number: int, options: dict[str, Any]) -> None:
    config = uvicorn.Config("dicom_cloud.service.app:app_from_environment", factory=True, **options)
    server = BalancedServer(config, sock, counts, number)
    server.run(sockets=[])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def run_workers(count: int, host: str, port: int, options: dict[str, Any]) -> int:
    """Run ``count`` workers on ``host:port`` until SIGTERM/SIGINT; the exit code of the service."""
    try:  # a port in use fails here, once, with a clear message
        sock = _listening_socket(host, port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    context = multiprocessing.get_context("spawn")
    counts = shared_counts(context, count)
    stopping = False

    def start(number: int) -> BaseProcess:
        process = context.Process(
            target=_worker, args=(sock, counts, number, options), name=f"worker-{number}"
        )
        process.start()
        return process

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    workers = [start(n) for n in range(count)]
    log.info("workers.started", extra={"workers": count, "pids": [w.pid for w in workers]})
    code = 0
    try:
        while not stopping:
            time.sleep(0.5)
            for number, process in enumerate(workers):
                if process.is_alive() or stopping:
                    continue
                if process.exitcode == STARTUP_FAILURE:
                    log.error("workers.startup_failed", extra={"worker": number})
                    stopping, code = True, 1
                    break
                counts[number] = NOT_ACCEPTING  # until the new worker accepts
                log.warning("workers.restarted", extra={"worker": number, "exit_code": process.exitcode})
                workers[number] = start(number)
    finally:
        for process in workers:
            if process.is_alive() and process.pid is not None:
                process.terminate()  # SIGTERM: uvicorn finishes the requests under way
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return code
