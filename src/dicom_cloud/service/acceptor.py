"""Least-connections accepting: the workers of ``serve --workers N`` share one listening socket, and a
worker takes a waiting connection only while no other worker holds fewer open connections.

Why not the kernel's spread: with ``SO_REUSEPORT`` (a socket per worker) the kernel picks a worker
by a hash of the connection's addresses, and a client's few keep-alive connections often hash alike
(four connections on two workers landed 4:0 in every start of one day's benchmark, leaving one
worker idle through a whole STOW-RS). With one socket accepted by whoever wakes first (uvicorn's
own workers), one worker takes a whole burst. Here every worker is woken for a waiting connection
(level-triggered), accepts at most one per wake-up, and declines while another has fewer: four
connections on two workers land 2:2, as nginx's ``least_conn`` and Node's cluster round-robin spread
them.

The counts live in memory shared by the workers (:class:`ConnectionCounts`); each worker writes only
its own slot, so no lock is needed, and a count read a moment stale costs one more deferral at most.
A worker that declined :data:`MAX_DECLINES` times in a row accepts anyway: a worker busy with a long
computation must not leave a connection waiting.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import select
import socket
from collections.abc import Callable, MutableSequence, Sequence
from typing import Any

import uvicorn

log = logging.getLogger("dicom_cloud.service")

#: Seconds a worker waits before looking again at a connection it left to a less loaded worker.
DEFER = 0.005
#: Deferrals in a row after which a worker accepts whatever the counts say.
MAX_DECLINES = 10
#: Seconds before accepting again after the process ran out of descriptors (EMFILE): asyncio's own.
ACCEPT_RETRY_DELAY = 1.0

#: Open connections per worker, one slot each, in memory shared by the worker processes.
ConnectionCounts = MutableSequence[int]
#: The count of a worker that is not accepting (starting, stopping or dead): never the least.
NOT_ACCEPTING = 2**62


def shared_counts(context: Any, workers: int) -> ConnectionCounts:
    """Slots for ``workers`` workers, handed to each worker process as an argument; each says
    :data:`NOT_ACCEPTING` until its worker's acceptor starts, so that no worker waits for one
    still starting."""
    counts: ConnectionCounts = context.RawArray(ctypes.c_long, workers)
    counts[:] = [NOT_ACCEPTING] * workers
    return counts


def should_accept(counts: Sequence[int], me: int, declined: int) -> bool:
    """Whether worker ``me`` takes the next waiting connection: no other worker holds fewer, or it
    has left the connection to others long enough."""
    return counts[me] <= min(counts) or declined >= MAX_DECLINES


class LeastConnectionsAcceptor:
    """Accepts on a listening socket shared with other processes, one connection per wake-up, and
    hands each to a protocol made by ``protocol_factory`` on this event loop; the protocol calls
    :meth:`connection_closed` when its connection ends. Has the ``close``/``wait_closed`` of an
    asyncio server, which is how uvicorn stops listening at shutdown."""

    def __init__(
        self,
        sock: socket.socket,
        counts: ConnectionCounts,
        me: int,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
    ) -> None:
        self._sock = sock
        self._counts = counts
        self._me = me
        self._factory = protocol_factory
        self._loop = asyncio.get_running_loop()
        self._open = 0  # accepted and not yet closed: what this worker's slot says, always
        self._declined = 0
        self._listening = False
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        sock.setblocking(False)
        counts[me] = 0

    def start(self) -> None:
        if not self._closed and not self._listening:
            self._loop.add_reader(self._sock.fileno(), self._ready)
            self._listening = True

    def connection_closed(self) -> None:
        self._open -= 1
        if not self._closed:
            self._counts[self._me] = self._open

    def _pause(self, seconds: float) -> None:
        if self._listening:
            self._loop.remove_reader(self._sock.fileno())
            self._listening = False
        self._retry = self._loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        # Declines count for one waiting connection: none waiting now (another worker took it)
        # starts the count again for the next.
        waiting = select.poll()  # not select(): descriptors above 1024 are fine
        waiting.register(self._sock.fileno(), select.POLLIN)
        if not waiting.poll(0):
            self._declined = 0
        self.start()

    def _ready(self) -> None:
        if not should_accept(self._counts, self._me, self._declined):
            self._declined += 1
            self._pause(DEFER)
            return
        self._declined = 0
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it, or the client gave up
        except OSError as exc:  # out of descriptors or buffers: stop accepting for a while
            log.warning("accept.failed", extra={"error": exc.strerror or type(exc).__name__})
            self._pause(ACCEPT_RETRY_DELAY)
            return
        self._open += 1
        self._counts[self._me] = self._open
        conn.setblocking(False)
        # Small answers go out at once, not after the client's delayed ACK (40 ms).
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._loop.create_task(self._hand_over(conn))

    async def _hand_over(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except Exception as exc:  # the client went away before its transport was made
            log.debug("accept.handover_failed", extra={"error": type(exc).__name__})
            conn.close()
            self.connection_closed()  # no protocol was made to tell it

    def close(self) -> None:
        self._closed = True
        self._counts[self._me] = NOT_ACCEPTING  # the others stop leaving connections to this one
        if self._retry is not None:
            self._retry.cancel()
        if self._listening:
            self._loop.remove_reader(self._sock.fileno())
            self._listening = False

    async def wait_closed(self) -> None:
        return None


def counted(protocol_class: type[asyncio.Protocol], closed: Callable[[], None]) -> type[asyncio.Protocol]:
    """``protocol_class`` that also tells ``closed`` when its connection ends."""

    class Counted(protocol_class):  # type: ignore[misc,valid-type]
        def connection_lost(self, exc: Exception | None) -> None:
            try:
                super().connection_lost(exc)
            finally:
                closed()

    return Counted


class BalancedServer(uvicorn.Server):
    """A uvicorn server whose connections come from a :class:`LeastConnectionsAcceptor` on a
    shared socket instead of a listener of its own."""

    def __init__(
        self, config: uvicorn.Config, sock: socket.socket, counts: ConnectionCounts, me: int
    ) -> None:
        super().__init__(config)
        self._shared_socket = sock
        self._counts = counts
        self._me = me

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the app's lifespan; no listener of uvicorn's own
        if self.should_exit:
            return
        config, state = self.config, self.server_state
        acceptor: LeastConnectionsAcceptor | None = None

        def closed() -> None:
            assert acceptor is not None
            acceptor.connection_closed()

        protocol_class = counted(config.http_protocol_class, closed)

        def protocol() -> asyncio.BaseProtocol:
            return protocol_class(  # type: ignore[call-arg]
                config=config, server_state=state, app_state=self.lifespan.state
            )

        acceptor = LeastConnectionsAcceptor(self._shared_socket, self._counts, self._me, protocol)
        acceptor.start()
        self.servers = [acceptor]  # type: ignore[list-item]  # closed by uvicorn's shutdown
