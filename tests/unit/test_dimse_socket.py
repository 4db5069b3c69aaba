"""The DIMSE face's socket reads: whole pieces, and no allocation for bytes a peer only claims."""

from __future__ import annotations

import socket
import threading
import tracemalloc

from dicom_cloud.dimse.scp import READ_PIECE_BYTES, WholePduSocket


def _reader(sock: socket.socket) -> WholePduSocket:
    # The read path needs the wrapped socket alone; the association it normally serves is not used.
    reader = WholePduSocket.__new__(WholePduSocket)
    reader.socket = sock
    return reader


def test_a_pdu_is_read_whole_across_pieces() -> None:
    ours, peer = socket.socketpair()
    payload = bytes(range(256)) * (3 * READ_PIECE_BYTES // 256 + 7)
    sender = threading.Thread(target=peer.sendall, args=(payload,))
    sender.start()
    try:
        assert bytes(_reader(ours).recv(len(payload))) == payload
    finally:
        sender.join()
        ours.close()
        peer.close()


def test_a_claimed_length_allocates_nothing_until_bytes_arrive() -> None:
    """A PDU header from a peer not yet authenticated may claim 4 GiB: the read keeps only what came."""
    ours, peer = socket.socketpair()
    peer.sendall(b"0123456789")
    peer.close()
    tracemalloc.start()
    try:
        received = _reader(ours).recv(0xFFFFFFF0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        ours.close()
    assert bytes(received) == b"0123456789"
    assert peak < 4 * READ_PIECE_BYTES
