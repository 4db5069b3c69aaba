"""How a command's coroutine runs, and how it stops on SIGINT (Ctrl-C) or SIGTERM.

The first signal cancels the command's task: the engine stops its workers, removes partial files
and closes the job's journal (which releases the job's lock) on its way out. Whatever is still
running after that (tasks nobody awaits, threads hashing a file or reading a listing, requests in
obstore's runtime) is not waited for: the CLI leaves through ``os._exit`` (see ``main.run``), so
the command ends within ``GRACE`` seconds whatever is in flight. If the cancellation itself has not
finished by then, or a second signal arrives, the process leaves at once: the journal is SQLite
in WAL mode, as consistent after that as after ``kill -9`` (what was not yet committed is
transferred again, never skipped wrongly), and the kernel releases the lock with the process.

``asyncio.run`` is not used for this because its shutdown waits without a bound: it cancels every
remaining task and waits for all of them, then joins the default executor's threads.

The loop is uvloop's where it is installed (a dependency everywhere but Windows): every object of a
transfer crosses threads several times (obstore's runtime completes its futures from its own
threads, hashing and file writes run in worker threads), and uvloop's wake-ups across threads cost
less system CPU than asyncio's self-pipe. A 400-object study download spent 0.45 system CPU-seconds
against 0.54 and took 0.76 s against 0.82 (docs/benchmarks.md, 2026-12-04). The C allocator keeps
the transfer's large buffers for reuse (``allocator.keep_freed_buffers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from ..allocator import keep_freed_buffers
from ..errors import EXIT_INTERRUPTED, EXIT_TERMINATED

T = TypeVar("T")

#: Seconds a command has, after the first signal, to stop cleanly before the process leaves anyway.
GRACE = 1.5
#: Seconds given to tasks left behind by the command to end once cancelled.
_LEFTOVER_WAIT = 0.3

_EXIT_CODES = {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGTERM: EXIT_TERMINATED}


class Stopped(KeyboardInterrupt):
    """The command was stopped by a signal; ``exit_code`` is 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = _EXIT_CODES.get(signal.Signals(signum), 128 + signum)

    @property
    def verb(self) -> str:
        return "interrupted" if self.signum == signal.SIGINT else "terminated"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end; on SIGINT/SIGTERM cancel it and raise ``Stopped``."""
    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(coro)  # signals reach the main thread only
    keep_freed_buffers()
    loop = new_event_loop()
    task = loop.create_task(coro)
    received: list[int] = []
    watchdogs: list[threading.Timer] = []

    def on_signal(signum: int) -> None:
        if received:  # a second signal: no more waiting
            leave_now(_EXIT_CODES.get(signal.Signals(received[0]), EXIT_INTERRUPTED))
        received.append(signum)
        task.cancel()
        watchdog = threading.Timer(GRACE, leave_now, (_EXIT_CODES[signal.Signals(signum)],))
        watchdog.daemon = True
        watchdog.start()
        watchdogs.append(watchdog)

    try:
        with _handlers(loop, on_signal):
            try:
                return loop.run_until_complete(task)
            except BaseException as exc:
                if received:
                    # Whatever the cancelled command raised on its way out, it was stopped.
                    raise Stopped(received[0]) from (None if isinstance(exc, asyncio.CancelledError) else exc)
                raise
            finally:
                _cancel_leftovers(loop)
    finally:
        # Worker threads still running (a file being hashed, a listing page) are not joined.
        loop.close()
        for watchdog in watchdogs:  # stopped in time: the caller leaves by itself
            watchdog.cancel()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (module docstring), asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@contextlib.contextmanager
def _handlers(loop: asyncio.AbstractEventLoop, on_signal: Callable[[int], None]) -> Iterator[None]:
    previous = {signum: signal.getsignal(signum) for signum in _EXIT_CODES}
    for signum in _EXIT_CODES:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, handler)


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks the command left behind and give them a moment, never more (asyncio.wait,
    unlike wait_for, does not wait again for what outlived the timeout)."""
    leftovers = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in leftovers:
        task.cancel()
    if leftovers:
        loop.run_until_complete(asyncio.wait(leftovers, timeout=_LEFTOVER_WAIT))
    closing = loop.create_task(loop.shutdown_asyncgens())
    loop.run_until_complete(asyncio.wait([closing], timeout=_LEFTOVER_WAIT))


def leave_now(code: int) -> None:
    """End the process at once with ``code``, after flushing what was printed (for a moment at most:
    the main thread may hold a stream's lock, blocked on a pipe nobody reads)."""

    def flush() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()

    flusher = threading.Thread(target=flush, daemon=True)
    flusher.start()
    flusher.join(_LEFTOVER_WAIT)
    verb = "interrupted" if code == EXIT_INTERRUPTED else "terminated"
    with contextlib.suppress(OSError):
        restore_cursor = "\x1b[?25h" if os.isatty(2) else ""  # a progress bar may have hidden it
        os.write(2, f"{restore_cursor}\ndicom-cloud: {verb}, without waiting for work in flight\n".encode())
    os._exit(code)
