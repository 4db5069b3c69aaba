"""The task of one partition, run by a Dask worker: the transfer engine over exactly its keys.

The worker builds the run's options from the command's own arguments, as the CLI does (the same
routes, checksums, encryption, DICOM policy, --on-conflict); the arguments hold flags and file
paths, never key material: master keys, customer keys and store credentials are read by the
worker from its own environment and files (docs/cluster.md). Objects finished are recorded in the
job's journal, shared by every worker, and the ones an earlier attempt finished are skipped, so
that a partition run again after its worker died redoes only what was not recorded.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.model import TransferEvent, TransferItem, TransferSummary
from ..errors import DicomCloudError
from ..journal import JobSpec, Journal, SharedJournal
from ..location import LocationOpener
from .portable import PortableError, PortableEvent, PortableSummary


@dataclass(frozen=True)
class PartitionJob:
    """What every partition of one run shares."""

    source: str
    destination: str
    #: The command's parsed arguments (flags and file paths), from which a worker builds the options.
    arguments: Mapping[str, Any]
    #: The job's SQLite file, shared by the workers of a cluster on this machine (None: no journal).
    journal_path: str | None = None
    journal_spec: JobSpec | None = None
    #: The job's PostgreSQL journal instead (``--journal``): sent to the workers as given, so it
    #: should carry no password (workers read theirs from PGPASSWORD or ~/.pgpass).
    journal_url: str | None = None
    #: The journal holds upload sessions only (a sync's job file): no finished objects are
    #: recorded in it nor skipped by it.
    sessions_only: bool = False
    #: The items are a listing's (checked against the destination as a listing's are), not a
    #: sync's plan (which decided what to update itself).
    items_listed: bool = True
    #: Return each object written with its CRC32C and ETag (a sync records them).
    report_written: bool = False


@dataclass(frozen=True)
class PartitionResult:
    index: int
    #: Every event of the partition, in order, progress events of one object added together.
    events: tuple[PortableEvent, ...]
    summary: PortableSummary
    #: The error that stops the whole run (credentials refused, bucket missing), if one did.
    abort: PortableError | None = None
    #: Each object written, its CRC32C and ETag (with ``report_written``).
    written: tuple[tuple[TransferItem, str | None, str | None], ...] = ()


def run_partition(job: PartitionJob, index: int, items: Sequence[TransferItem]) -> PartitionResult:
    """The Dask task (run in a worker's thread, with an event loop of its own). Errors come back
    in the result: dicom-cloud's errors are not pickled faithfully."""
    try:
        return asyncio.run(_run(job, index, items))
    except DicomCloudError as error:  # options or locations refused before any object
        return PartitionResult(index, (), PortableSummary.of(TransferSummary()), PortableError.of(error))


async def _run(job: PartitionJob, index: int, items: Sequence[TransferItem]) -> PartitionResult:
    from ..cli.options import config_from_args, options_from_args
    from ..transfer import Transfer

    arguments = argparse.Namespace(**job.arguments)
    options = options_from_args(arguments)
    config = config_from_args(arguments, encrypt=arguments.encrypt, sse_kms_key_id=arguments.sse_kms_key_id)
    events = _Events()
    opener = LocationOpener(config)
    journal: Journal | None = None
    if job.journal_url is not None and job.journal_spec is not None:
        from .pg_journal import PostgresJournal

        journal = PostgresJournal(job.journal_url, job.journal_spec)
    elif job.journal_path is not None and job.journal_spec is not None:
        journal = SharedJournal(Path(job.journal_path), job.journal_spec)
    sessions = journal if job.sessions_only else None
    abort: PortableError | None = None
    written: list[tuple[TransferItem, str | None, str | None]] = []

    def on_done(item: TransferItem, crc32c: str | None, etag: str | None) -> None:
        written.append((item, crc32c, etag))

    try:
        transfer = Transfer(
            opener.open(job.source),
            opener.open(job.destination),
            recursive=True,
            options=options,
            on_event=events,
            journal=None if job.sessions_only else journal,
            sessions=sessions,
            items=_stream(items),
            items_listed=job.items_listed,
            preflight=False,  # the client's, once for the run
            on_done=on_done if job.report_written else None,
        )
        try:
            await transfer.run()
        except DicomCloudError as error:
            abort = PortableError.of(error)
        summary = transfer.summary
    finally:
        if journal is not None:
            journal.close()
        await opener.close()
    return PartitionResult(index, tuple(events.collected), PortableSummary.of(summary), abort, tuple(written))


async def _stream(items: Sequence[TransferItem]) -> AsyncIterator[TransferItem]:
    for item in items:
        yield item


class _Events:
    """Collects a partition's events for the client; one object's progress events become one."""

    def __init__(self) -> None:
        self.collected: list[PortableEvent] = []
        self._progress: dict[str, TransferEvent] = {}

    def __call__(self, event: TransferEvent) -> None:
        if event.kind == "progress":
            earlier = self._progress.get(event.src)
            if earlier is not None:
                event = TransferEvent(
                    "progress", event.src, event.dst, event.size, bytes=earlier.bytes + event.bytes
                )
            self._progress[event.src] = event
            return
        if event.kind == "counted":
            return  # the client counts the listing itself
        progress = self._progress.pop(event.src, None)
        if progress is not None and progress.bytes:
            self.collected.append(PortableEvent.of(progress))
        self.collected.append(PortableEvent.of(event))
