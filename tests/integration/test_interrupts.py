"""Long commands stopped mid-run by SIGINT (Ctrl-C) or SIGTERM, against SeaweedFS and local disk.

Each test starts the real console script on enough data to be mid-run, sends the signal once the
command has visibly done part of its work, and checks: the exit code (130 for SIGINT, 143 for
SIGTERM), that it ended promptly (the requirement is 2 s; the bound asserted is looser so that a
busy machine does not fail it, and the measured time is printed), that the job's lock is released
(the same command run at once is not refused as running), and that running it again finishes the
job exactly. With ``tty`` the command runs on a pseudo-terminal (rich progress bar) and the signal
goes to its whole process group, as a terminal's Ctrl-C does.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_cli import CLI, Backend, assert_same_tree, cli_env, listed, make_backend, run_cli

#: What the exit code must be for each signal (docs/cli.md, errors.EXIT_INTERRUPTED/EXIT_TERMINATED).
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
#: Seconds within which a signalled command must have ended (2 s is required; this allows a busy machine).
BOUND = 5.0
SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM")]


@dataclass
class Running:
    """A console script running in the background, its output collected by a thread."""

    proc: subprocess.Popen[bytes]
    tty: bool
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def lines(self) -> list[str]:
        return "".join(self.output).splitlines()

    def events(self) -> list[dict[str, object]]:
        found = []
        for line in self.lines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line still being written
        return found


def start(argv: list[str], env: Mapping[str, str], *, tty: bool = False) -> Running:
    """Start ``dicom-cloud ARGV``: on a pseudo-terminal (its own session) or with pipes."""
    if tty:
        main_fd, terminal_fd = pty.openpty()
        proc = subprocess.Popen(
            [str(CLI), *argv],
            env=dict(env, COLUMNS="120"),
            stdin=terminal_fd,
            stdout=terminal_fd,
            stderr=terminal_fd,
            start_new_session=True,
        )
        os.close(terminal_fd)
        running = Running(proc, tty=True)

        def read_terminal() -> None:
            while True:
                try:
                    chunk = os.read(main_fd, 65536)
                except OSError:  # EIO: the terminal's last writer has gone
                    break
                if not chunk:
                    break
                running.output.append(chunk.decode("utf-8", "replace"))
            os.close(main_fd)

        running.reader = threading.Thread(target=read_terminal, daemon=True)
    else:
        proc = subprocess.Popen(
            [str(CLI), *argv],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        running = Running(proc, tty=False)

        def read_pipe() -> None:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                running.output.append(line.decode("utf-8", "replace"))

        running.reader = threading.Thread(target=read_pipe, daemon=True)
    running.reader.start()
    return running


def wait_until(running: Running, ready: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert running.proc.poll() is None, f"ended before {what}:\n" + "\n".join(running.lines()[-30:])
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def interrupt(running: Running, sig: signal.Signals, label: str) -> str:
    """Send ``sig`` (to the process group on a terminal); assert the exit code and a prompt end."""
    assert running.proc.poll() is None, f"{label}: ended before it could be interrupted"
    sent = time.monotonic()
    if running.tty:
        os.killpg(running.proc.pid, sig)
    else:
        running.proc.send_signal(sig)
    try:
        code = running.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        running.proc.kill()
        running.proc.wait()
        pytest.fail(f"{label}: still running 30 s after {sig.name}")
    seconds = time.monotonic() - sent
    assert running.reader is not None
    running.reader.join(timeout=10)
    output = "".join(running.output)
    print(f"{label} {sig.name}{' on a terminal' if running.tty else ''}: exit {code} in {seconds:.2f} s")
    assert code == EXIT[sig], f"{label}: exit {code}\n{output[-3000:]}"
    assert seconds < BOUND, f"{label}: {seconds:.2f} s after {sig.name}"
    assert "Traceback" not in output, output[-3000:]
    stopped = "interrupted" if sig == signal.SIGINT else "terminated"
    assert f"dicom-cloud: {stopped}" in output, output[-3000:]
    events = running.events()
    if events:  # --json: the last record says how the command ended
        assert events[-1] == {
            "event": "error",
            "error": stopped,
            "error_type": "Stopped",
            "exit_code": EXIT[sig],
        }, events[-1]
    return output


def assert_no_job_running(env: Mapping[str, str]) -> None:
    for job in run_cli("jobs", "--json", env=env).ok().json_lines():
        assert job["status"] != "running", job


def completed(running: Running) -> int:
    return sum(1 for event in running.events() if event.get("event") == "completed")


def journal_done(env: Mapping[str, str]) -> int:
    """Objects recorded as finished in the job journals (how far a run without --json got)."""
    import sqlite3

    total = 0
    for path in (Path(env["DICOM_CLOUD_STATE_DIR"]) / "jobs").glob("*.sqlite"):
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2)
            try:
                total += db.execute("SELECT count(*) FROM done").fetchone()[0]
                total += db.execute("SELECT count(*) FROM entries").fetchone()[0]
            finally:
                db.close()
        except sqlite3.Error:
            continue
    return total


def make_tree(root: Path, count: int, size: int = 1500) -> dict[str, bytes]:
    files = {f"d{i // 100:02d}/f{i:05d}.dcm": os.urandom(size) for i in range(count)}
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


@pytest.fixture
def s3(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Backend, dict[str, str]]:
    remote = make_backend(request, "s3")
    return remote, cli_env(remote.env, DICOM_CLOUD_STATE_DIR=str(tmp_path / "state"))


def _mid_run(running: Running, env: Mapping[str, str], what: str = "objects finished") -> None:
    """Wait until the command has finished a few objects (JSON events, or its journal on a terminal)."""
    if running.tty:
        wait_until(running, lambda: journal_done(env) >= 5, what)
    else:
        wait_until(running, lambda: completed(running) >= 5, what)


# -- the transfer commands --------------------------------------------------------------------


@pytest.mark.parametrize("tty", [False, True], ids=["pipes", "tty"])
@pytest.mark.parametrize("sig", SIGNALS)
def test_upload_stops_on_signal_and_resumes(
    s3: tuple[Backend, dict[str, str]], tmp_path: Path, sig: signal.Signals, tty: bool
) -> None:
    remote, env = s3
    files = make_tree(tmp_path / "src", 1200)
    argv = ["upload", str(tmp_path / "src"), remote.url("up/"), "-r"]
    running = start([*argv, "-j", "1", *([] if tty else ["--json"])], env, tty=tty)
    _mid_run(running, env)
    interrupt(running, sig, "upload")
    assert_no_job_running(env)
    run_cli(*argv, "-j", "8", "-q", env=env, timeout=300).ok()  # the same job: not refused as running
    assert listed(remote, "up/", env) == {rel: len(data) for rel, data in files.items()}
    run_cli("verify", tmp_path / "src", remote.url("up/"), env=env).ok()
    assert run_cli("jobs", "--json", env=env).ok().json_lines() == []


@pytest.mark.parametrize("tty", [False, True], ids=["pipes", "tty"])
@pytest.mark.parametrize("sig", SIGNALS)
def test_download_stops_on_signal_and_resumes(
    s3: tuple[Backend, dict[str, str]], tmp_path: Path, sig: signal.Signals, tty: bool
) -> None:
    remote, env = s3
    files = make_tree(tmp_path / "src", 1200)
    run_cli("upload", tmp_path / "src", remote.url("dl/"), "-r", "-q", "-j", "16", env=env, timeout=300).ok()
    dest = tmp_path / "dest"
    argv = ["download", remote.url("dl/"), str(dest), "-r"]
    running = start([*argv, "-j", "1", *([] if tty else ["--json"])], env, tty=tty)
    _mid_run(running, env)
    interrupt(running, sig, "download")
    assert_no_job_running(env)
    run_cli(*argv, "-j", "8", "-q", env=env, timeout=300).ok()
    assert_same_tree(dest, files)
    assert run_cli("jobs", "--json", env=env).ok().json_lines() == []


@pytest.mark.parametrize("tty", [False, True], ids=["pipes", "tty"])
@pytest.mark.parametrize("sig", SIGNALS)
def test_copy_stops_on_signal_and_resumes(
    s3: tuple[Backend, dict[str, str]], tmp_path: Path, sig: signal.Signals, tty: bool
) -> None:
    remote, env = s3
    files = make_tree(tmp_path / "src", 1200)
    run_cli("upload", tmp_path / "src", remote.url("a/"), "-r", "-q", "-j", "16", env=env, timeout=300).ok()
    argv = ["copy", remote.url("a/"), remote.url("b/"), "-r"]
    running = start([*argv, "-j", "1", *([] if tty else ["--json"])], env, tty=tty)
    _mid_run(running, env)
    interrupt(running, sig, "copy")
    assert_no_job_running(env)
    run_cli(*argv, "-j", "8", "-q", env=env, timeout=300).ok()
    assert listed(remote, "b/", env) == {rel: len(data) for rel, data in files.items()}
    run_cli("verify", tmp_path / "src", remote.url("b/"), env=env).ok()


@pytest.mark.parametrize("tty", [False, True], ids=["pipes", "tty"])
@pytest.mark.parametrize("sig", SIGNALS)
def test_sync_stops_on_signal_and_resumes(
    s3: tuple[Backend, dict[str, str]], tmp_path: Path, sig: signal.Signals, tty: bool
) -> None:
    remote, env = s3
    files = make_tree(tmp_path / "src", 1500)
    argv = ["sync", str(tmp_path / "src"), remote.url("sy/")]
    running = start([*argv, "-j", "2", *([] if tty else ["--json"])], env, tty=tty)
    _mid_run(running, env)
    interrupt(running, sig, "sync")
    assert_no_job_running(env)
    # `resume` runs the interrupted job's own command line again.
    resumed = run_cli("resume", env=env, timeout=300)
    assert resumed.code == 0, str(resumed)
    assert listed(remote, "sy/", env) == {rel: len(data) for rel, data in files.items()}
    run_cli("verify", tmp_path / "src", remote.url("sy/"), env=env).ok()
    again = run_cli(*argv, "--json", env=env, timeout=300).ok().json_lines()[-1]
    assert (again["created"], again["updated"], again["unchanged"]) == (0, 0, len(files)), again


def test_a_second_sync_is_refused_while_the_first_stops(
    s3: tuple[Backend, dict[str, str]], tmp_path: Path
) -> None:
    """The job's lock is held until the interrupted run has stopped: never two runs of one job."""
    remote, env = s3
    make_tree(tmp_path / "src", 1500)
    argv = ["sync", str(tmp_path / "src"), remote.url("sy/"), "-j", "2", "--json"]
    running = start(argv, env)
    _mid_run(running, env)
    assert run_cli(*argv, env=env).code == 13
    interrupt(running, signal.SIGINT, "sync")
    assert run_cli(*argv, "-q", env=env, timeout=300).code == 0


# -- rekey, verify, delete, cleanup --------------------------------------------------------


def _key_file(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    return path


@pytest.mark.parametrize("sig", SIGNALS)
def test_rekey_stops_on_signal_and_resumes(
    s3: tuple[Backend, dict[str, str]], tmp_path: Path, sig: signal.Signals
) -> None:
    remote, env = s3
    files = make_tree(tmp_path / "src", 500)
    old, new = f"7:{_key_file(tmp_path, 'old.key')}", f"8:{_key_file(tmp_path, 'new.key')}"
    run_cli("upload", tmp_path / "src", remote.url("enc/"), "-r", "-q", "-j", "16",
            "--encrypt", "client-side", "--master-key", old, env=env, timeout=300).ok()  # fmt: skip
    argv = ["rekey", remote.url("enc/"), "-r", "--master-key", new, "--previous-key", old]
    running = start([*argv, "-j", "1", "--json"], env)
    wait_until(running, lambda: completed(running) >= 5, "objects re-encrypted")
    interrupt(running, sig, "rekey")
    run_cli(*argv, "-q", env=env, timeout=300).ok()
    # Every object is now readable with the new key alone.
    dest = tmp_path / "back"
    run_cli("download", remote.url("enc/"), dest, "-r", "-q", "--master-key", new, env=env, timeout=300).ok()
    assert_same_tree(dest, files)


@pytest.mark.parametrize("sig", SIGNALS)
def test_verify_stops_on_signal(
    s3: tuple[Backend, dict[str, str]], tmp_path: Path, sig: signal.Signals
) -> None:
    remote, env = s3
    make_tree(tmp_path / "src", 1500)
    run_cli("upload", tmp_path / "src", remote.url("v/"), "-r", "-q", "-j", "16", env=env, timeout=300).ok()
    run_cli("upload", tmp_path / "src" / "d00" / "f00000.dcm", remote.url("v/extra.dcm"), env=env).ok()
    argv = ["verify", str(tmp_path / "src"), remote.url("v/"), "--json"]
    running = start([*argv, "-j", "1"], env)
    # The names only on one side are reported first; the content comparisons follow.
    wait_until(running, lambda: any(e.get("event") == "difference" for e in running.events()), "difference")
    time.sleep(0.3)
    output = interrupt(running, sig, "verify")
    assert '"event": "summary"' not in output  # stopped before its end: no summary pretends otherwise
    result = run_cli(*argv, env=env, timeout=300)
    assert result.code == 1, str(result)
    differences = [r for r in result.json_lines() if r["event"] == "difference"]
    assert [(d["kind"], d["name"]) for d in differences] == [("extra", "extra.dcm")]


@pytest.mark.parametrize("sig", SIGNALS)
def test_delete_stops_on_signal_and_resumes(
    s3: tuple[Backend, dict[str, str]], tmp_path: Path, sig: signal.Signals
) -> None:
    remote, env = s3
    make_tree(tmp_path / "src", 3500, size=100)
    run_cli("upload", tmp_path / "src", remote.url("del/"), "-r", "-q", "-j", "32", env=env, timeout=300).ok()
    argv = ["delete", remote.url("del/"), "-r", "--force", "--json"]
    running = start(argv, env)
    wait_until(running, lambda: any(e.get("event") == "deleted" for e in running.events()), "deletions")
    interrupt(running, sig, "delete")
    assert len(listed(remote, "del/", env)) > 0, "the delete had finished before the signal"
    run_cli(*argv, env=env, timeout=300).ok()
    assert listed(remote, "del/", env) == {}


@pytest.mark.parametrize("sig", SIGNALS)
def test_cleanup_stops_on_signal_and_resumes(
    s3: tuple[Backend, dict[str, str]], tmp_path: Path, sig: signal.Signals
) -> None:
    remote, env = s3
    server = remote.server
    for i in range(400):  # unfinished multipart uploads: what cleanup removes, one request each
        status, body = server.s3_request("POST", f"/{remote.bucket}/lo/k{i:04d}?uploads=")
        assert status == 200, body
    argv = ["cleanup", remote.url("lo/"), "--older-than", "0", "--json"]
    running = start(argv, env)
    wait_until(running, lambda: sum(e.get("event") == "removed" for e in running.events()) >= 5, "removals")
    output = interrupt(running, sig, "cleanup")
    removed = output.count('"event": "removed"')
    assert removed < 400, "the cleanup had finished before the signal"
    rest = run_cli(*argv, env=env, timeout=300).ok().json_lines()
    # The one being removed when the signal came may or may not be gone (it is reported first).
    assert 400 - removed <= len([r for r in rest if r["event"] == "removed"]) <= 400 - removed + 1
    assert run_cli(*argv, env=env).ok().json_lines() == []
