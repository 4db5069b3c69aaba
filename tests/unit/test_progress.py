"""Progress that tells the truth: totals counted ahead of the transfer, objects finished by an earlier
run kept apart, done never above the total; and how the CLI renders it (plain lines, JSON)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from pathlib import Path

import pytest

from dicom_cloud.backends import open_store
from dicom_cloud.cli.render import TransferProgress, human_duration
from dicom_cloud.errors import NotFoundError
from dicom_cloud.filters import Filter
from dicom_cloud.journal import JobSpec, Journal
from dicom_cloud.location import Location
from dicom_cloud.store import MultipartPlan, ObjectInfo, PutOptions, PutResult, Store
from dicom_cloud.transfer import ListingTotals, Transfer, TransferEvent, TransferOptions
from dicom_cloud.url import StorageURL, parse_url


def _memory_tree(count: int, size: int = 10) -> Location:
    bucket = f"progress-{uuid.uuid4().hex[:12]}"
    store = open_store(f"memory://{bucket}")

    async def fill() -> None:
        for i in range(count):
            await store.put(f"src/{i:05d}.dcm", bytes([i % 256]) * size)

    asyncio.run(fill())
    return Location(url=StorageURL("memory", bucket, "src/"), store=store, key="src/")


def _memory_destination() -> Location:
    bucket = f"progress-dst-{uuid.uuid4().hex[:12]}"
    return Location(
        url=StorageURL("memory", bucket, "dst/"), store=open_store(f"memory://{bucket}"), key="dst/"
    )


class Checked:
    """Feeds a renderer (quiet) and checks after every event that done never exceeds the total."""

    def __init__(self) -> None:
        self.progress = TransferProgress("quiet", "Copied")
        self.events: list[TransferEvent] = []

    def __call__(self, event: TransferEvent) -> None:
        self.events.append(event)
        self.progress(event)
        assert self.progress.files_done <= self.progress.files_total, (event, vars(self.progress))
        assert self.progress.bytes_done <= self.progress.bytes_total, (event, vars(self.progress))


class GatedSink(Store):
    """A destination whose writes wait until the run's totals are complete: if counting depended on
    the transfer moving, this would never finish."""

    scheme = "memory"
    bucket = "gated"

    def __init__(self) -> None:
        self.counted = asyncio.Event()
        self.written = 0

    async def stat(self, key: str) -> ObjectInfo:
        raise NotFoundError(key)

    async def list(self, prefix: str = "", *, recursive: bool = True) -> AsyncIterator[ObjectInfo]:
        return
        yield

    async def put(self, key: str, data: bytes | memoryview, options: PutOptions = PutOptions()) -> PutResult:
        await self.counted.wait()
        self.written += 1
        return PutResult(etag=None)

    async def get(self, key: str) -> bytes:
        raise NotFoundError(key)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        raise NotFoundError(key)

    def stream(
        self, key: str, *, chunk_size: int = 1024 * 1024, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes | memoryview]:
        raise NotFoundError(key)

    async def delete(self, keys: Sequence[str]) -> None:
        raise AssertionError("not used")

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes | memoryview],
        options: PutOptions = PutOptions(),
        plan: MultipartPlan = MultipartPlan(),
    ) -> PutResult:
        raise AssertionError("not used")


def test_totals_are_counted_ahead_of_the_transfer_and_complete_before_the_first_completion() -> None:
    count = 5000
    src = _memory_tree(count)
    sink = GatedSink()
    checked = Checked()

    def on_event(event: TransferEvent) -> None:
        checked(event)
        if event.kind == "counted" and event.totals is not None and event.totals.complete:
            sink.counted.set()

    dst = Location(url=StorageURL("memory", "gated", "q/"), store=sink, key="q/")
    transfer = Transfer(src, dst, recursive=True, options=TransferOptions(parallel=4), on_event=on_event)
    summary = asyncio.run(asyncio.wait_for(transfer.run(), timeout=120))
    assert summary.files == sink.written == count

    kinds = [e.kind for e in checked.events]
    first_completed = kinds.index("completed")
    counted = [e for e in checked.events[:first_completed] if e.kind == "counted"]
    assert counted and counted[-1].totals == ListingTotals(files=count, bytes=10 * count, complete=True)
    assert [e.totals.files for e in counted if e.totals] == sorted(
        e.totals.files for e in counted if e.totals
    )
    assert kinds.count("counted") == len(counted)  # nothing counted after the end
    assert checked.progress.files_total == checked.progress.files_done == count
    assert checked.progress.totals_known


def test_a_resumed_run_shows_what_earlier_runs_did_apart(tmp_path: Path) -> None:
    count, earlier = 1369, 582
    src = _memory_tree(count)
    dst = _memory_destination()
    spec = JobSpec(verb="copy", source="memory://a/src/", destination="memory://b/dst/", options={})
    first = Journal.open(spec, tmp_path)
    # The interrupted run: it finished the first 582 objects (and was killed before its end).
    done_names = [f"{i:05d}.dcm" for i in range(earlier)]
    partial = Transfer(
        src,
        dst,
        recursive=True,
        options=TransferOptions(filter=Filter(files_from=_names_file(tmp_path, done_names))),
        journal=first,
    )
    assert asyncio.run(partial.run()).files == earlier
    first.close()

    journal = Journal.open(spec, tmp_path)
    checked = Checked()
    summary = asyncio.run(Transfer(src, dst, recursive=True, journal=journal, on_event=checked).run())
    journal.close()
    assert (summary.files, summary.resumed) == (count - earlier, earlier)

    progress = checked.progress
    final = [e.totals for e in checked.events if e.kind == "counted" and e.totals and e.totals.complete]
    assert final == [ListingTotals(count, 10 * count, earlier, 10 * earlier, complete=True)]
    # Never "1369/787 files": the total is what this run does, the earlier run's share is apart.
    assert (progress.files_done, progress.files_total, progress.already_done) == (
        count - earlier,
        count - earlier,
        earlier,
    )
    skipped = [e for e in checked.events if e.kind == "skipped"]
    assert len(skipped) == earlier and all(e.already_done for e in skipped)
    line = progress.plain_line()
    assert f"{count - earlier}/{count - earlier} files" in line and f"{earlier} already done" in line


def _names_file(tmp_path: Path, names: list[str]) -> Path:
    path = tmp_path / "names.txt"
    path.write_text("\n".join(names) + "\n")
    return path


def test_plain_lines_mark_totals_still_being_counted() -> None:
    progress = TransferProgress("quiet", "Downloaded")
    progress(TransferEvent("counted", "s3://b/p/", "out/", 4000, totals=ListingTotals(2000, 4000)))
    for i in range(3):
        progress(TransferEvent("started", f"s3://b/p/{i}", f"out/{i}", 2))
        progress(TransferEvent("completed", f"s3://b/p/{i}", f"out/{i}", 2, bytes=2))
    line = progress.plain_line(progress.started + 2.0)
    assert "3/2000+ files" in line and "6 B of 4.0 KB+" in line and "ETA" not in line
    progress(
        TransferEvent("counted", "s3://b/p/", "out/", 8000, totals=ListingTotals(4000, 8000, complete=True))
    )
    line = progress.plain_line(progress.started + 2.0)
    assert "3/4000 files" in line and "6 B of 8.0 KB" in line and "ETA" in line
    progress(TransferEvent("started", "s3://b/p/x", "out/x", 2))
    progress(TransferEvent("failed", "s3://b/p/x", "out/x", 2, error=NotFoundError("gone")))
    assert progress.plain_line().endswith("1 failed")


def test_json_records_of_counts_and_already_done_skips(capsys: pytest.CaptureFixture[str]) -> None:
    progress = TransferProgress("json", "Downloaded")
    totals = ListingTotals(1369, 2_000_000, 582, 900_000, complete=True)
    progress(TransferEvent("counted", "s3://b/p/", "out/", totals.bytes, totals=totals))
    progress(TransferEvent("skipped", "s3://b/p/a", "out/a", 10, already_done=True))
    progress(TransferEvent("skipped", "s3://b/p/b", "out/b", 10))
    counted, resumed, skipped = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert counted == {
        "event": "counted", "src": "s3://b/p/", "dst": "out/", "size": 2_000_000, "files": 1369,
        "bytes": 2_000_000, "already_done": 582, "already_done_bytes": 900_000, "complete": True,
    }  # fmt: skip
    assert resumed["already_done"] is True and "already_done" not in skipped


def test_durations_read_as_people_write_them() -> None:
    assert [human_duration(s) for s in (0, 59.4, 61, 3599, 3600, 7380)] == [
        "0s",
        "59s",
        "1m01s",
        "59m59s",
        "1h00m",
        "2h03m",
    ]


def test_the_counting_listing_does_not_repeat_the_warnings_of_the_tree(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.dcm").write_bytes(b"a")
    (src / "broken").symlink_to(tmp_path / "nowhere")
    out = tmp_path / "out"
    caplog.set_level(logging.WARNING)
    checked = Checked()
    transfer = Transfer(
        Location(url=parse_url(str(src) + "/"), store=open_store("file:///"), key=str(src).lstrip("/") + "/"),
        Location(url=parse_url(str(out) + "/"), store=open_store("file:///"), key=str(out).lstrip("/") + "/"),
        recursive=True,
        on_event=checked,
    )
    assert asyncio.run(transfer.run()).files == 1
    assert [r.getMessage() for r in caplog.records].count(
        f"skipping {src / 'broken'}: broken symbolic link or unreadable"
    ) == 1
    assert [e.totals for e in checked.events if e.kind == "counted"] == [ListingTotals(1, 1, complete=True)]
