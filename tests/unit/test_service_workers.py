"""serve --workers: the listening socket each worker binds."""

from __future__ import annotations

import asyncio
import socket

import pytest

from dicom_cloud.service.workers import _listening_socket, reuse_port_supported

pytestmark = pytest.mark.skipif(not reuse_port_supported(), reason="SO_REUSEPORT workers are Linux only")


def test_connections_accepted_by_a_worker_do_not_wait_for_nagle() -> None:
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

    assert asyncio.run(accepted_nodelay()) != 0


def test_two_workers_can_listen_on_one_port() -> None:
    first = _listening_socket("127.0.0.1", 0)
    first.listen(8)
    second = _listening_socket("127.0.0.1", first.getsockname()[1])
    second.listen(8)
    first.close()
    second.close()
