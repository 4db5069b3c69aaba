"""The job journal: what a recursive transfer or a sync has finished, kept on disk so that a re-run
after an interruption (Ctrl-C, ``kill -9``, a lost network) skips it.

One job = one SQLite file ``<state dir>/jobs/<job id>.sqlite``; the format is specified in
``docs/sync.md``. The job id is a hash of what makes two runs "the same command": the verb, the
resolved source and destination, and the options that change what is written. A job holds:

- ``job``: one row describing it (the command line and working directory, to ``resume`` it);
- ``done``: each source object finished and verified, with the version seen when it was read;
- ``sessions``: the state of large uploads in progress (upload ids, block lists), so that they
  continue from their last part;
- ``entries`` (syncs only): the checksum cache and the last synchronised state of both sides.

Writes are batched (one commit per half second or 500 rows): a crash loses at most that much
bookkeeping, and what it loses is transferred again, never skipped wrongly. The file is removed
when a transfer ends without failures; a sync's file stays (its ``entries`` make the next sync
cheap) with its status set to ``complete``.

A run is recorded as a run of its job (the ``job`` row written, status ``running``) only once it
has planned or moved something (``begin``): a sync's checked plan with work in it, a transfer's
first planned object (``is_done``), a finished object, an upload session, a sync entry. A run
refused before that (a missing source, bad credentials, a sync over its ``--max-delete``) leaves
an earlier record as it was and a new job no file at all, so ``jobs`` lists only runs that can be
resumed. ``prune_jobs`` removes the records that have gone stale.

A job is locked while it runs (``flock`` on ``<job id>.lock``), so two runs of the same command
never interleave; the kernel drops the lock when the process dies, even by ``kill -9``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import JobLockedError, UsageError

#: Version of the job file's schema (docs/sync.md); files of other versions are refused.
SCHEMA_VERSION = 1
_COMMIT_INTERVAL = 0.5
_COMMIT_ROWS = 500
#: Seconds a writer waits for another one's transaction (workers of a cluster share one job file).
_BUSY_TIMEOUT = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS job (
    id TEXT PRIMARY KEY, verb TEXT NOT NULL, source TEXT NOT NULL, destination TEXT NOT NULL,
    argv TEXT NOT NULL, cwd TEXT NOT NULL, schema INTEGER NOT NULL,
    started REAL NOT NULL, updated REAL NOT NULL, status TEXT NOT NULL, failed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS done (
    src_key TEXT PRIMARY KEY, version TEXT NOT NULL, dst_key TEXT NOT NULL, size INTEGER NOT NULL,
    crc32c TEXT
);
CREATE TABLE IF NOT EXISTS sessions (dst_key TEXT PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    rel TEXT PRIMARY KEY, src_sig TEXT, dst_sig TEXT, crc32c TEXT
);
"""


def state_dir() -> Path:
    """Where dicom-cloud keeps its state: ``$DICOM_CLOUD_STATE_DIR``, else ``$XDG_STATE_HOME/dicom-cloud``,
    else ``~/.local/state/dicom-cloud``. Created private to the user (0700)."""
    configured = os.environ.get("DICOM_CLOUD_STATE_DIR")
    if configured:
        path = Path(configured)
    else:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        path = Path(base) / "dicom-cloud"
    return path


def jobs_dir() -> Path:
    path = state_dir() / "jobs"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UsageError(
            f"cannot create the state directory {path}: {exc.strerror}",
            hint="set DICOM_CLOUD_STATE_DIR to a writable directory, or pass --no-journal",
        ) from None
    return path


@dataclass(frozen=True)
class JobSpec:
    """What makes two runs the same job."""

    verb: str
    source: str
    destination: str
    #: Options that change what is written (not how fast), as JSON-able values.
    options: Mapping[str, Any]
    #: The command line to re-run it with (``dicom-cloud resume``) and where it was run.
    argv: Sequence[str] = ()
    cwd: str = ""

    @property
    def id(self) -> str:
        identity = json.dumps(
            [self.verb, self.source, self.destination, dict(self.options)], sort_keys=True, default=str
        )
        return hashlib.sha256(identity.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class JobInfo:
    id: str
    verb: str
    source: str
    destination: str
    argv: list[str]
    cwd: str
    started: float
    updated: float
    status: str
    done: int
    failed: int
    running: bool


class Journal:
    """One job's file, open and locked for the run. Not thread-safe: call it from the event loop."""

    def __init__(self, path: Path, spec: JobSpec, lock_fd: int, *, record: bool = True) -> None:
        self.path = path
        self.spec = spec
        self._lock_fd = lock_fd
        self._db = sqlite3.connect(path, isolation_level="DEFERRED", timeout=_BUSY_TIMEOUT)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT schema FROM job").fetchone()
        if row is not None and row[0] != SCHEMA_VERSION:
            raise UsageError(
                f"job file {path.name} has schema {row[0]}, this version reads {SCHEMA_VERSION}",
                hint="remove it with 'dicom-cloud jobs --forget ID' and run the command again",
            )
        #: Finished objects recorded by earlier runs of this job.
        self.previously_done = self._db.execute("SELECT count(*) FROM done").fetchone()[0]
        #: Whether this run is recorded as a run of the job (not for a dry run: it reads state only).
        self.record = record
        #: Whether this run has planned or moved something, and so is recorded (``begin``).
        self.started = False
        self._pending = 0
        self._last_commit = time.monotonic()
        #: Finished objects not yet written (``record_done``), written with the next commit.
        self._done_rows: list[tuple[str, str, str, int, str | None]] = []

    def begin(self) -> None:
        """Record this run as the job's latest, running: called once it has a plan with work in it
        (a sync), and on its first planned object or write. Idempotent."""
        if self.started or not self.record:
            return
        self.started = True
        spec = self.spec
        now = time.time()
        self._db.execute(
            "INSERT INTO job (id, verb, source, destination, argv, cwd, schema, started, updated, status)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running')"
            " ON CONFLICT (id) DO UPDATE SET updated = excluded.updated, status = 'running',"
            " argv = excluded.argv, cwd = excluded.cwd",
            (
                spec.id,
                spec.verb,
                spec.source,
                spec.destination,
                json.dumps(list(spec.argv)),
                spec.cwd,
                SCHEMA_VERSION,
                now,
                now,
            ),
        )
        self._db.commit()

    @classmethod
    def open(cls, spec: JobSpec, directory: Path | None = None, *, record: bool = True) -> Journal:
        """Open (creating it if new) and lock the job's file. JobLockedError if it is running elsewhere."""
        directory = directory or jobs_dir()
        path = directory / f"{spec.id}.sqlite"
        lock_fd = os.open(directory / f"{spec.id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise JobLockedError(
                f"the same {spec.verb} is already running (job {spec.id})",
                hint="wait for it to finish; 'dicom-cloud jobs' lists jobs",
            ) from None
        try:
            # Private from the first byte: it may hold resumable-upload session URLs.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            return cls(path, spec, lock_fd, record=record)
        except BaseException:
            os.close(lock_fd)
            raise

    # -- finished objects ----------------------------------------------------------------

    def is_done(self, src_key: str, version: str) -> bool:
        """Whether an earlier run finished this object, as it is now (same version). Asked once
        per planned object: the first question records the run."""
        self.begin()
        if not self.previously_done:
            # A new job: no earlier run finished anything. (Rows another process of this run
            # writes meanwhile can only make an object be moved again, never skipped wrongly.)
            return False
        row = self._db.execute("SELECT version FROM done WHERE src_key = ?", (src_key,)).fetchone()
        return row is not None and row[0] == version

    def record_done(self, src_key: str, version: str, dst_key: str, size: int, crc32c: str | None) -> None:
        self.begin()
        # Kept until the next commit and then written in one statement: an INSERT per object
        # (16 of 674 samples of a 400-object download's event loop, py-spy) becomes one per commit.
        self._done_rows.append((src_key, version, dst_key, size, crc32c))
        self._tick()

    # -- resumable upload sessions (the state store of resumable uploads) ---------------

    def load(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT state FROM sessions WHERE dst_key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def save(self, key: str, state: Mapping[str, Any]) -> None:
        self.begin()
        self._db.execute(
            "INSERT OR REPLACE INTO sessions (dst_key, state) VALUES (?, ?)", (key, json.dumps(dict(state)))
        )
        self._db.commit()  # a session's parts are worth more than a batch: written at once

    def clear(self, key: str) -> None:
        self._db.execute("DELETE FROM sessions WHERE dst_key = ?", (key,))
        self._tick()

    # -- sync entries ------------------------------------------------------------------

    @property
    def db(self) -> sqlite3.Connection:
        """The job's database, for the sync planner's own tables."""
        return self._db

    def set_entry(self, rel: str, src_sig: str | None, dst_sig: str | None, crc32c: str | None) -> None:
        self.begin()
        self._db.execute(
            "INSERT OR REPLACE INTO entries (rel, src_sig, dst_sig, crc32c) VALUES (?, ?, ?, ?)",
            (rel, src_sig, dst_sig, crc32c),
        )
        self._tick()

    def drop_entry(self, rel: str) -> None:
        self.begin()
        self._db.execute("DELETE FROM entries WHERE rel = ?", (rel,))
        self._tick()

    # -- life cycle --------------------------------------------------------------------

    def _tick(self) -> None:
        self._pending += 1
        now = time.monotonic()
        if self._pending >= _COMMIT_ROWS or now - self._last_commit >= _COMMIT_INTERVAL:
            self.flush()

    def flush(self) -> None:
        if self._done_rows:
            self._db.executemany(
                "INSERT OR REPLACE INTO done (src_key, version, dst_key, size, crc32c)"
                " VALUES (?, ?, ?, ?, ?)",
                self._done_rows,
            )
            self._done_rows.clear()
        self._db.commit()
        self._pending = 0
        self._last_commit = time.monotonic()

    def finish(self, *, failed: int, keep: bool = False) -> None:
        """End the run: a job with no failures is complete (its file removed unless ``keep``)."""
        status = "failed" if failed else "complete"
        self._db.execute("UPDATE job SET status = ?, failed = ?, updated = ?", (status, failed, time.time()))
        if status == "complete":
            self._done_rows.clear()
            self._db.execute("DELETE FROM done")
            self._db.execute("DELETE FROM sessions")
        self.flush()
        if status == "complete" and not keep:
            self.close()
            _remove_job_files(self.path)
            return
        self.close()

    def close(self) -> None:
        """Leave the job as it is (interrupted: the next run continues it)."""
        if self._lock_fd < 0:
            return
        with contextlib.suppress(sqlite3.Error):
            self.flush()
        unrecorded = self._db.execute("SELECT count(*) FROM job").fetchone()[0] == 0
        self._db.close()
        if unrecorded:  # a job never started (or only dry-run): leave nothing behind
            _remove_job_files(self.path)
        os.close(self._lock_fd)
        self._lock_fd = -1


class SharedJournal(Journal):
    """A job's file opened by one of the processes that work for the run holding it (the workers of
    a cluster on this machine): no lock (the run holds it), no record of the run (the run makes it),
    and each row committed at once, so that a writer holds SQLite's write lock for one row only and
    a worker killed at any moment loses nothing it reported done."""

    def __init__(self, path: Path, spec: JobSpec) -> None:
        super().__init__(path, spec, lock_fd=-1, record=False)

    def _tick(self) -> None:
        self.flush()

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.flush()
        self._db.close()


def _remove_job_files(path: Path) -> None:
    for suffix in (".sqlite", ".sqlite-wal", ".sqlite-shm", ".lock"):
        with contextlib.suppress(FileNotFoundError):
            path.with_suffix(suffix).unlink()


def _is_running(directory: Path, job_id: str) -> bool:
    lock = directory / f"{job_id}.lock"
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def list_jobs(directory: Path | None = None, *, include_complete: bool = False) -> Iterator[JobInfo]:
    """Jobs recorded in the state directory, unfinished ones only unless ``include_complete``."""
    directory = directory or jobs_dir()
    for path in sorted(directory.glob("*.sqlite")):
        info = _read_job(path, directory)
        if info is not None and (include_complete or info.status != "complete"):
            yield info


def find_job(job_id: str, directory: Path | None = None) -> JobInfo:
    """The job whose id starts with ``job_id`` (a unique prefix is enough)."""
    matches = [job for job in list_jobs(directory, include_complete=True) if job.id.startswith(job_id)]
    if not matches:
        from .errors import NotFoundError

        raise NotFoundError(f"no job {job_id!r}", hint="'dicom-cloud jobs' lists them")
    if len(matches) > 1:
        raise UsageError(f"job id {job_id!r} is ambiguous", hint="give more of its characters")
    return matches[0]


def forget_job(job_id: str, directory: Path | None = None) -> JobInfo:
    directory = directory or jobs_dir()
    job = find_job(job_id, directory)
    if job.running:
        raise JobLockedError(f"job {job.id} is running", hint="stop it first")
    _remove_job_files(directory / f"{job.id}.sqlite")
    return job


@dataclass(frozen=True)
class PrunedJob:
    """A stale job removed (or, on a dry run, that would be): its id, what it was, and why."""

    id: str
    #: The job's command, or "" for a file that never recorded one.
    command: str
    reason: str


def prune_jobs(
    directory: Path | None = None, *, older_than: float | None = None, dry_run: bool = False
) -> list[PrunedJob]:
    """Remove the job files that have gone stale (running jobs are never touched):

    - never started: a file with no job row (a run killed before it planned anything);
    - nothing to continue from: an unfinished job that recorded no finished object, upload session
      or sync entry (re-running it is running it afresh);
    - gone: a job whose local source or destination no longer exists (nothing to resume from, or
      finished objects that are no longer where the journal says);
    - old: with ``older_than`` (seconds), a job, completed syncs included, not updated for that long.
    """
    directory = directory or jobs_dir()
    now = time.time()
    pruned: list[PrunedJob] = []
    for path in sorted(directory.glob("*.sqlite")):
        job_id = path.stem
        # Held while deciding and removing: a run of this job that starts meanwhile waits for
        # nothing, it is refused as already running (and retried by the user), never half-removed.
        lock_fd = os.open(directory / f"{job_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # running
            info = _read_job(path, directory, locked=True)
            reason = _stale_reason(path, info, now, older_than)
            if reason is None:
                continue
            command = f"{info.verb} {info.source} -> {info.destination}" if info is not None else ""
            pruned.append(PrunedJob(info.id if info is not None else job_id, command, reason))
            if not dry_run:
                _remove_job_files(path)
        finally:
            os.close(lock_fd)
    return pruned


def _stale_reason(path: Path, info: JobInfo | None, now: float, older_than: float | None) -> str | None:
    if info is None:  # no job row, and no run holds its lock
        return "never started"
    if info.status != "complete" and not _holds_progress(path):
        return "nothing to continue from"
    for side in (info.source, info.destination):
        # Local locations are absolute paths; object store URLs are not checked (no request here).
        if side.startswith("/") and not os.path.lexists(side):
            return f"{side} no longer exists"
    if older_than is not None and now - info.updated > older_than:
        return "last updated " + time.strftime("%Y-%m-%d %H:%M", time.localtime(info.updated))
    return None


def _holds_progress(path: Path) -> bool:
    """Whether a job recorded anything a re-run continues from."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            found = db.execute(
                "SELECT (SELECT count(*) FROM done) + (SELECT count(*) FROM sessions)"
                " + (SELECT count(*) FROM entries)"
            ).fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return True  # cannot tell: keep it
    return bool(found)


def _read_job(path: Path, directory: Path, *, locked: bool = False) -> JobInfo | None:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = db.execute(
                "SELECT id, verb, source, destination, argv, cwd, started, updated, status, failed FROM job"
            ).fetchone()
            done = db.execute("SELECT count(*) FROM done").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return None  # a file being created, or not ours
    if row is None:
        return None
    job_id, verb, source, destination, argv, cwd, started, updated, status, failed = row
    running = not locked and _is_running(directory, job_id)
    return JobInfo(
        id=job_id,
        verb=verb,
        source=source,
        destination=destination,
        argv=json.loads(argv),
        cwd=cwd,
        started=started,
        updated=updated,
        status="running" if running else ("interrupted" if status == "running" else status),
        done=done,
        failed=failed,
        running=running,
    )
