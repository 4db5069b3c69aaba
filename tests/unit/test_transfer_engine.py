from __future__ import annotations

import asyncio
import contextlib
import os
import unicodedata
from collections import defaultdict
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from pathlib import Path

import pytest

from dicom_cloud import api
from dicom_cloud.backends import open_store
from dicom_cloud.engine.planner import COUNTED_EVERY
from dicom_cloud.errors import IntegrityError, NotFoundError, UnsafeNameError, UsageError
from dicom_cloud.localio import PARTIAL_SUFFIX
from dicom_cloud.location import Location
from dicom_cloud.store import (
    CHECKSUM_METADATA_KEY,
    MultipartPlan,
    ObjectInfo,
    PutOptions,
    PutResult,
    Store,
)
from dicom_cloud.transfer import (
    MiB,
    Transfer,
    TransferEvent,
    TransferOptions,
    TransferSummary,
    check_local_name,
    crc32c_hex,
)
from dicom_cloud.url import StorageURL, parse_url

TREE = {
    "a.dcm": b"A" * 100,
    "series 1/b.dcm": b"B" * 2000,
    "series 1/deep/c.dcm": b"C" * 3,
    "series 1/deep/empty.dcm": b"",
    "series-2/d.dcm": os.urandom(5000),
    "z/ünï.dcm": b"unicode",
}


def _write_tree(root: Path, tree: dict[str, bytes]) -> None:
    for name, data in tree.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _memory(bucket: str) -> dict[str, bytes]:
    store = open_store(f"memory://{bucket}")

    async def collect() -> dict[str, bytes]:
        return {i.key: bytes(await store.get(i.key)) async for i in store.list("")}

    return asyncio.run(collect())


def _mem_put(bucket: str, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
    store = open_store(f"memory://{bucket}")
    asyncio.run(
        store.put(key, data, PutOptions(metadata=metadata or {CHECKSUM_METADATA_KEY: crc32c_hex(data)}))
    )


class Recorder:
    def __init__(self) -> None:
        self.events: list[TransferEvent] = []

    def __call__(self, event: TransferEvent) -> None:
        self.events.append(event)

    def kinds(self) -> set[str]:
        return {e.kind for e in self.events}

    def bytes_by_source(self) -> dict[str, int]:
        moved: dict[str, int] = defaultdict(int)
        for e in self.events:
            if e.kind in ("progress", "completed"):
                moved[e.src] += e.bytes
        return dict(moved)


# -- trees and naming ----------------------------------------------------------------------


@pytest.mark.parametrize("trailing", ["/", ""])
def test_tree_round_trip_through_memory(tmp_path: Path, mem_bucket: str, trailing: str) -> None:
    src = tmp_path / "study"
    _write_tree(src, TREE)
    events = Recorder()
    summary = api.upload(
        str(src) + trailing, f"memory://{mem_bucket}/archive/1/", recursive=True, on_event=events
    )
    assert summary.ok and summary.files == len(TREE)
    assert summary.bytes == sum(len(v) for v in TREE.values())
    # The directory's contents go directly under the prefix (not under archive/1/study/).
    assert _memory(mem_bucket) == {f"archive/1/{k}": v for k, v in TREE.items()}
    assert events.bytes_by_source() == {str(src / k): len(v) for k, v in TREE.items()}

    out = tmp_path / "out"
    summary = api.download(f"memory://{mem_bucket}/archive/1/", str(out) + "/", recursive=True)
    assert summary.ok and summary.files == len(TREE)
    assert _read_tree(out) == TREE


def test_upload_to_prefix_without_trailing_slash(tmp_path: Path, mem_bucket: str) -> None:
    _write_tree(tmp_path / "s", {"x/y.dcm": b"1"})
    api.upload(str(tmp_path / "s"), f"memory://{mem_bucket}/pre", recursive=True)
    assert list(_memory(mem_bucket)) == ["pre/x/y.dcm"]


def test_download_prefix_is_plain_directory_not_string_prefix(tmp_path: Path, mem_bucket: str) -> None:
    for key in ["s/ser1/a", "s/ser10/b"]:
        _mem_put(mem_bucket, key, b"x")
    api.download(f"memory://{mem_bucket}/s/ser1", str(tmp_path / "o"), recursive=True)
    assert _read_tree(tmp_path / "o") == {"a": b"x"}


def test_single_file_into_directory_keeps_basename(tmp_path: Path, mem_bucket: str) -> None:
    (tmp_path / "scan.dcm").write_bytes(b"scan")
    api.upload(str(tmp_path / "scan.dcm"), f"memory://{mem_bucket}/dir/")
    api.upload(str(tmp_path / "scan.dcm"), f"memory://{mem_bucket}/renamed.dcm")
    assert _memory(mem_bucket) == {"dir/scan.dcm": b"scan", "renamed.dcm": b"scan"}

    api.download(f"memory://{mem_bucket}/dir/scan.dcm", str(tmp_path / "new-dir") + "/")
    assert (tmp_path / "new-dir" / "scan.dcm").read_bytes() == b"scan"
    (tmp_path / "existing").mkdir()
    api.download(f"memory://{mem_bucket}/dir/scan.dcm", str(tmp_path / "existing"))  # no slash, is a dir
    assert (tmp_path / "existing" / "scan.dcm").read_bytes() == b"scan"
    api.download(f"memory://{mem_bucket}/dir/scan.dcm", str(tmp_path / "as-file.dcm"))
    assert (tmp_path / "as-file.dcm").read_bytes() == b"scan"


def test_memory_to_memory_copy_and_server_side_copy(mem_bucket: str) -> None:
    _mem_put(mem_bucket, "src/a", b"aaa")
    _mem_put(mem_bucket, "src/b/c", b"ccc")
    api.copy(f"memory://{mem_bucket}/src/", f"memory://{mem_bucket}/dst/", recursive=True)  # same store
    other = mem_bucket + "-other"
    api.copy(f"memory://{mem_bucket}/src/", f"memory://{other}/", recursive=True)  # across stores
    assert _memory(mem_bucket)["dst/b/c"] == b"ccc"
    assert _memory(other) == {"a": b"aaa", "b/c": b"ccc"}


def test_nfd_local_names_become_nfc_keys(tmp_path: Path, mem_bucket: str) -> None:
    nfd = unicodedata.normalize("NFD", "séries/é.dcm")
    _write_tree(tmp_path / "s", {nfd: b"x"})
    api.upload(str(tmp_path / "s"), f"memory://{mem_bucket}/", recursive=True)
    keys = list(_memory(mem_bucket))
    assert keys == [unicodedata.normalize("NFC", "séries/é.dcm")]
    assert keys[0] != nfd


def test_nfd_single_file_into_prefix_becomes_nfc(tmp_path: Path, mem_bucket: str) -> None:
    nfd = unicodedata.normalize("NFD", "é.dcm")
    (tmp_path / nfd).write_bytes(b"x")
    api.upload(str(tmp_path / nfd), f"memory://{mem_bucket}/dir/")
    assert list(_memory(mem_bucket)) == ["dir/" + unicodedata.normalize("NFC", "é.dcm")]


def test_missing_sources(tmp_path: Path, mem_bucket: str) -> None:
    with pytest.raises(NotFoundError):
        api.upload(str(tmp_path / "nope"), f"memory://{mem_bucket}/x")
    with pytest.raises(NotFoundError):
        api.upload(str(tmp_path / "nope"), f"memory://{mem_bucket}/x/", recursive=True)
    with pytest.raises(NotFoundError):
        api.download(f"memory://{mem_bucket}/nothing/", str(tmp_path / "o"), recursive=True)
    (tmp_path / "dir").mkdir()
    with pytest.raises(UsageError, match="directory") as refused:
        api.upload(str(tmp_path / "dir"), f"memory://{mem_bucket}/x")
    assert "--recursive" in (refused.value.hint or "")
    _mem_put(mem_bucket, "pre/a", b"1")
    with pytest.raises(UsageError, match="prefix"):
        api.download(f"memory://{mem_bucket}/pre", str(tmp_path / "o"))
    with pytest.raises(UsageError):
        api.download(f"memory://{mem_bucket}/pre/a", f"memory://{mem_bucket}/b")  # not local
    with pytest.raises(UsageError):
        api.upload(f"memory://{mem_bucket}/pre/a", str(tmp_path / "o"))  # not local
    assert api.upload(str(tmp_path / "dir"), f"memory://{mem_bucket}/e/", recursive=True).files == 0


# -- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["..", "../x", "a/../../x", ".", "a/./b", "", "a//b", "a/", "/abs", "a\\..\\b", "a\\b", "a\x00b"],
)
def test_check_local_name_refuses(name: str) -> None:
    with pytest.raises(UnsafeNameError):
        check_local_name(name)


@pytest.mark.parametrize("name", ["a", "a/b.dcm", "..a", "a..", "...", "a b/ü.dcm", ".hidden"])
def test_check_local_name_accepts(name: str) -> None:
    check_local_name(name)


class FakeSource(Store):
    """A read-only store whose listing holds whatever names a hostile bucket might."""

    scheme = "memory"
    bucket = "fake"

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    async def stat(self, key: str) -> ObjectInfo:
        if key not in self.objects:
            raise NotFoundError(key)
        return ObjectInfo(key=key, size=len(self.objects[key]))

    async def list(self, prefix: str = "", *, recursive: bool = True) -> AsyncIterator[ObjectInfo]:
        for key in sorted(self.objects, key=str.encode):
            if key.startswith(prefix):
                yield ObjectInfo(key=key, size=len(self.objects[key]))

    async def get(self, key: str) -> bytes:
        return self.objects[key]

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        return self.objects[key][start:end]

    async def stream(self, key: str, *, chunk_size: int = 1024 * 1024) -> AsyncIterator[bytes]:
        yield self.objects[key]

    async def put(self, key: str, data: bytes | memoryview, options: PutOptions = PutOptions()) -> PutResult:
        raise AssertionError("read-only")

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        options: PutOptions = PutOptions(),
        plan: MultipartPlan = MultipartPlan(),
    ) -> PutResult:
        raise AssertionError("read-only")

    async def delete(self, keys: Sequence[str]) -> None:
        raise AssertionError("read-only")


def _location(store: Store, key: str) -> Location:
    return Location(url=StorageURL("memory", store.bucket, key), store=store, key=key)


def _local_location(path: str) -> Location:
    url = parse_url(path)
    return Location(url=url, store=open_store(url), key=url.key.lstrip("/"))


def test_hostile_names_fail_per_item_and_stay_inside(tmp_path: Path) -> None:
    src = FakeSource(
        {
            "p/good.dcm": b"good",
            "p/a//b.dcm": b"evil",
            "p/x\\..\\evil.dcm": b"evil",
        }
    )
    dest = tmp_path / "dest"
    transfer = Transfer(_location(src, "p/"), _local_location(str(dest) + "/"), recursive=True)
    summary = asyncio.run(transfer.run())
    assert summary.files == 1
    assert len(summary.failed) == 2
    assert all(isinstance(exc, UnsafeNameError) for _, exc in summary.failed)
    assert _read_tree(tmp_path) == {"dest/good.dcm": b"good"}


def test_directory_marker_objects_do_not_fail_a_download(tmp_path: Path) -> None:
    src = FakeSource({"p/series/": b"", "p/series/a.dcm": b"a"})
    dest = tmp_path / "dest"
    summary = asyncio.run(
        Transfer(_location(src, "p/"), _local_location(str(dest) + "/"), recursive=True).run()
    )
    assert summary.failed == []
    assert _read_tree(dest) == {"series/a.dcm": b"a"}


@pytest.mark.parametrize("bad", ["p/../evil.dcm", "p/./evil.dcm", "p/sub/../../evil.dcm"])
def test_dot_segments_never_escape_the_destination(tmp_path: Path, bad: str) -> None:
    src = FakeSource({bad: b"evil", "p/good.dcm": b"good"})
    dest = tmp_path / "inner" / "dest"
    transfer = Transfer(_location(src, "p/"), _local_location(str(dest) + "/"), recursive=True)

    async def run() -> object:
        async with asyncio.timeout(5):
            return await transfer.run()

    with contextlib.suppress(UnsafeNameError):
        asyncio.run(run())
    assert not (tmp_path / "inner" / "evil.dcm").exists()
    assert not (tmp_path / "evil.dcm").exists()
    assert not (dest / "evil.dcm").exists()


@pytest.mark.parametrize("parallel", [1, 4])
def test_dot_segment_name_is_one_failed_item(tmp_path: Path, parallel: int) -> None:
    objects = {"p/../evil.dcm": b"evil"} | {f"p/f{i:02d}.dcm": b"ok" for i in range(20)}
    dest = tmp_path / "dest"
    transfer = Transfer(
        _location(FakeSource(objects), "p/"),
        _local_location(str(dest) + "/"),
        recursive=True,
        options=TransferOptions(parallel=parallel),
    )

    async def run() -> TransferSummary:
        async with asyncio.timeout(1):
            return await transfer.run()

    summary = asyncio.run(run())
    assert summary.files == 20
    assert len(summary.failed) == 1 and isinstance(summary.failed[0][1], UnsafeNameError)


# -- integrity -----------------------------------------------------------------------------


def test_checksum_mismatch_fails_and_writes_nothing(tmp_path: Path, mem_bucket: str) -> None:
    _mem_put(mem_bucket, "bad.dcm", b"tampered bytes", {CHECKSUM_METADATA_KEY: crc32c_hex(b"original")})
    out = tmp_path / "out"
    out.mkdir()
    events = Recorder()
    summary = api.download(f"memory://{mem_bucket}/bad.dcm", str(out / "bad.dcm"), on_event=events)
    assert len(summary.failed) == 1 and isinstance(summary.failed[0][1], IntegrityError)
    assert summary.files == 0
    assert os.listdir(out) == []
    assert "failed" in events.kinds() and "completed" not in events.kinds()

    other = mem_bucket + "-copy"
    summary = api.copy(f"memory://{mem_bucket}/bad.dcm", f"memory://{other}/bad.dcm")
    assert isinstance(summary.failed[0][1], IntegrityError)
    assert _memory(other) == {}


def test_large_object_checksum_mismatch_leaves_no_partial_file(tmp_path: Path, mem_bucket: str) -> None:
    data = os.urandom(11 * MiB)
    _mem_put(mem_bucket, "big.bin", data, {CHECKSUM_METADATA_KEY: "00000000"})
    options = TransferOptions(multipart_threshold=5 * MiB, part_size=5 * MiB)
    events = Recorder()
    summary = api.download(
        f"memory://{mem_bucket}/big.bin", str(tmp_path) + "/", options=options, on_event=events
    )
    assert isinstance(summary.failed[0][1], IntegrityError)
    assert os.listdir(tmp_path) == []
    # Progress reported for the failed object is taken back.
    assert sum(events.bytes_by_source().values()) == 0


def test_objects_written_carry_their_checksum(tmp_path: Path, mem_bucket: str) -> None:
    (tmp_path / "a.dcm").write_bytes(b"payload")
    api.upload(str(tmp_path / "a.dcm"), f"memory://{mem_bucket}/a.dcm")
    info = api.stat(f"memory://{mem_bucket}/a.dcm")
    assert info.metadata[CHECKSUM_METADATA_KEY] == crc32c_hex(b"payload")
    assert info.content_type == "application/octet-stream"  # named .dcm, but not DICOM


# -- options -------------------------------------------------------------------------------


def test_no_overwrite_skips_existing(tmp_path: Path, mem_bucket: str) -> None:
    _write_tree(tmp_path / "s", {"a.dcm": b"new a", "b.dcm": b"new b"})
    _mem_put(mem_bucket, "p/a.dcm", b"old a")
    events = Recorder()
    options = TransferOptions(no_overwrite=True)
    summary = api.upload(
        str(tmp_path / "s"), f"memory://{mem_bucket}/p/", recursive=True, options=options, on_event=events
    )
    assert (summary.files, summary.skipped, summary.ok) == (1, 1, True)
    assert _memory(mem_bucket) == {"p/a.dcm": b"old a", "p/b.dcm": b"new b"}
    assert [e.src for e in events.events if e.kind == "skipped"] == [str(tmp_path / "s" / "a.dcm")]

    out = tmp_path / "out"
    _write_tree(out, {"a.dcm": b"local a"})
    summary = api.download(f"memory://{mem_bucket}/p/", str(out), recursive=True, options=options)
    assert (summary.files, summary.skipped) == (1, 1)
    assert _read_tree(out) == {"a.dcm": b"local a", "b.dcm": b"new b"}

    # Same store: the server-side copy path refuses too.
    _mem_put(mem_bucket, "q/a.dcm", b"q a")
    summary = api.copy(
        f"memory://{mem_bucket}/p/", f"memory://{mem_bucket}/q/", recursive=True, options=options
    )
    assert (summary.files, summary.skipped) == (1, 1)
    assert _memory(mem_bucket)["q/a.dcm"] == b"q a"


def test_dry_run_writes_nothing(tmp_path: Path, mem_bucket: str) -> None:
    _write_tree(tmp_path / "s", TREE)
    events = Recorder()
    options = TransferOptions(dry_run=True)
    summary = api.upload(
        str(tmp_path / "s"), f"memory://{mem_bucket}/p/", recursive=True, options=options, on_event=events
    )
    assert summary.dry_run and summary.files == len(TREE)
    assert summary.bytes == sum(len(v) for v in TREE.values())
    assert events.kinds() == {"planned"}
    assert len(events.events) == len(TREE)
    assert _memory(mem_bucket) == {}

    _mem_put(mem_bucket, "r/a.dcm", b"1")
    events = Recorder()
    summary = api.download(
        f"memory://{mem_bucket}/r/", str(tmp_path / "o"), recursive=True, options=options, on_event=events
    )
    assert events.kinds() == {"planned"}
    assert not (tmp_path / "o").exists()


def test_options_validation() -> None:
    with pytest.raises(UsageError):
        TransferOptions(parallel=0)
    with pytest.raises(UsageError):
        TransferOptions(part_size=5 * MiB - 1)
    with pytest.raises(UsageError):
        TransferOptions(multipart_threshold=0)


# -- events and large objects --------------------------------------------------------------


def test_large_object_ranged_download_events_add_up(tmp_path: Path, mem_bucket: str) -> None:
    data = os.urandom(23 * MiB)
    _mem_put(mem_bucket, "big/ct.bin", data)
    _mem_put(mem_bucket, "big/small.dcm", b"s" * 1000)
    options = TransferOptions(multipart_threshold=5 * MiB, part_size=5 * MiB)
    events = Recorder()
    summary = api.download(
        f"memory://{mem_bucket}/big/", str(tmp_path / "out"), recursive=True, options=options, on_event=events
    )
    assert summary.ok and summary.files == 2
    assert (tmp_path / "out" / "ct.bin").read_bytes() == data
    big_url = f"memory://{mem_bucket}/big/ct.bin"
    progress = [e for e in events.events if e.kind == "progress" and e.src == big_url]
    assert len(progress) >= 5  # at least one event per ranged read (ceil(23 / 5) parts)
    assert events.bytes_by_source() == {big_url: len(data), f"memory://{mem_bucket}/big/small.dcm": 1000}
    assert sum(events.bytes_by_source().values()) == summary.bytes == len(data) + 1000
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(PARTIAL_SUFFIX)]


def test_large_object_upload_and_streamed_copy_events_add_up(tmp_path: Path, mem_bucket: str) -> None:
    data = os.urandom(12 * MiB + 7)
    (tmp_path / "big.bin").write_bytes(data)
    options = TransferOptions(multipart_threshold=5 * MiB, part_size=5 * MiB)
    events = Recorder()
    api.upload(str(tmp_path / "big.bin"), f"memory://{mem_bucket}/big.bin", options=options, on_event=events)
    assert sum(events.bytes_by_source().values()) == len(data)
    info = api.stat(f"memory://{mem_bucket}/big.bin")
    assert info.metadata[CHECKSUM_METADATA_KEY] == crc32c_hex(data)

    other = mem_bucket + "-copy"
    events = Recorder()
    summary = api.copy(
        f"memory://{mem_bucket}/big.bin", f"memory://{other}/big.bin", options=options, on_event=events
    )
    assert summary.ok
    assert sum(events.bytes_by_source().values()) == len(data)
    assert len([e for e in events.events if e.kind == "progress"]) >= 3
    assert _memory(other) == {"big.bin": data}


# -- bounded planning ----------------------------------------------------------------------


class SlowSink(Store):
    """A destination that accepts everything, slowly, and records how far planning ran ahead."""

    scheme = "memory"
    bucket = "sink"

    def __init__(self) -> None:
        self.written = 0

    async def stat(self, key: str) -> ObjectInfo:
        raise NotFoundError(key)

    async def list(self, prefix: str = "", *, recursive: bool = True) -> AsyncIterator[ObjectInfo]:
        return
        yield

    async def get(self, key: str) -> bytes:
        raise NotFoundError(key)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        raise NotFoundError(key)

    async def stream(self, key: str, *, chunk_size: int = 1024 * 1024) -> AsyncIterator[bytes]:
        raise NotFoundError(key)
        yield b""

    async def put(self, key: str, data: bytes | memoryview, options: PutOptions = PutOptions()) -> PutResult:
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        self.written += 1
        return PutResult(etag=None)

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        options: PutOptions = PutOptions(),
        plan: MultipartPlan = MultipartPlan(),
    ) -> PutResult:
        raise AssertionError("not used for tiny items")

    async def delete(self, keys: Sequence[str]) -> None:
        return None


class CountingSource(FakeSource):
    def __init__(self, count: int) -> None:
        super().__init__({})
        self.count = count
        #: Objects listed so far, per listing (the planner's, and the counting pass's ahead of it).
        self.listings: list[int] = []

    @property
    def listed(self) -> int:
        """How far the planner's listing has got: the one behind."""
        return min(self.listings, default=0)

    async def list(self, prefix: str = "", *, recursive: bool = True) -> AsyncIterator[ObjectInfo]:
        self.listings.append(0)
        listing = len(self.listings) - 1
        for i in range(self.count):
            self.listings[listing] += 1
            yield ObjectInfo(key=f"{prefix}{i:06d}", size=1)

    async def read(self, key: str) -> tuple[ObjectInfo, bytes]:
        return ObjectInfo(key=key, size=1), b"x"


def test_planning_runs_at_most_a_bounded_queue_ahead() -> None:
    parallel = 4
    src = CountingSource(10_000)
    sink = SlowSink()
    started = 0
    worst = 0

    def on_event(event: TransferEvent) -> None:
        nonlocal started, worst
        if event.kind == "started":
            started += 1
        worst = max(worst, src.listed - started)

    options = TransferOptions(parallel=parallel)
    transfer = Transfer(
        _location(src, "p/"), _location(sink, "q/"), recursive=True, options=options, on_event=on_event
    )
    summary = asyncio.run(transfer.run())
    assert summary.files == sink.written == 10_000
    # The first COUNTED_EVERY listed before any is handed on (a source that ends within them is
    # counted from them), then queued items, plus the one the planner holds while the queue is full:
    # a bound that does not grow with the listing.
    assert worst <= COUNTED_EVERY + parallel * 4 + 1


def test_md5_is_checked_only_where_no_crc32c_is_recorded_and_the_etag_is_one() -> None:
    """What decides whether a whole object is checked in a worker thread (MD5) or inline (CRC32C)."""
    from dicom_cloud.engine.objectmeta import checks_md5

    md5 = "0" * 32
    plain = ObjectInfo(key="k", size=1, etag=md5)
    ours = ObjectInfo(key="k", size=1, etag=md5, metadata={CHECKSUM_METADATA_KEY: "00000000"})
    multipart = ObjectInfo(key="k", size=1, etag=md5 + "-3")
    assert checks_md5(plain, etag_is_md5=True)
    assert not checks_md5(plain, etag_is_md5=False)  # a store whose ETags are not MD5s
    assert not checks_md5(ours, etag_is_md5=True)
    assert not checks_md5(multipart, etag_is_md5=True)


@pytest.mark.parametrize(("count", "listings"), [(COUNTED_EVERY - 1, 1), (COUNTED_EVERY + 5, 2)])
def test_a_source_that_ends_within_a_count_is_listed_once(count: int, listings: int) -> None:
    """A study-sized source is counted from the planner's own listing, before its first object is
    handed on; a longer one is listed again by the counting pass ahead of the planner."""
    src = CountingSource(count)
    events: list[TransferEvent] = []
    transfer = Transfer(
        _location(src, "p/"),
        _location(SlowSink(), "q/"),
        recursive=True,
        options=TransferOptions(parallel=4),
        on_event=events.append,
    )
    summary = asyncio.run(transfer.run())
    assert summary.files == count
    assert len(src.listings) == listings
    kinds = [e.kind for e in events]
    complete = [i for i, e in enumerate(events) if e.kind == "counted" and e.totals and e.totals.complete]
    assert len(complete) == 1 and events[complete[0]].totals.files == count  # type: ignore[union-attr]
    if listings == 1:
        assert complete[0] < kinds.index("started")
