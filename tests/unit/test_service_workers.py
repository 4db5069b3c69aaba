"""serve --workers: the listening socket each worker binds."""

from __future__ import annotations

import asyncio
import importlib.util
import socket

import pytest

from dicom_cloud.cli.serve import server_stack
from dicom_cloud.service.workers import _listening_socket, reuse_port_supported

pytestmark = pytest.mark.skipif(not reuse_port_supported(), reason="SO_REUSEPORT workers are Linux only")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_connections_accepted_by_a_worker_do_not_wait_for_nagle(loop: str) -> None:
    """Small answers go out at once (TCP_NODELAY): without it, each waited 40 ms for a delayed ACK."""

    async def accepted_nodelay() -> int:
        sock = _listening_socket("127.0.0.1", 0)
        sock.listen(8)
        seen: list[int] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            while not seen:
                await asyncio.sleep(0.01)
            writer.close()
        return seen[0]

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        assert uvloop.run(accepted_nodelay()) != 0
    else:
        assert asyncio.run(accepted_nodelay()) != 0


def test_serve_runs_on_the_c_stack_when_installed_and_falls_back_without(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected_http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    expected_loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    assert server_stack() == {"http": expected_http, "loop": expected_loop}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert server_stack() == {"http": "h11", "loop": "asyncio"}


def test_two_workers_can_listen_on_one_port() -> None:
    first = _listening_socket("127.0.0.1", 0)
    first.listen(8)
    second = _listening_socket("127.0.0.1", first.getsockname()[1])
    second.listen(8)
    first.close()
    second.close()
