"""Ranged GETs of S3 objects read straight into one reused buffer, from worker threads: the
large-download path (``RangedDownload`` in engine/routes.py).

obstore hands each streamed chunk to Python as a new ``bytes``, zero-filled and then copied from
its own buffers: on a 1 GiB download, memset and memmove were a seventh of the client's CPU (perf),
and the client's CPU is what a download shares with everything else on the machine. Here each
part is read with ``http.client`` into a buffer of its own (``recv_into``: the kernel's copy
only), and the caller checks and writes each chunk from the same thread, the GIL released
throughout. The store offers this where it can sign the requests itself (``open_s3``: keys we
hold, no SSE-C customer key, no proxy in the environment); anywhere else obstore's streams remain.

Each request is signed with SigV4 (sigv4.py) and repeated under the request layer of the retry
policy (retry.py: the same waits and counts as obstore's, Retry-After honoured); a connection lost
part-way continues from the last byte received. Cancelling a read wakes its thread (its socket is
shut down) and waits briefly for it to let go of the caller's sink. Nothing here logs a URL or a
header: they carry signatures.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from ..errors import NetworkError
from ..retry import TRANSIENT_STATUS, RequestRetries, parse_retry_after, status_exhausted
from .http_errors import s3_error
from .sigv4 import S3Bucket
from .tls import untrusted_certificate

#: Bytes read per chunk (one buffer of this size per part being read). Of 256 KiB, 512 KiB, 1 MiB
#: and 2 MiB, 512 KiB gave the fastest 1 GiB download (medians of 8 and 10 alternating runs:
#: 0.86-0.89 s against 0.89-0.93 s): each chunk is checked and written while still in the cache.
CHUNK = 512 * 1024
#: Threads reading at once, for all the downloads of a run: parts beyond wait their turn.
_THREADS = 32
#: Largest error body read to explain a refusal.
_ERROR_BODY = 64 * 1024
#: Seconds a cancelled read waits for its thread to let go (well within the CLI's 2 s to stop).
_LET_GO = 0.5

Sink = Callable[[int, memoryview], None]


class _Interrupted(Exception):
    """The read was cancelled (raised in its thread, never seen by callers)."""


class _Lost(Exception):
    """A failure worth another request: no answer, a cut answer, or a transient status."""

    def __init__(self, reason: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.retry_after = retry_after


class _Interrupt:
    """Stops one blocking read from another thread: ``set`` marks it and shuts its socket down, so
    a read waiting on the network returns at once."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None

    def set(self) -> None:
        with self._lock:
            self._event.set()
            if self._socket is not None:
                _shut(self._socket)

    def check(self) -> None:
        if self._event.is_set():
            raise _Interrupted

    def sleep(self, seconds: float) -> None:
        if self._event.wait(seconds):
            raise _Interrupted

    @contextlib.contextmanager
    def watching(self, sock: socket.socket) -> Iterator[None]:
        with self._lock:
            self._socket = sock
            if self._event.is_set():
                _shut(sock)
        try:
            yield
        finally:
            with self._lock:
                self._socket = None


def _shut(sock: socket.socket) -> None:
    # socket.socket's own shutdown, not SSLSocket's (which also drops its TLS state under a
    # thread that may be inside it): the reader's recv returns, and its TLS layer reports EOF.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class S3RangeReader:
    """Ranged reads of one bucket's objects (the ``RangeReader`` of store.py)."""

    chunk_size = CHUNK

    def __init__(
        self, bucket: S3Bucket, *, retries: RequestRetries, connect_timeout: float, read_timeout: float
    ) -> None:
        self.bucket = bucket.name
        self._target = bucket
        self._endpoint = bucket.endpoint.rstrip("/")
        self._signer = bucket.signer()
        self._retries = retries
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        https = urlsplit(self._endpoint).scheme == "https"
        # The system's trust store, as obstore's client uses (SSL_CERT_FILE/SSL_CERT_DIR honoured).
        self._tls = ssl.create_default_context() if https else None
        self._threads = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="dicom-cloud-ranges")

    async def read(self, key: str, start: int, end: int, sink: Sink) -> None:
        """Bytes ``[start, end)`` of ``key`` handed to ``sink`` in order as ``(offset, chunk)``, from
        a worker thread; a chunk's memory is reused once ``sink`` returns. Cancelled, it stops
        before the next chunk, waiting up to half a second for its thread to let go."""
        interrupt = _Interrupt()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._threads, self.read_blocking, key, start, end, sink, interrupt)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            interrupt.set()
            # Its socket shut down, the thread ends within a chunk. One still connecting (an
            # endpoint that does not answer) is not waited for past _LET_GO: it checks the
            # interrupt before anything else, and the writer it feeds refuses writes once aborted.
            deadline = loop.time() + _LET_GO
            while not future.done() and (left := deadline - loop.time()) > 0:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([future], timeout=left)
            future.add_done_callback(_ignore_outcome)
            raise

    def read_blocking(self, key: str, start: int, end: int, sink: Sink, interrupt: _Interrupt) -> None:
        url = self._target.object_url(key)
        what = f"s3://{self.bucket}/{key}"
        buffer = memoryview(bytearray(min(self.chunk_size, max(end - start, 1))))
        position = start  # what sink has been given: a retry asks for the rest only

        def take(offset: int, chunk: memoryview) -> None:
            nonlocal position
            sink(offset, chunk)
            position = offset + len(chunk)

        retry = 0
        started = time.monotonic()
        while position < end:
            interrupt.check()
            before = position
            try:
                self._attempt(url, what, position, end, buffer, take, interrupt)
            except _Lost as lost:
                interrupt.check()  # a shut-down socket looks like a lost connection
                if position > before:  # what the last request brought is kept: count afresh
                    retry, started = 0, time.monotonic()
                if not self._retries.allows(retry, started):
                    raise _final(lost, what, self._endpoint) from None
                retry += 1
                interrupt.sleep(self._retries.delay(retry, retry_after=lost.retry_after))

    def _attempt(
        self,
        url: str,
        what: str,
        position: int,
        end: int,
        buffer: memoryview,
        sink: Sink,
        interrupt: _Interrupt,
    ) -> None:
        """One GET of ``[position, end)``, each chunk handed to ``sink``; ``_Lost`` when it was cut
        short (what ``sink`` was given is kept)."""
        parts = urlsplit(url)
        connection = (
            http.client.HTTPSConnection(parts.netloc, timeout=self._connect_timeout, context=self._tls)
            if self._tls is not None
            else http.client.HTTPConnection(parts.netloc, timeout=self._connect_timeout)
        )
        try:
            headers = {"Range": f"bytes={position}-{end - 1}", "User-Agent": "dicom-cloud"}
            signed = self._signer.sign("GET", url, headers=headers)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            try:
                connection.connect()
            except ssl.SSLCertVerificationError as exc:
                raise untrusted_certificate(self._endpoint, exc.verify_message) from None
            except OSError as exc:
                raise _Lost(type(exc).__name__) from None
            assert connection.sock is not None
            with interrupt.watching(connection.sock):
                connection.sock.settimeout(self._read_timeout)
                try:
                    connection.request("GET", path, headers=signed.headers)
                    response = connection.getresponse()
                except (OSError, http.client.HTTPException) as exc:
                    raise _Lost(type(exc).__name__) from None
                self._check_answer(response, what, position, end)
                while position < end:
                    interrupt.check()
                    try:
                        count = response.readinto(buffer[: end - position])
                    except (OSError, http.client.HTTPException) as exc:
                        raise _Lost(type(exc).__name__) from None
                    if not count:
                        raise _Lost("the answer ended early")
                    sink(position, buffer[:count])
                    position += count
        finally:
            connection.close()

    def _check_answer(self, response: http.client.HTTPResponse, what: str, start: int, end: int) -> None:
        status = response.status
        if status == 206:
            answered = response.getheader("Content-Range", "")
            if response.length != end - start or not answered.startswith(f"bytes {start}-{end - 1}/"):
                raise _Lost(f"an answer for another range ({answered or 'none'})")
            return
        try:
            body = response.read(_ERROR_BODY)
        except (OSError, http.client.HTTPException):
            body = b""
        if status in TRANSIENT_STATUS:
            retry_after = parse_retry_after(response.getheader("Retry-After"))
            raise _Lost(f"HTTP {status}", status=status, retry_after=retry_after)
        if 200 <= status < 300:  # a server that ignored the Range header
            raise NetworkError(f"S3 at {self._endpoint} answered HTTP {status} to a ranged read of {what}")
        raise s3_error(status, body, what, self.bucket)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


def _ignore_outcome(future: asyncio.Future[None]) -> None:
    """An interrupted read's error means nothing: retrieved, so that it is not reported."""
    if not future.cancelled():
        future.exception()


def _final(lost: _Lost, what: str, endpoint: str) -> NetworkError:
    """The error of a read whose retries are used up."""
    if lost.status is not None:
        message = f"S3 at {endpoint} answered HTTP {lost.status} reading {what}"
        return status_exhausted(message, lost.status, lost.retry_after)
    return NetworkError(f"cannot read {what} from S3 at {endpoint}: {lost}")
