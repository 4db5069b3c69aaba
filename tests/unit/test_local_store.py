from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dicom_cloud.backends import open_store
from dicom_cloud.backends.local import LocalStore
from dicom_cloud.errors import AlreadyExistsError, DicomCloudError, NotFoundError, UnsafeNameError
from dicom_cloud.localio import PARTIAL_SUFFIX
from dicom_cloud.store import CHECKSUM_METADATA_KEY, PutOptions


def _keys(store: LocalStore, prefix: str = "", recursive: bool = True) -> list[str]:
    async def collect() -> list[str]:
        return [info.key async for info in store.list(prefix, recursive=recursive)]

    return asyncio.run(collect())


def _leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(PARTIAL_SUFFIX)]


def test_put_get_stat_delete(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)

    async def main() -> None:
        await store.put("a/b/c.dcm", b"hello world")
        info = await store.stat("a/b/c.dcm")
        assert info.size == 11 and info.key == "a/b/c.dcm"
        assert await store.get("a/b/c.dcm") == b"hello world"
        assert await store.get_range("a/b/c.dcm", 6, 11) == b"world"
        assert b"".join([c async for c in store.stream("a/b/c.dcm", chunk_size=4)]) == b"hello world"
        await store.delete(["a/b/c.dcm", "missing"])
        with pytest.raises(NotFoundError):
            await store.stat("a/b/c.dcm")
        with pytest.raises(NotFoundError):
            await store.get("a/b/c.dcm")
        with pytest.raises(NotFoundError):
            await store.stat("a/b")  # a directory is not an object

    asyncio.run(main())
    assert _leftovers(tmp_path) == []


def test_failing_stream_write_leaves_no_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first part "
        raise RuntimeError("source broke")

    async def main() -> None:
        with pytest.raises(RuntimeError):
            await store.put_stream("dir/new.dcm", chunks())

    asyncio.run(main())
    assert not (tmp_path / "dir" / "new.dcm").exists()
    assert _leftovers(tmp_path) == []
    assert list((tmp_path / "dir").iterdir()) == []


def test_failing_overwrite_keeps_old_content(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (tmp_path / "x.dcm").write_bytes(b"old content")

    async def chunks() -> AsyncIterator[bytes]:
        yield b"new"
        raise RuntimeError("source broke")

    async def main() -> None:
        with pytest.raises(RuntimeError):
            await store.put_stream("x.dcm", chunks())
        with pytest.raises(TypeError):
            await store.put("x.dcm", 12345)  # type: ignore[arg-type]

    asyncio.run(main())
    assert (tmp_path / "x.dcm").read_bytes() == b"old content"
    assert sorted(os.listdir(tmp_path)) == ["x.dcm"]


def test_failed_put_leaves_the_old_file_and_no_partial(tmp_path: Path) -> None:
    from dicom_cloud.backends.local import LocalStore

    store = LocalStore(Path("/"))
    final = tmp_path / "sub" / "f.bin"
    key = str(final).lstrip("/")
    asyncio.run(store.put(key, b"ok"))
    assert final.read_bytes() == b"ok"
    with pytest.raises(TypeError):
        asyncio.run(store.put(key, "not bytes"))  # type: ignore[arg-type]
    assert final.read_bytes() == b"ok"
    assert os.listdir(final.parent) == ["f.bin"]


def test_random_access_writer_abort_and_commit(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    writer = store.open_writer("big.bin", 10)
    writer.write_at(5, b"world")
    writer.abort()
    assert os.listdir(tmp_path) == []
    writer = store.open_writer("big.bin", 10)
    writer.write_at(5, b"world")
    writer.write_at(0, memoryview(b"hello"))
    assert not (tmp_path / "big.bin").exists()  # invisible until commit
    writer.commit()
    assert (tmp_path / "big.bin").read_bytes() == b"helloworld"
    assert os.listdir(tmp_path) == ["big.bin"]


def test_if_absent(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)

    async def main() -> None:
        await store.put("k", b"one", PutOptions(if_absent=True))
        with pytest.raises(AlreadyExistsError):
            await store.put("k", b"two", PutOptions(if_absent=True))
        await store.put("k", b"three")

    asyncio.run(main())
    assert (tmp_path / "k").read_bytes() == b"three"
    assert os.listdir(tmp_path) == ["k"]


@pytest.mark.parametrize("key", ["../escape", "a/../../escape", "./a", "a/./b", "/abs", "a\x00b"])
def test_unsafe_keys_refused(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path / "root")

    async def main() -> None:
        with pytest.raises(UnsafeNameError):
            await store.put(key, b"x")
        with pytest.raises(UnsafeNameError):
            await store.stat(key)

    asyncio.run(main())
    assert not (tmp_path / "escape").exists()


def test_listing_is_in_byte_order(tmp_path: Path) -> None:
    root = tmp_path / "p"
    files = ["a-b", "a.b", "a/b", "a/c", "a0", "B", "z", "é", "a/b-c", "a/b/d", "ab"]
    for name in files:
        if name == "a/b":
            continue  # "a/b" is a directory holding "a/b/d"; "a/b" itself appears as a sibling key below
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
    (root / "a" / "b!").write_bytes(b"x")
    store = LocalStore(tmp_path)
    keys = _keys(store, "p/")
    expected = sorted(["p/" + n for n in files if n != "a/b"] + ["p/a/b!"], key=lambda k: k.encode("utf-8"))
    assert keys == expected
    # Spot checks of the tricky ones: '-' < '.' < '/' < '0', and directory "a" sorts as "a/".
    assert keys.index("p/a-b") < keys.index("p/a.b") < keys.index("p/a/b!") < keys.index("p/a0")
    assert keys.index("p/a/b!") < keys.index("p/a/b-c") < keys.index("p/a/b/d")


def test_listing_matches_memory_store_order(tmp_path: Path, mem_bucket: str) -> None:
    names = ["a-b", "a.b", "a/b", "a/c/d", "a0", "A", "é/x", "e"]
    mem = open_store(f"memory://{mem_bucket}")
    local = LocalStore(tmp_path)

    async def main() -> tuple[list[str], list[str]]:
        for name in names:
            await mem.put(name, b"x")
            await local.put(name, b"x")
        return (
            [i.key async for i in mem.list("")],
            [i.key async for i in local.list("")],
        )

    mem_keys, local_keys = asyncio.run(main())
    assert local_keys == mem_keys == sorted(names, key=lambda k: k.encode())


def test_listing_plain_prefix_and_one_level(tmp_path: Path) -> None:
    for name in ["s/ser1/a", "s/ser1/b", "s/ser10/a", "s/ser2/a", "s/top"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    store = LocalStore(tmp_path)
    assert _keys(store, "s/ser1") == ["s/ser1/a", "s/ser1/b", "s/ser10/a"]
    assert _keys(store, "s/", recursive=False) == ["s/ser1/", "s/ser10/", "s/ser2/", "s/top"]
    assert _keys(store, "nothing/") == []


def test_symlink_loop_skipped(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f").write_bytes(b"1")
    (root / "sub" / "loop").symlink_to(root)
    (root / "self").symlink_to(".")
    store = LocalStore(tmp_path)

    async def main() -> list[str]:
        async with asyncio.timeout(5):
            return [i.key async for i in store.list("tree/")]

    assert asyncio.run(main()) == ["tree/sub/f"]


def test_broken_symlink_and_special_files_skipped(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "ok").write_bytes(b"1")
    (root / "dangling").symlink_to(root / "does-not-exist")
    os.mkfifo(root / "fifo")
    (root / ("half" + PARTIAL_SUFFIX)).write_bytes(b"partial")
    (root / "link-to-ok").symlink_to(root / "ok")  # a good symlink is followed
    assert _keys(LocalStore(tmp_path), "tree/") == ["tree/link-to-ok", "tree/ok"]


def _has_user_xattrs(path: Path) -> bool:
    probe = path / "xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
    except (OSError, AttributeError):
        return False
    finally:
        probe.unlink()
    return True


def test_metadata_round_trips_via_xattrs(tmp_path: Path) -> None:
    if not _has_user_xattrs(tmp_path):
        pytest.skip("temporary filesystem has no user extended attributes")
    store = LocalStore(tmp_path)
    meta = {CHECKSUM_METADATA_KEY: "0a1b2c3d", "Source": "PACS1", "patient_note": "é ok"}

    async def main() -> None:
        await store.put("m.dcm", b"data", PutOptions(content_type="application/dicom", metadata=meta))
        info = await store.stat("m.dcm")
        assert dict(info.metadata) == meta
        assert info.content_type == "application/dicom"
        await store.copy("m.dcm", "copy.dcm")  # a plain byte copy: metadata is not promised
        assert (tmp_path / "copy.dcm").read_bytes() == b"data"

    asyncio.run(main())


def test_metadata_is_one_attribute_and_files_of_one_attribute_per_name_are_read(tmp_path: Path) -> None:
    """The stored format since 2026-12-04 (docs/storage-format.md): one attribute, a JSON object;
    files written before keep one attribute per name and read as they did."""
    if not _has_user_xattrs(tmp_path):
        pytest.skip("temporary filesystem has no user extended attributes")
    store = LocalStore(tmp_path)
    meta = {CHECKSUM_METADATA_KEY: "0a1b2c3d", "Source": "PACS1"}

    async def main() -> None:
        await store.put("new.dcm", b"data", PutOptions(content_type="application/dicom", metadata=meta))
        assert os.listxattr(tmp_path / "new.dcm") == ["user.dicom_cloud"]
        old = tmp_path / "old.dcm"
        old.write_bytes(b"data")
        st = old.stat()
        for name, value in {
            **meta,
            "content-type": "application/dicom",
            "crc32c-stamp": f"{st.st_size}:{st.st_mtime_ns}",
        }.items():
            os.setxattr(old, f"user.dicom_cloud.{name}", value.encode())
        for key in ("new.dcm", "old.dcm"):
            info = await store.stat(key)
            assert dict(info.metadata) == meta and info.content_type == "application/dicom", key
            info, data = await store.read(key)
            assert dict(info.metadata) == meta and data == b"data", key
        with old.open("ab") as f:  # edited since its checksum was recorded: the checksum is stale
            f.write(b"!")
        assert CHECKSUM_METADATA_KEY not in (await store.stat("old.dcm")).metadata

    asyncio.run(main())


@pytest.mark.parametrize("private", [True, False])
def test_private_store_creates_owner_only_files_and_directories(tmp_path: Path, private: bool) -> None:
    """A private store (the archive's) makes every file 0600 and every directory it creates 0700,
    whatever the write path; otherwise modes follow the umask, as for any download."""
    source = tmp_path / "source.bin"
    source.write_bytes(b"abc")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    root = shared / "root"
    store = LocalStore(root, private=private)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"abc"

    async def main() -> None:
        await store.put("a/b/put.bin", b"abc", PutOptions(metadata={CHECKSUM_METADATA_KEY: "00000000"}))
        await store.put_stream("c/d/stream.bin", chunks())
        await store.put_file("e/file.bin", source)
        await store.copy("a/b/put.bin", "f/copy.bin")
        writer = store.open_writer("g/h/ranged.bin", 3)
        writer.write_at(0, b"abc")
        writer.commit()

    previous = os.umask(0o022)
    try:
        asyncio.run(main())
    finally:
        os.umask(previous)
    file_mode, dir_mode = (0o600, 0o700) if private else (0o644, 0o755)
    made = list(root.rglob("*"))
    assert len([p for p in made if p.is_file()]) == 5
    assert {p.name: p.stat().st_mode & 0o777 for p in made if p.is_file()} == {
        p.name: file_mode for p in made if p.is_file()
    }
    dirs = [root, *(p for p in made if p.is_dir())]
    assert {str(p): p.stat().st_mode & 0o777 for p in dirs} == {str(p): dir_mode for p in dirs}
    assert shared.stat().st_mode & 0o777 == 0o755  # a directory that existed keeps its mode


def test_put_many_writes_each_object_and_names_each_failure(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)

    async def main() -> None:
        await store.put("blocked", b"a file where a directory would be")
        outcomes = await store.put_many(
            [
                ("x/1.dcm", b"one", PutOptions(metadata={CHECKSUM_METADATA_KEY: "00000000"})),
                ("blocked/2.dcm", b"two", PutOptions()),
                ("x/3.dcm", b"three", PutOptions(content_type="application/dicom")),
            ]
        )
        assert outcomes[0] is None and outcomes[2] is None
        assert isinstance(outcomes[1], DicomCloudError)
        assert await store.get("x/1.dcm") == b"one" and await store.get("x/3.dcm") == b"three"
        assert (await store.stat("x/3.dcm")).content_type == "application/dicom"

    asyncio.run(main())
    assert _leftovers(tmp_path) == []


def test_put_many_of_a_store_of_requests_names_each_failure(mem_bucket: str) -> None:
    store = open_store(f"memory://{mem_bucket}")

    async def main() -> None:
        outcomes = await store.put_many(
            [("a/1.dcm", b"one", PutOptions()), ("a/2.dcm", b"two", PutOptions(if_absent=True))]
        )
        assert outcomes == [None, None]
        again = await store.put_many([("a/2.dcm", b"again", PutOptions(if_absent=True))])
        assert isinstance(again[0], AlreadyExistsError)
        assert await store.get("a/2.dcm") == b"two"

    asyncio.run(main())


def test_whole_writes_leave_no_partial_file_and_fall_back_where_unnamed_files_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole write is a file without a name, linked once complete (nothing to leave behind);
    on a file system without such files it goes through a partial file, as before."""
    store = LocalStore(tmp_path / "a", private=True)
    created: list[str] = []
    real_open = os.open

    def watched(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        created.append(Path(path).name)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", watched)
    asyncio.run(store.put("d/x.dcm", b"one"))
    asyncio.run(store.put("d/x.dcm", b"two"))  # replacing
    assert not any(name.endswith(PARTIAL_SUFFIX) for name in created)
    assert (tmp_path / "a" / "d" / "x.dcm").read_bytes() == b"two"
    assert sorted(p.name for p in (tmp_path / "a" / "d").iterdir()) == ["x.dcm"]

    def no_unnamed_files(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return watched(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_unnamed_files)
    other = LocalStore(tmp_path / "b", private=True)
    asyncio.run(other.put("d/y.dcm", b"three", PutOptions(content_type="application/dicom")))
    assert any(name.endswith(PARTIAL_SUFFIX) for name in created)  # the partial file path
    assert (tmp_path / "b" / "d" / "y.dcm").read_bytes() == b"three"
    assert (tmp_path / "b" / "d" / "y.dcm").stat().st_mode & 0o777 == 0o600
    assert _leftovers(tmp_path) == []
