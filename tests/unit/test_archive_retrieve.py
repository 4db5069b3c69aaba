"""Retrieve: instances, frames, rendered previews and thumbnails (cached), and delete ordering."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import generate_frames

from archive_helpers import Run, make_instance, opened, read_test_file
from dicom_cloud.archive import Archive, ArchiveSettings, DeclaredFile, InstanceRecord
from dicom_cloud.errors import IntegrityError, NotFoundError, NotSupportedError, UsageError

STUDY, SERIES = "1.2.3", "1.2.3.1"


@pytest.fixture
def archive(mem_bucket: str) -> Iterator[tuple[Archive, Run]]:
    with opened(ArchiveSettings(f"memory://{mem_bucket}", "sqlite://", thumbnail_size=32)) as pair:
        yield pair


def _store(archive: tuple[Archive, Run], data: bytes, tenant: str = "acme") -> InstanceRecord:
    a, run = archive
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run(a.store_instance(tenant, data)).record


def _uids(r: InstanceRecord) -> tuple[str, str, str]:
    return r.study_instance_uid, r.series_instance_uid, r.sop_instance_uid


async def _keys(a: Archive) -> list[str]:
    return [o.key async for o in a.store.list("")]


def test_instances_and_read(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    datas = [make_instance(STUDY, SERIES, f"{SERIES}.{n}", InstanceNumber=n) for n in (3, 1, 2)]
    for d in datas:
        _store(archive, d)
    found = run(a.instances("acme", STUDY))
    assert [r.sop_instance_uid for r in found] == [f"{SERIES}.{n}" for n in (1, 2, 3)]
    assert run(a.read_instance(found[2])) == datas[0]
    assert len(run(a.instances("acme", STUDY, SERIES, f"{SERIES}.2"))) == 1
    for missing in ((STUDY, "9.9"), ("9.9",), (STUDY, SERIES, "9.9")):
        with pytest.raises(NotFoundError):
            run(a.instances("acme", *missing))


def test_native_frames(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    r = _store(archive, make_instance(STUDY, SERIES, f"{SERIES}.1", frames=3))
    frames = run(a.frames("acme", *_uids(r), [3, 1]))
    assert not frames.encapsulated and frames.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert frames.frames == [bytes([2, 0]) * 64, bytes([0, 0]) * 64]
    for bad in ([0], [4], []):
        with pytest.raises(UsageError):
            run(a.frames("acme", *_uids(r), bad))


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "JPEG2000.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "SC_rgb_rle_2frame.dcm",
        "SC_rgb_rle_32bit_2frame.dcm",
    ],
)
def test_encapsulated_frames_are_the_codestreams(archive: tuple[Archive, Run], name: str) -> None:
    a, run = archive
    data = read_test_file(name)
    r = _store(archive, data)
    ds = dcmread(BytesIO(data))
    count = int(ds.get("NumberOfFrames", 1) or 1)
    expected = list(generate_frames(ds.PixelData, number_of_frames=count))
    frames = run(a.frames("acme", *_uids(r), list(range(1, count + 1))))
    assert frames.encapsulated and frames.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert list(frames.frames) == expected


def test_frames_of_an_instance_without_pixels(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    r = _store(archive, make_instance(STUDY, SERIES, f"{SERIES}.1", pixels=False))
    with pytest.raises(NotFoundError):
        run(a.frames("acme", *_uids(r), [1]))
    with pytest.raises(NotFoundError):
        run(a.rendered("acme", *_uids(r)))


RENDERABLE = [
    "CT_small.dcm",  # native 16-bit, rescaled
    "MR_small_bigendian.dcm",  # explicit big endian
    "MR_small_RLE.dcm",  # RLE
    "JPEG2000.dcm",  # JPEG 2000 (openjpeg)
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS (libjpeg)
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, colour
    "JPGExtended.dcm",  # JPEG extended 12-bit
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless
    "examples_palette.dcm",  # palette colour
    "examples_ybr_color.dcm",
    "rtdose_rle.dcm",
    "image_dfl.dcm",  # deflated
]


@pytest.mark.parametrize("name", RENDERABLE)
@pytest.mark.parametrize("media_type", ["image/jpeg", "image/png"])
def test_rendered_pictures_decode(archive: tuple[Archive, Run], name: str, media_type: str) -> None:
    a, run = archive
    data = read_test_file(name)
    r = _store(archive, data)
    ds = dcmread(BytesIO(data))
    picture = run(a.rendered("acme", *_uids(r), media_type=media_type))
    assert picture.media_type == media_type and not picture.cached
    with Image.open(BytesIO(picture.data)) as image:
        assert image.format == {"image/jpeg": "JPEG", "image/png": "PNG"}[media_type]
        assert image.size == (int(ds.Columns), int(ds.Rows)) == (picture.width, picture.height)
        image.load()
        assert image.getextrema() != (0, 0)


def test_rendering_is_cached_as_a_derived_object(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    r = _store(archive, read_test_file("CT_small.dcm"))
    first = run(a.rendered("acme", *_uids(r)))
    again = run(a.rendered("acme", *_uids(r)))
    assert again.cached and again.data == first.data and (again.width, again.height) == (128, 128)
    thumb = run(a.rendered("acme", *_uids(r), thumbnail=True, media_type="image/png"))
    assert (thumb.width, thumb.height) == (32, 32)
    with Image.open(BytesIO(thumb.data)) as image:
        assert image.size == (32, 32)
    derived = sorted(k for k in run(_keys(a)) if "/derived/" in k)
    assert [k.rsplit("/", 1)[1] for k in derived] == ["frame-1-q90.jpg", "thumbnail-1-32.png"]


def test_rendering_options_are_checked(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    r = _store(archive, make_instance(STUDY, SERIES, f"{SERIES}.1", frames=2))
    with pytest.raises(NotSupportedError):
        run(a.rendered("acme", *_uids(r), media_type="image/gif"))
    with pytest.raises(UsageError):
        run(a.rendered("acme", *_uids(r), quality=0))
    with pytest.raises(UsageError):
        run(a.rendered("acme", *_uids(r), frame=3))
    assert run(a.rendered("acme", *_uids(r), frame=2)).width == 8


def test_delete_levels_and_objects(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    for series in ("1", "2"):
        for n in (1, 2):
            _store(archive, make_instance(STUDY, f"{STUDY}.{series}", f"{STUDY}.{series}.{n}"))
    other = _store(archive, make_instance("7.7", "7.7.1", "7.7.1.1"))
    run(a.rendered("acme", STUDY, f"{STUDY}.1", f"{STUDY}.1.1"))
    assert len(run(_keys(a))) == 11

    result = run(a.delete("acme", STUDY, f"{STUDY}.1", f"{STUDY}.1.1"))
    assert (result.studies, result.series, result.instances) == (0, 0, 1)
    assert len(run(_keys(a))) == 8  # instance, sidecar and the derived picture are gone
    result = run(a.delete("acme", STUDY, f"{STUDY}.1"))
    assert (result.studies, result.series, result.instances) == (0, 1, 1)
    result = run(a.delete("acme", STUDY))
    assert (result.studies, result.series, result.instances) == (1, 1, 2)
    assert len(run(_keys(a))) == 2
    assert run(a.search_studies("acme", {})) == [
        run(a.search_studies("acme", {"StudyInstanceUID": "7.7"}))[0]
    ]
    assert run(a.read_instance(other))
    with pytest.raises(NotFoundError):
        run(a.delete("acme", STUDY))


def test_delete_removes_rows_before_objects(
    archive: tuple[Archive, Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, run = archive
    _store(archive, make_instance(STUDY, SERIES, f"{SERIES}.1"))

    async def failing_delete(keys):  # type: ignore[no-untyped-def]
        raise OSError("store unreachable")

    monkeypatch.setattr(a.store, "delete", failing_delete)
    run(a.delete("acme", STUDY))  # the rows are gone: the objects left are invisible
    assert run(a.search_studies("acme", {})) == []
    assert len(run(_keys(a))) == 2
    monkeypatch.undo()
    # Storing it again works: the leftover objects are simply overwritten.
    _store(archive, make_instance(STUDY, SERIES, f"{SERIES}.1"))
    assert len(run(_keys(a))) == 2


def _check_read_instances(archive: tuple[Archive, Run]) -> list[bytes]:
    """Seven stored instances read back in order for any prefetch, and a reader that leaves after
    the first (the reads ahead are cancelled); the instances' bytes."""
    a, run = archive
    datas = [make_instance(STUDY, SERIES, f"{SERIES}.{n}", InstanceNumber=n) for n in range(1, 8)]
    for d in datas:
        _store(archive, d)
    records = run(a.instances("acme", STUDY))

    async def collect(prefetch: int) -> list[bytes]:
        return [data async for _, data in a.read_instances(records, prefetch=prefetch)]

    for prefetch in (1, 2, 3, 4, 50):
        assert run(collect(prefetch)) == datas

    async def first_only() -> bytes:
        async for _, data in a.read_instances(records):
            return data  # leaving early cancels the reads ahead
        raise AssertionError

    assert run(first_only()) == datas[0]
    return datas


def test_read_instances_streams_in_order(archive: tuple[Archive, Run]) -> None:
    _check_read_instances(archive)


def test_read_instances_from_local_disk_in_batches(tmp_path: Path) -> None:
    """On local disk instances are read a few per worker-thread call: the same bytes in the same
    order, and a damaged instance is an IntegrityError."""
    settings = ArchiveSettings(f"file://{tmp_path / 'objects'}", f"sqlite:///{tmp_path / 'index.sqlite'}")
    with opened(settings) as archive:
        a, run = archive
        datas = _check_read_instances(archive)
        files = [p for p in (tmp_path / "objects").rglob("*") if p.is_file()]
        [damaged] = [p for p in files if p.read_bytes() == datas[4]]
        damaged.write_bytes(datas[4][:-1] + bytes([datas[4][-1] ^ 1]))
        records = run(a.instances("acme", STUDY))

        async def collect() -> list[bytes]:
            return [data async for _, data in a.read_instances(records)]

        with pytest.raises(IntegrityError):
            run(collect())


def test_bulk_data(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    data = read_test_file("MR_small_RLE.dcm")
    r = _store(archive, data)
    pixels = run(a.bulkdata("acme", *_uids(r), "7FE00010"))
    assert pixels == dcmread(BytesIO(data)).PixelData
    with pytest.raises(NotFoundError):
        run(a.bulkdata("acme", *_uids(r), "60003000"))
    with pytest.raises(UsageError):
        run(a.bulkdata("acme", *_uids(r), "../x"))
    with pytest.raises(UsageError):
        run(a.bulkdata("acme", *_uids(r), "00100010"))


def test_local_directory_storage_and_sqlite_file(tmp_path: Path) -> None:
    settings = ArchiveSettings(str(tmp_path / "data"), f"sqlite:///{tmp_path}/index/index.db")
    data = make_instance(STUDY, SERIES, f"{SERIES}.1")
    with opened(settings) as (a, run):
        record = run(a.store_instance("acme", data)).record
    assert (tmp_path / "data" / record.object_key).read_bytes() == data
    with opened(settings) as (a, run):  # reopened: the index persisted
        [again] = run(a.instances("acme", STUDY))
        assert again == record
        assert run(a.read_instance(again)) == data


def test_orphaned_objects_are_collected(
    archive: tuple[Archive, Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, run = archive
    kept = _store(archive, make_instance(STUDY, SERIES, f"{SERIES}.1"))
    lost = _store(archive, make_instance("8.8", "8.8.1", "8.8.1.1"))
    run(a.rendered("acme", *_uids(kept)))
    run(a.rendered("acme", *_uids(lost)))
    _store(archive, make_instance("8.8", "8.8.1", "8.8.1.1"), tenant="beta")

    async def failing_delete(keys):  # type: ignore[no-untyped-def]
        raise OSError("store unreachable")

    with monkeypatch.context() as m:
        m.setattr(a.store, "delete", failing_delete)
        run(a.delete("acme", "8.8"))  # rows gone, objects left: orphans
    assert len(run(_keys(a))) == 8

    young = run(a.collect_orphans("acme"))  # default: only objects older than an hour
    assert (young.scanned, young.orphans, young.removed) == (6, 0, 0)
    dry = run(a.collect_orphans("acme", older_than=timedelta(0), dry_run=True))
    assert (dry.orphans, dry.removed) == (3, 0)
    swept = run(a.collect_orphans("acme", older_than=timedelta(0)))
    assert (swept.orphans, swept.removed) == (3, 3)
    assert len(run(_keys(a))) == 5  # the kept instance (3 objects) and beta's (2)
    assert run(a.read_instance(kept))
    assert run(a.rendered("acme", *_uids(kept))).cached
    assert run(a.collect_orphans("beta", older_than=timedelta(0))).orphans == 0


def test_sweep_covers_every_tenant_and_removes_empty_staging_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sweep_orphans: the orphans of every tenant with objects (one whose only instance never got
    its row included), indexed objects untouched, and on a local directory the staging folders
    emptied before the grace period (a recent one stays)."""
    root = tmp_path / "objects"
    with opened(ArchiveSettings(str(root), f"sqlite:///{tmp_path}/index.sqlite")) as (a, run):
        kept = _store((a, run), make_instance(STUDY, SERIES, f"{SERIES}.1"))
        lost = _store((a, run), make_instance("8.8", "8.8.1", "8.8.1.1"), tenant="ghost")

        async def failing_delete(keys):  # type: ignore[no-untyped-def]
            raise OSError("store unreachable")

        with monkeypatch.context() as m:
            m.setattr(a.store, "delete", failing_delete)
            run(a.delete("ghost", "8.8"))  # rows gone, objects left: ghost holds only orphans
        old_folder = root / "acme" / "staging" / "old-session"
        new_folder = root / "acme" / "staging" / "new-session"
        (old_folder / "sub").mkdir(parents=True)
        new_folder.mkdir(parents=True)
        # A folder in use (an open upload session's) stays, and so does its file; a staged file
        # of no session at all (what a crash leaves of a STOW-RS request) is an orphan.
        busy = run(a.create_upload("acme", [DeclaredFile("a.dcm", 6)]))
        run(a.store.put(a.store_key(busy.staging_keys[0]), b"staged"))
        (root / "acme" / "staging" / "crashed").mkdir()
        (root / "acme" / "staging" / "crashed" / "0").write_bytes(b"staged")
        an_hour_ago = time.time() - 7200
        for path in [*root.rglob("*"), root]:
            if path != new_folder:
                os.utime(path, (an_hour_ago, an_hour_ago))
        assert lost.object_key.startswith("ghost/")

        swept = run(a.sweep_orphans(older_than=timedelta(hours=1)))
        assert (swept.tenants, swept.orphans, swept.removed) == (2, 3, 3)
        assert swept.empty_folders == 2  # old-session and its sub folder
        assert not old_folder.exists() and new_folder.is_dir()
        assert (root / busy.staging_keys[0]).exists()
        assert not (root / "acme" / "staging" / "crashed" / "0").exists()
        assert not list((root / "ghost").rglob("*.dcm")) and not list((root / "ghost").rglob("*.json"))
        assert run(a.read_instance(kept))
        again = run(a.sweep_orphans(older_than=timedelta(0)))
        # The new folder, now past the grace, and the crashed one, emptied by the first sweep.
        assert (again.orphans, again.empty_folders) == (0, 2)
