"""The DIMSE listener: a pynetdicom application entity on a TCP port (TLS optional), the gate that
accepts or refuses each association, and the bridge from pynetdicom's threads to our event loop.

pynetdicom runs every association in a thread of its own and calls handlers synchronously there;
the archive and the stores are asyncio. Handlers therefore hand their coroutines to the one event
loop the face was started from (:meth:`Listener.call`) and wait for the result in their thread:
the loop never blocks on the network, and an association never blocks another.

The gate runs when an A-ASSOCIATE-RQ arrives, before any presentation context is negotiated:

- a called AE title we do not answer to: rejected (permanent, "called AE title not recognised");
- a calling AE title that is no configured peer, or a peer calling from another address:
  rejected (permanent, "calling AE title not recognised"), and logged with the address;
- development with no peer configured: any calling AE on the loopback address is accepted (logged
  once per association), so that ``echoscu`` and ``storescu`` work out of the box;
- more than ``max_associations`` open: rejected (transient, local limit exceeded) by pynetdicom.

Accepted sockets are tuned for DIMSE's request/response rhythm: TCP_NODELAY (a C-STORE response
is a small segment; without it Nagle's algorithm holds it back until the peer's delayed ACK, some
40 ms per instance on Linux), and a PDU is read whole, its 6-byte header then its body in one
``recv_into`` loop (pynetdicom reads it 4 KiB at a time, a bytearray extended per piece).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import weakref
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from ..errors import UsageError
from .config import DimseSettings, Operation, Peer, is_loopback

T = TypeVar("T")
log = logging.getLogger("dicom_cloud.dimse")

# pynetdicom logs request identifiers (patient names, IDs) at INFO by default: never.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
# Storage SOP classes pynetdicom does not list (private, newer) are accepted like the others.
_config.UNRESTRICTED_STORAGE_SERVICE = True
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

#: The status of an operation the peer is not configured for (PS3.7 C.5: Refused: Not Authorized).
NOT_AUTHORIZED = 0x0124
_VERIFICATION = "1.2.840.10008.1.1"
#: Patient Root and Study Root Query/Retrieve Information Models: FIND, MOVE, GET (PS3.4 C.6).
_QUERY_RETRIEVE = tuple(f"1.2.840.10008.5.1.4.1.2.{root}.{op}" for root in (1, 2) for op in (1, 2, 3))


@dataclass(frozen=True)
class Caller:
    """Who is on the other end of an association, as the gate established it."""

    ae_title: str
    address: str
    peer: Peer | None
    tenant: str

    def allows(self, operation: Operation) -> bool:
        return self.peer is None or self.peer.allows(operation)


Handler = Callable[[Any], Any]


#: The most a read allocates before its bytes arrive: a PDU header may claim up to 4 GiB, from a
#: peer not yet authenticated, so larger PDUs are read in pieces of this size as they come.
READ_PIECE_BYTES = 1 << 20


class WholePduSocket(AssociationSocket):
    """pynetdicom's socket, reading what is asked for in as few ``recv_into`` calls as the kernel
    allows (a PDU body at once, up to :data:`READ_PIECE_BYTES`) instead of 4 KiB pieces appended
    one by one."""

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes <= READ_PIECE_BYTES:
            return self._recv_piece(nr_bytes)
        received = bytearray()
        while len(received) < nr_bytes:
            wanted = min(READ_PIECE_BYTES, nr_bytes - len(received))
            piece = self._recv_piece(wanted)
            received += piece
            if len(piece) < wanted:  # closed by the peer
                break
        return received

    def _recv_piece(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        read = 0
        while read < nr_bytes:
            got = sock.recv_into(view[read:], nr_bytes - read)
            if not got:  # closed by the peer: what came, as pynetdicom's own recv returns it
                del view
                del buffer[read:]
                return buffer
            read += got
        return buffer


class TunedRequestHandler(RequestHandler):
    """pynetdicom's handler of an accepted connection, with TCP_NODELAY and :class:`WholePduSocket`."""

    def _create_association(self) -> Association:
        request = self.request
        assert isinstance(request, socket.socket)
        if request.family in (socket.AF_INET, socket.AF_INET6):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assoc = super()._create_association()
        # The subclass adds no state: retyping the wrapper pynetdicom made (rather than making a
        # second one) keeps its state and the one "connection open" event it queued.
        assoc.dul.socket.__class__ = WholePduSocket
        return assoc


class Listener:
    """One AE listening on ``settings.host:port``; handlers by pynetdicom event."""

    def __init__(
        self, settings: DimseSettings, *, query_retrieve: bool, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.settings = settings
        self._loop = loop
        self._handlers: dict[Any, Handler] = {evt.EVT_C_ECHO: self._echo}
        self._callers: weakref.WeakKeyDictionary[Association, Caller] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_associations = settings.max_associations
        ae.maximum_pdu_size = settings.max_pdu
        ae.network_timeout = settings.idle_timeout
        ae.acse_timeout = 30
        ae.dimse_timeout = settings.idle_timeout
        ae.add_supported_context(_VERIFICATION)
        for context in AllStoragePresentationContexts:
            # Both roles: a C-GET requestor asks us to act as the storage SCU on its association.
            ae.add_supported_context(
                str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
            )
        if query_retrieve:
            for sop_class in _QUERY_RETRIEVE:
                ae.add_supported_context(sop_class)
            # C-MOVE sub-operations: contexts are proposed per move (see retrieve.py).
        self.ae = ae

    def on(self, event: Any, handler: Handler) -> None:
        """Handle a pynetdicom intervention event (EVT_C_STORE...); before :meth:`start`."""
        self._handlers[event] = handler

    def _echo(self, event: Any) -> int:
        return 0x0000 if self.caller(event).allows("echo") else NOT_AUTHORIZED

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> int:
        """Listen; returns the port (useful with port 0)."""
        handlers: list[Any] = [(evt.EVT_REQUESTED, self._gate), *self._handlers.items()]
        try:
            server = self.ae.make_server(
                (self.settings.host, self.settings.port),
                evt_handlers=handlers,
                ssl_context=self._ssl_context(),
                server_class=ThreadedAssociationServer,
                request_handler=TunedRequestHandler,
            )
        except OSError as exc:
            raise UsageError(
                f"cannot listen for DICOM on {self.settings.host}:{self.settings.port}: {exc.strerror}",
                hint="choose another --dicom-port, or stop what listens there",
            ) from None
        # What AE.start_server(block=False) does, with our request handler.
        self.ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name="dicom-cloud-dimse-accept", daemon=True).start()
        self._server = server
        port = int(server.server_address[1])
        log.info(
            "DICOM listening",
            extra={"ae_title": self.settings.ae_title, "port": port, "tls": bool(self.settings.tls_cert)},
        )
        return port

    def stop(self) -> None:
        """Stop listening and abort the associations still open (their unfinished C-STOREs were
        never acknowledged, so the peers send them again)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
        self.ae.shutdown()

    def _ssl_context(self) -> ssl.SSLContext | None:
        settings = self.settings
        if not settings.tls_cert or not settings.tls_key:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
            if settings.tls_ca:
                context.load_verify_locations(settings.tls_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load the DICOM TLS certificate, key or CA: {exc}") from None
        return context

    # -- the gate ----------------------------------------------------------------------

    def _gate(self, event: Any) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        address = str(assoc.requestor.address)
        settings = self.settings
        if not settings.answers_to(called):
            log.warning(
                "DICOM association refused: called AE title unknown",
                extra={"calling_ae": calling, "called_ae": called, "address": address},
            )
            self._reject(assoc, 0x07)
            return
        peer = settings.peer(calling)
        if peer is None:
            if not (settings.open_to_loopback and is_loopback(address)):
                log.warning(
                    "DICOM association refused: calling AE title not configured",
                    extra={"calling_ae": calling, "address": address},
                )
                self._reject(assoc, 0x03)
                return
            log.info(
                "DICOM association accepted from loopback with no peer configured (development)",
                extra={"calling_ae": calling, "address": address},
            )
        elif address not in peer.addresses and not (
            is_loopback(address) and any(is_loopback(a) for a in peer.addresses)
        ):
            log.warning(
                "DICOM association refused: peer calls from an address not configured",
                extra={"calling_ae": calling, "address": address},
            )
            self._reject(assoc, 0x03)
            return
        caller = Caller(calling, address, peer, settings.tenant_for(peer, called))
        with self._lock:
            self._callers[assoc] = caller

    @staticmethod
    def _reject(assoc: Any, diagnostic: int) -> None:
        assoc.acse.send_reject(0x01, 0x01, diagnostic)  # rejected-permanent, by the service user
        assoc.kill()

    def caller(self, event: Any) -> Caller:
        with self._lock:
            return self._callers[event.assoc]

    # -- the bridge --------------------------------------------------------------------

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the face's event loop and wait for it in this (pynetdicom) thread."""
        return self.submit(coro).result()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)
