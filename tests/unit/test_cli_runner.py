"""Stopping a command: the CLI's runner (cli/runner.py) on SIGINT/SIGTERM, and an interrupted sync
leaving no task running once it has released its job's lock. The real commands under real signals
are in tests/integration/test_interrupts.py."""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dicom_cloud import api
from dicom_cloud.cli import runner
from dicom_cloud.errors import EXIT_INTERRUPTED, EXIT_TERMINATED
from dicom_cloud.transfer import TransferEvent, TransferOptions

#: Seconds within which a stopped command must have ended (what is required is 2 s; this is generous).
BOUND = 5.0


def test_a_cancelled_sync_stops_every_task_before_it_releases_its_lock(tmp_path: Path) -> None:
    source = tmp_path / "a"
    for i in range(1500):
        path = source / f"d{i // 100}" / f"f{i:04d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(64))
    (tmp_path / "jobs").mkdir()
    job = api.JobRequest(options={}, directory=str(tmp_path / "jobs"))

    async def scenario() -> list[asyncio.Task[object]]:
        progressed = asyncio.Event()

        def on_event(event: TransferEvent) -> None:
            if event.kind == "completed":
                progressed.set()

        run = asyncio.create_task(
            api.sync_async(
                str(source),
                str(tmp_path / "b"),
                options=TransferOptions(parallel=2),
                on_event=on_event,
                job=job,
            )
        )
        waiting = asyncio.create_task(progressed.wait())
        await asyncio.wait([waiting, run], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        assert not run.done(), run  # still mid-run
        waiting.cancel()
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        # The journal is closed and its lock released: nothing of that run may still be running.
        leftovers: list[asyncio.Task[object]] = [
            task for task in asyncio.all_tasks() if task not in (asyncio.current_task(), waiting)
        ]
        for task in leftovers:  # so that this test ends even when it fails
            task.cancel()
        if leftovers:
            await asyncio.wait(leftovers, timeout=1)
        return leftovers

    assert asyncio.run(scenario()) == []
    from dicom_cloud.journal import list_jobs

    assert [job.status for job in list_jobs(tmp_path / "jobs")] == ["interrupted"]


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, EXIT_TERMINATED)]
)
def test_the_runner_cancels_the_command_on_a_signal(signum: int, code: int) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    cancelled: list[bool] = []

    async def command() -> None:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signum)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    started = time.monotonic()
    with pytest.raises(runner.Stopped) as stopped:
        runner.run(command())
    assert time.monotonic() - started < BOUND
    assert stopped.value.exit_code == code
    assert cancelled == [True]
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are put back


def test_the_runner_does_not_wait_for_tasks_that_ignore_cancellation() -> None:
    """asyncio.run waits for every task left behind, without a bound; a command must not hang there."""

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                continue

    async def command() -> int:
        asyncio.get_running_loop().create_task(stubborn())
        await asyncio.sleep(0)
        return 42

    started = time.monotonic()
    assert runner.run(command()) == 42
    assert time.monotonic() - started < BOUND


_STUCK_COMMAND = textwrap.dedent(
    """
    import asyncio, sys
    from dicom_cloud.cli import runner

    async def command() -> None:
        print("ready", flush=True)
        while True:  # a command that never finishes stopping
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                continue

    try:
        runner.run(command())
    except runner.Stopped as stopped:
        sys.exit(stopped.exit_code)
    """
)


@pytest.mark.parametrize("signals", [1, 2], ids=["once", "twice"])
def test_a_command_that_does_not_stop_is_ended_within_the_grace_period(signals: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUCK_COMMAND], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    started = time.monotonic()
    for _ in range(signals):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("still running 30 s after SIGINT")
    seconds = time.monotonic() - started
    print(f"ended {seconds:.2f} s after the first SIGINT")
    errors = proc.stderr.read().decode() if proc.stderr else ""
    assert code == EXIT_INTERRUPTED, errors
    assert seconds < BOUND
    assert "dicom-cloud: interrupted" in errors, errors  # it says so, even leaving at once


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop has no Windows build")
def test_commands_run_on_uvloop() -> None:
    """uvloop is a core dependency outside Windows: the commands' event loop is its own."""
    import uvloop

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert runner.run(loop_type()) is uvloop.Loop


_BUFFER_CHURN = textwrap.dedent(
    """
    import resource
    from dicom_cloud.cli import runner

    async def churn() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for i in range(100):
            # Every page written, as a chunk of a download or a part of an upload is; from 1 to 17
            # MiB, each larger than the last (glibc itself reuses a freed block of the same size).
            buffer = b"x" * ((1 << 20) + (160 << 10) * i)
            del buffer
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    print(runner.run(churn()))
    """
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_commands_reuse_freed_buffers_instead_of_fresh_pages() -> None:
    """A command's large buffers come back from the heap once freed: 100 of 1 to 17 MiB, each
    written whole, fault in about 4,000 pages, not the 224,000 of 100 fresh mappings
    (``allocator``)."""
    done = subprocess.run([sys.executable, "-c", _BUFFER_CHURN], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 20_000
