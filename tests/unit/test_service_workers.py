"""serve --workers: the one listening socket the workers share, and how they take connections from it
least connections first."""

from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing
import socket

import pytest

from dicom_cloud.cli.serve import server_stack
from dicom_cloud.errors import UsageError
from dicom_cloud.service.acceptor import (
    MAX_DECLINES,
    NOT_ACCEPTING,
    LeastConnectionsAcceptor,
    counted,
    shared_counts,
    should_accept,
)
from dicom_cloud.service.workers import _listening_socket, balanced_workers_supported, run_workers

pytestmark = pytest.mark.skipif(not balanced_workers_supported(), reason="balanced workers are POSIX only")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_connections_accepted_by_a_worker_do_not_wait_for_nagle(loop: str) -> None:
    """Small answers go out at once (TCP_NODELAY): without it, each waited 40 ms for a delayed ACK."""

    async def accepted_nodelay() -> int:
        sock = _listening_socket("127.0.0.1", 0)
        seen: list[int] = []

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                seen.append(
                    transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                )

        acceptor = LeastConnectionsAcceptor(sock, [0], 0, Probe)
        acceptor.start()
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        while not seen:
            await asyncio.sleep(0.01)
        writer.close()
        acceptor.close()
        sock.close()
        return seen[0]

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        assert uvloop.run(accepted_nodelay()) != 0
    else:
        assert asyncio.run(accepted_nodelay()) != 0


def test_a_worker_accepts_while_no_other_holds_fewer_connections() -> None:
    assert should_accept([0, 0], 0, declined=0)
    assert should_accept([1, 2], 0, declined=0)
    assert should_accept([2, 2, 2], 2, declined=0)
    assert not should_accept([2, 1], 0, declined=0)
    assert not should_accept([3, 1, 2], 0, declined=MAX_DECLINES - 1)
    # The less loaded worker is too busy to take it: after enough deferrals, anyone accepts.
    assert should_accept([3, 1, 2], 0, declined=MAX_DECLINES)
    # A worker still starting, stopping or dead is never waited for.
    assert should_accept([7, NOT_ACCEPTING], 0, declined=0)
    assert list(shared_counts(multiprocessing.get_context("spawn"), 3)) == [NOT_ACCEPTING] * 3


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_keep_alive_connections_spread_evenly_and_closes_are_counted(loop: str) -> None:
    """Two acceptors on one shared socket (two workers): four connections opened at once land 2:2,
    where the kernel's address hash put them 4:0; a closed connection leaves its worker's count."""

    async def spread() -> tuple[list[int], list[int]]:
        sock = _listening_socket("127.0.0.1", 0)
        counts = [0, 0]
        acceptors: list[LeastConnectionsAcceptor] = []
        served: list[list[asyncio.BaseTransport]] = [[], []]

        def worker(me: int) -> LeastConnectionsAcceptor:
            class Held(asyncio.Protocol):
                def connection_made(self, transport: asyncio.BaseTransport) -> None:
                    served[me].append(transport)

            protocol = counted(Held, lambda: acceptors[me].connection_closed())
            return LeastConnectionsAcceptor(sock.dup() if me else sock, counts, me, protocol)

        acceptors.extend(worker(me) for me in range(2))
        for acceptor in acceptors:
            acceptor.start()
        address = sock.getsockname()[:2]
        writers = [(await asyncio.open_connection(*address))[1] for _ in range(4)]
        for _ in range(200):
            if sum(map(len, served)) == 4:
                break
            await asyncio.sleep(0.01)
        held = [len(s) for s in served]
        writers[0].close()
        await writers[0].wait_closed()
        for _ in range(200):
            if sum(counts) == 3:
                break
            await asyncio.sleep(0.01)
        after_close = list(counts)
        for writer in writers[1:]:
            writer.close()
        for acceptor in acceptors:
            acceptor.close()
        sock.close()
        assert counts == [NOT_ACCEPTING, NOT_ACCEPTING]  # stopped workers are not waited for
        return held, after_close

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        held, after_close = uvloop.run(spread())
    else:
        held, after_close = asyncio.run(spread())
    assert held == [2, 2]
    assert sorted(after_close) == [1, 2]


def test_serve_runs_on_the_c_stack_when_installed_and_falls_back_without(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected_http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    expected_loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    assert server_stack() == {"http": expected_http, "loop": expected_loop}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert server_stack() == {"http": "h11", "loop": "asyncio"}


def test_a_port_in_use_is_a_usage_error_before_any_worker_starts() -> None:
    taken = _listening_socket("127.0.0.1", 0)
    try:
        with pytest.raises(UsageError, match=r"cannot listen on 127\.0\.0\.1"):
            run_workers(2, "127.0.0.1", taken.getsockname()[1], {})
    finally:
        taken.close()
