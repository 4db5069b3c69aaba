"""Local disk as a store: keys are paths under a root directory, writes are atomic renames.

A private store (``LocalStore(root, private=True)``, what the archive opens: its files are patient
data) creates its files ``0600`` and its directories ``0700``; otherwise modes follow the umask.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import stat as stat_module
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from ..errors import (
    AlreadyExistsError,
    DicomCloudError,
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    UnsafeNameError,
)
from ..localio import (
    PARTIAL_SUFFIX,
    PRIVATE_FILE_MODE,
    PartialFile,
    StalePartials,
    counting_listing,
    make_dirs,
    partial_path,
    read_chunks,
)
from ..store import (
    CHECKSUM_METADATA_KEY,
    Features,
    MultipartPlan,
    ObjectInfo,
    PutOptions,
    PutOutcomes,
    PutResult,
    Store,
)

log = logging.getLogger(__name__)


#: Worker-thread trips of one :meth:`LocalStore.put_many`, and the fewest objects in a trip.
PUT_MANY_THREADS = 4
PUT_MANY_RUN = 16


class LocalStore(Store):
    """A directory tree. Keys use ``/``; the root itself is never escaped (``..`` is refused)."""

    scheme = "file"
    features = Features(server_side_copy=True, random_access_write=True, read_now=True)

    def __init__(self, root: Path, *, private: bool = False) -> None:
        self.root = root
        self.bucket = str(root)
        #: Partial files of writes whose process died: a new write of their file removes them.
        self._stale = StalePartials()
        #: Files created 0600 and directories 0700 (whatever the umask allows beyond).
        self.private = private
        #: Whether whole writes go through files without a name (``O_TMPFILE``); off once the
        #: file system is found to have none.
        self._unnamed_files = hasattr(os, "O_TMPFILE")

    def url(self, key: str = "") -> str:
        # For messages only: no validation here, so that an unsafe name can still be reported.
        return str(self.root / key) if key else str(self.root)

    def path(self, key: str) -> Path:
        """The filesystem path of ``key``, refusing names that would leave the root."""
        check_key(key)
        return self.root / key

    # -- reads -------------------------------------------------------------------------

    async def stat(self, key: str) -> ObjectInfo:
        path = self.path(key)
        try:
            st = await asyncio.to_thread(os.stat, path)
        except OSError as exc:
            raise _translate(exc, path) from exc
        if not stat_module.S_ISREG(st.st_mode):
            raise NotFoundError(f"{path}: is not a regular file")
        metadata = await asyncio.to_thread(_read_metadata, path)
        content_type = metadata.pop(_CONTENT_TYPE, None)
        return ObjectInfo(
            key=key, size=st.st_size, last_modified=_mtime(st), metadata=metadata, content_type=content_type
        )

    async def list(self, prefix: str = "", *, recursive: bool = True) -> AsyncIterator[ObjectInfo]:
        # A prefix not ending in "/" ("study/ser") is walked from its directory and filtered.
        base = prefix if prefix.endswith("/") or not prefix else prefix.rpartition("/")[0] + "/"
        base = base.rstrip("/")
        directory = self.path(base) if base else self.root
        walker = _walk_sorted(directory, f"{base}/" if base else "", recursive)
        while True:
            # Directories are read a batch at a time in a thread, so huge trees do not block the loop.
            batch = await asyncio.to_thread(_take, walker, 512)
            for info in batch:
                if info.key.startswith(prefix):
                    yield info
            if len(batch) < 512:
                return

    async def get(self, key: str) -> bytes:
        path = self.path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise _translate(exc, path) from exc

    async def read(self, key: str) -> tuple[ObjectInfo, bytes | memoryview]:
        # One thread hop for stat, metadata and bytes: this runs once per small file uploaded.
        return await asyncio.to_thread(self.read_now, key)

    def read_now(self, key: str) -> tuple[ObjectInfo, bytes | memoryview]:
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
                # On the open file: the attributes of the bytes read, without path lookups.
                metadata = _read_metadata(f.fileno())
        except IsADirectoryError:
            raise NotFoundError(
                f"{path}: is a directory", hint="add --recursive to transfer a directory"
            ) from None
        except OSError as exc:
            raise _translate(exc, path) from exc
        content_type = metadata.pop(_CONTENT_TYPE, None)
        info = ObjectInfo(
            key=key, size=len(data), last_modified=_mtime(st), metadata=metadata, content_type=content_type
        )
        return info, data

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        path = self.path(key)

        def read() -> bytes:
            with open(path, "rb") as f:
                return os.pread(f.fileno(), max(end - start, 0), start)

        try:
            return await asyncio.to_thread(read)
        except OSError as exc:
            raise _translate(exc, path) from exc

    async def stream(
        self, key: str, *, chunk_size: int = 1024 * 1024, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes | memoryview]:
        path = self.path(key)
        try:
            async for chunk in read_chunks(path, chunk_size, start=start, end=end):
                yield chunk
        except OSError as exc:
            raise _translate(exc, path) from exc

    # -- writes ------------------------------------------------------------------------

    async def put(self, key: str, data: bytes | memoryview, options: PutOptions = PutOptions()) -> PutResult:
        await asyncio.to_thread(self._put_now, self.path(key), data, options)
        return PutResult(etag=None)

    def _put_now(self, path: Path, data: bytes | memoryview, options: PutOptions) -> None:
        """:meth:`put`, in the calling (worker) thread: as a file without a name, given its name
        once whole (:meth:`_put_unnamed`), where the file system makes such files; else
        through a partial file."""
        if self._unnamed_files:
            try:
                self._put_unnamed(path, data, options)
                return
            except _NoUnnamedFiles:
                self._unnamed_files = False

        def write(tmp: Path, fd: int) -> None:
            # Through the partial file's own descriptor: it was created empty with its final
            # mode, so a second open (and close) would only cost system calls.
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view[:WRITE_PIECE]) :]
            # On the open file: no path lookups, and the stamp's stat sees the whole content.
            _write_metadata(fd, options)

        self._write_then_commit(path, write, options.if_absent)

    async def put_many(self, items: Sequence[tuple[str, bytes | memoryview, PutOptions]]) -> PutOutcomes:
        """In a few worker-thread trips (:data:`PUT_MANY_THREADS` at most, each writing a run of
        consecutive items in their order): on a local disk each write is a few system calls, and
        a trip to a thread and back per object cost as much as the write of a small one (the
        objects and sidecars of a STOW-RS request's instances). More than one trip, as a write
        may wait on the file system (its journal, a directory's lock) rather than on the CPU."""

        def write_run(run: Sequence[tuple[str, bytes | memoryview, PutOptions]]) -> PutOutcomes:
            outcomes: PutOutcomes = []
            for key, data, options in run:
                try:
                    self._put_now(self.path(key), data, options)
                except DicomCloudError as exc:
                    outcomes.append(exc)
                else:
                    outcomes.append(None)
            return outcomes

        size = max(-(-len(items) // PUT_MANY_THREADS), PUT_MANY_RUN)
        runs = [items[start : start + size] for start in range(0, len(items), size)]
        done = await asyncio.gather(*(asyncio.to_thread(write_run, run) for run in runs))
        return [outcome for outcomes in done for outcome in outcomes]

    def _put_unnamed(self, path: Path, data: bytes | memoryview, options: PutOptions) -> None:
        """Write ``data`` and its metadata into a new file that has no name yet (``O_TMPFILE``),
        then link it under ``path``. Until the link the file is in no directory: a process that
        dies before it (even by ``kill -9``) leaves nothing behind, so there is no partial file
        to create, lock, look for or rename, and the link itself is atomic (``EEXIST`` when the
        name is taken; replacing a file goes through a partial name and a rename).
        :class:`_NoUnnamedFiles` where the file system has no such files."""
        flags = os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC
        mode = PRIVATE_FILE_MODE if self.private else 0o666
        try:
            try:
                fd = os.open(path.parent, flags, mode)
            except FileNotFoundError:
                _make_parent(path, self.private)
                fd = os.open(path.parent, flags, mode)
            else:
                # Partial files of ``path`` left by a writer that died (through another write
                # path, or an earlier version) go as they did; a directory made now has none.
                self._stale.remove_for(path)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise _NoUnnamedFiles from None
            raise _translate(exc, path) from exc
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
            _write_metadata(fd, options)
            self._link_unnamed(fd, path, options.if_absent)
        except OSError as exc:
            raise _translate(exc, path) from exc
        finally:
            os.close(fd)

    def _link_unnamed(self, fd: int, path: Path, if_absent: bool) -> None:
        proc_path = f"/proc/self/fd/{fd}"  # linkat(AT_SYMLINK_FOLLOW) of it names the open file
        # A directory descriptor makes Python call linkat() (link() would link the /proc symbolic
        # link itself, EXDEV); the path is absolute, so which descriptor does not matter.
        link = functools.partial(os.link, src_dir_fd=fd, follow_symlinks=True)
        try:
            link(proc_path, path)
            return
        except FileExistsError:
            if if_absent:
                raise AlreadyExistsError(f"{path} already exists") from None
        except FileNotFoundError:
            if not Path("/proc/self/fd").exists():
                raise _NoUnnamedFiles from None  # no /proc: nothing names the open file
            raise
        # Replacing: the file gets a partial name first (a process that dies now leaves a partial
        # file no one holds, removed as stale by a later write of ``path`` or by cleanup).
        partial = partial_path(path)
        link(proc_path, partial)
        try:
            os.replace(partial, path)
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes | memoryview],
        options: PutOptions = PutOptions(),
        plan: MultipartPlan = MultipartPlan(),
    ) -> PutResult:
        path = self.path(key)
        try:
            partial = await asyncio.to_thread(self._new_partial, path)
        except OSError as exc:
            raise _translate(exc, path) from exc
        tmp = partial.path
        try:
            with _create(tmp, self.private) as f:
                async for chunk in chunks:
                    await asyncio.to_thread(f.write, chunk)
            await asyncio.to_thread(_write_metadata, tmp, options)
            await asyncio.to_thread(_commit, tmp, path, options.if_absent)
        except OSError as exc:
            raise _translate(exc, path) from exc
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
            partial.release()
        return PutResult(etag=None)

    async def put_file(
        self, key: str, path: Path, options: PutOptions = PutOptions(), plan: MultipartPlan = MultipartPlan()
    ) -> PutResult:
        dest = self.path(key)

        def write(tmp: Path, fd: int) -> None:
            # copyfile opens the file again and keeps the mode of the partial file (created with it)
            shutil.copyfile(path, tmp)
            _write_metadata(tmp, options)

        await asyncio.to_thread(self._write_then_commit, dest, write, options.if_absent)
        return PutResult(etag=None)

    def _new_partial(self, path: Path) -> PartialFile:
        """The partial file of a write of ``path``; the stale ones of ``path`` (left by a process
        that died while writing it) are removed.

        The directory is made only when the partial file cannot be created for want of it: most
        writes go to a directory that exists, and checking it first cost a ``stat`` per level
        and write (6% of a STOW-RS ingest's samples). A directory made now holds no partial
        file of an earlier write, so it is not read for stale ones: the archive gives each
        instance a directory of its own more often than not, and reading it cost 7-9% of an
        ingest's samples."""
        try:
            partial = PartialFile(path, private=self.private)
        except FileNotFoundError:
            _make_parent(path, self.private)
            return PartialFile(path, private=self.private)
        try:
            self._stale.remove_for(path, keep=partial.path.name)
        except BaseException:
            with contextlib.suppress(OSError):
                partial.path.unlink()
            partial.release()
            raise
        return partial

    def _write_then_commit(self, path: Path, write: Callable[[Path, int], None], if_absent: bool) -> None:
        """``write(partial path, its descriptor)`` fills a new partial file, which then becomes
        ``path`` whole (linked or renamed), or is removed."""
        try:
            partial = self._new_partial(path)
        except OSError as exc:
            raise _translate(exc, path) from exc
        tmp = partial.path
        committed = False
        try:
            write(tmp, partial.fileno())
            _commit(tmp, path, if_absent)
            committed = True  # the partial name is gone: no unlink to fail below
        except OSError as exc:
            raise _translate(exc, path) from exc
        finally:
            if not committed:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            partial.release()

    async def delete(self, keys: Sequence[str]) -> None:
        def remove() -> None:
            for key in keys:
                path = self.path(key)
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise _translate(exc, path) from exc

        await asyncio.to_thread(remove)

    async def copy(self, src_key: str, dst_key: str) -> None:
        src = self.path(src_key)

        def write(tmp: Path, fd: int) -> None:
            shutil.copy2(src, tmp)
            if self.private:
                tmp.chmod(PRIVATE_FILE_MODE)  # copy2 copied the source's mode

        await asyncio.to_thread(self._write_then_commit, self.path(dst_key), write, False)

    async def remove_empty_directories(self, prefix: str, *, older_than: timedelta) -> int:
        """Empty directories below ``prefix`` unchanged for ``older_than``, deepest first (a
        parent emptied by the removal of its children goes too, whatever its date: its own
        change is this removal). ``prefix`` itself stays."""
        top = self.path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        cutoff = (datetime.now(UTC) - older_than).timestamp()
        return await asyncio.to_thread(_remove_empty_dirs, top, cutoff)

    def open_writer(self, key: str, size: int) -> RandomAccessWriter:
        """A file of ``size`` bytes to fill at any offsets, renamed into place by ``commit``."""
        path = self.path(key)
        try:
            partial = self._new_partial(path)
        except OSError as exc:
            raise _translate(exc, path) from exc
        return RandomAccessWriter(path, size, partial)


#: Bytes per ``pwrite`` of a download. Larger writes into the page cache make the kernel (ext4 with
#: large folios, Linux 6.16 and later) allocate larger folios, which on a virtual machine that hands
#: freed memory back to its host are mostly memory the host must back again on first touch: 1 MiB
#: writes of a 1 GiB download cost 1.3 to 2.2 system CPU-seconds, 64 to 512 KiB writes 0.75 to 1.25
#: (docs/benchmarks.md, 2026-12-04). s5cmd writes 32 KiB at a time.
WRITE_PIECE = 128 * 1024


class RandomAccessWriter:
    """A partial file written at offsets by concurrent ranged downloads (or at once, by one
    whole-object download in a worker thread).

    Writes go through the partial file's own descriptor, the one that holds its lock, so the lock
    lasts until the rename. Writes run on the event loop (small chunks) or in worker threads, and
    a worker thread outlives a cancelled download; ``commit`` and ``abort`` wait for the writes in
    flight before the descriptor is closed, so no write lands on a reused descriptor.
    """

    def __init__(self, final: Path, size: int, partial: PartialFile) -> None:
        self.final = final
        self._writing = 0
        self._idle = threading.Condition()
        self._partial = partial
        self.tmp = partial.path
        self._fd = partial.fileno()
        if size:
            # Never a truncation to 0: on ext4 it marks the file to be flushed by its close
            # (see _create); the partial file is new and empty already.
            try:
                os.ftruncate(self._fd, size)
            except OSError as exc:
                self.abort()
                raise _translate(exc, final) from exc

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        with self._idle:
            if self._fd < 0:
                raise IntegrityError(f"{self.final}: write after the download ended")
            self._writing += 1
        try:
            view = memoryview(data).cast("B")
            while view:
                written = os.pwrite(self._fd, view[:WRITE_PIECE], offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            raise _translate(exc, self.final) from exc
        finally:
            with self._idle:
                self._writing -= 1
                self._idle.notify_all()

    def _stop_writes(self) -> int:
        """Wait for the writes in flight, refuse new ones; the descriptor (still open) is returned."""
        with self._idle:
            self._idle.wait_for(lambda: self._writing == 0)
            fd, self._fd = self._fd, -1
        return fd

    def commit(self, if_absent: bool = False, options: PutOptions | None = None) -> None:
        """Keep the metadata of ``options`` with the file, then give it its final name (refusing
        to replace one with ``if_absent``); the partial file is removed if that fails."""
        fd = self._stop_writes()
        committed = False
        try:
            if fd < 0:
                raise IntegrityError(f"{self.final}: the download ended before its commit")
            if options is not None:
                _write_metadata(fd, options)
            _commit(self.tmp, self.final, if_absent)
            committed = True
        except OSError as exc:
            raise _translate(exc, self.final) from exc
        finally:
            if not committed:
                with contextlib.suppress(OSError):
                    self.tmp.unlink()
            self._partial.release()

    def abort(self) -> None:
        self._stop_writes()
        with contextlib.suppress(OSError):
            self.tmp.unlink()
        self._partial.release()


class _NoUnnamedFiles(Exception):
    """The file system (or the system) cannot make files without a name, or name them later."""


def check_key(key: str) -> None:
    """Refuse keys that are not a plain relative path: ``..``, ``.``, empty segments, NUL."""
    if "\x00" in key:
        raise UnsafeNameError(f"object name contains a NUL byte: {key!r}")
    if key.startswith("/"):
        raise UnsafeNameError(f"object name is an absolute path: {key!r}")
    for segment in key.split("/"):
        if segment in (".", ".."):
            raise UnsafeNameError(f"object name has a '{segment}' segment: {key!r}")


#: Object metadata lives in extended attributes, where the filesystem has them: all of it in one
#: attribute, a JSON object of names to values (one system call to write, one to read). Files
#: written before 2026-12-04 have one attribute per name under this namespace; they are read too.
_METADATA_XATTR = "user.dicom_cloud"
_XATTR_PREFIX = "user.dicom_cloud."
_CONTENT_TYPE = "content-type"
#: Size and mtime of the content the stored CRC32C was computed for.
_CHECKSUM_STAMP = "crc32c-stamp"


def _write_metadata(path: Path | int, options: PutOptions) -> None:
    """The metadata of ``options`` as the extended attribute of ``path`` (or of an open file, by
    its descriptor, once its content is written)."""
    items = dict(options.metadata)
    if options.content_type:
        items[_CONTENT_TYPE] = options.content_type
    if not items:
        return
    if CHECKSUM_METADATA_KEY in items:
        # Editing a file keeps its extended attributes: the checksum says which content it describes.
        items[_CHECKSUM_STAMP] = _stamp(os.stat(path))
    value = json.dumps(items, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    try:
        os.setxattr(path, _METADATA_XATTR, value)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.E2BIG, errno.ENOSPC):
            log.debug("metadata not kept for %s: filesystem has no extended attributes", path)
            return
        raise


def _read_metadata(path: Path | int) -> dict[str, str]:
    """The metadata kept as extended attributes of ``path`` (or of an open file, by its descriptor);
    a CRC32C whose stamp no longer matches the file is left out."""
    try:
        metadata = _metadata_of(json.loads(os.getxattr(path, _METADATA_XATTR)))
    except (OSError, ValueError):
        metadata = _metadata_per_attribute(path)  # none, or written before they were one attribute
    stamp = metadata.pop(_CHECKSUM_STAMP, None)
    if CHECKSUM_METADATA_KEY in metadata:
        try:
            current = _stamp(os.stat(path))
        except OSError:
            current = None
        if stamp != current:  # the file changed since the checksum was recorded: it is stale
            del metadata[CHECKSUM_METADATA_KEY]
    return metadata


def _metadata_of(decoded: object) -> dict[str, str]:
    if not isinstance(decoded, dict):
        return {}
    return {str(k): v for k, v in decoded.items() if isinstance(v, str)}


def _metadata_per_attribute(path: Path | int) -> dict[str, str]:
    """Metadata as files written before 2026-12-04 keep it: one attribute per name."""
    try:
        names = os.listxattr(path)
    except OSError:
        return {}
    metadata: dict[str, str] = {}
    for name in names:
        if name.startswith(_XATTR_PREFIX):
            with contextlib.suppress(OSError, UnicodeDecodeError):
                metadata[name[len(_XATTR_PREFIX) :]] = os.getxattr(path, name).decode("utf-8")
    return metadata


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}"


def _make_parent(path: Path, private: bool = False) -> None:
    make_dirs(path.parent, private=private)


def _create(path: Path, private: bool) -> BinaryIO:
    """A new partial file (``PartialFile``: created empty, exclusively) opened for writing; created
    0600 when ``private`` (else 0666 less the umask, as ``open`` does) if it is not there.

    Never with O_TRUNC: truncating a file on ext4, even an empty one, marks it to have its blocks
    allocated and its dirty pages sent to the disk by whoever closes it ("auto_da_alloc", the
    safeguard for programs that rewrite a file in place without fsync); closing a 1 GiB download
    then took 0.5 to 0.8 s before its rename (docs/benchmarks.md, 2026-12-04)."""
    mode = PRIVATE_FILE_MODE if private else 0o666
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT, mode), "wb")


def _commit(tmp: Path, final: Path, if_absent: bool) -> None:
    if if_absent:
        # link() fails if the name exists, atomically: the create-only twin of rename().
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise AlreadyExistsError(f"{final} already exists") from None
        tmp.unlink()
    else:
        os.replace(tmp, final)


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime, tz=UTC)


def _remove_empty_dirs(top: Path, cutoff: float) -> int:
    removed: set[Path] = set()
    for name, subdirs, files in os.walk(top, topdown=False):
        directory = Path(name)
        if directory == top or files or any(directory / d not in removed for d in subdirs):
            continue  # the prefix itself, or something stayed in it
        try:
            if not subdirs and directory.stat().st_mtime > cutoff:
                continue  # emptied (or made) lately: a writer may be about to use it
            directory.rmdir()  # fails on anything written meanwhile
        except OSError:
            continue
        removed.add(directory)
    return len(removed)


def _take(iterator: Iterator[ObjectInfo], count: int) -> list[ObjectInfo]:
    batch: list[ObjectInfo] = []
    for item in iterator:
        batch.append(item)
        if len(batch) >= count:
            break
    return batch


def _walk_sorted(directory: Path, key_prefix: str, recursive: bool) -> Iterator[ObjectInfo]:
    """Files under ``directory`` in ascending byte order of their keys, following symlinks safely."""
    try:
        top = os.stat(directory)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _translate(exc, directory) from exc
    yield from _walk_dir(directory, key_prefix, recursive, {(top.st_dev, top.st_ino)})


def _walk_dir(
    directory: Path, key_prefix: str, recursive: bool, ancestors: set[tuple[int, int]]
) -> Iterator[ObjectInfo]:
    try:
        with os.scandir(directory) as it:
            entries = list(it)
    except NotADirectoryError:
        return
    except OSError as exc:
        raise _translate(exc, directory) from exc
    children: list[tuple[bytes, os.DirEntry[str], os.stat_result]] = []
    for entry in entries:
        if entry.name.endswith(PARTIAL_SUFFIX):
            continue
        try:
            st = entry.stat()  # follows symlinks
        except OSError:
            if not counting_listing.get():
                log.warning("skipping %s: broken symbolic link or unreadable", entry.path)
            continue
        is_dir = stat_module.S_ISDIR(st.st_mode)
        if not is_dir and not stat_module.S_ISREG(st.st_mode):
            continue  # sockets, FIFOs, devices are not objects
        # A directory's keys all continue with "/", so it sorts as name + "/" among its siblings.
        sort_key = (entry.name + "/" if is_dir else entry.name).encode("utf-8", "surrogateescape")
        children.append((sort_key, entry, st))
    children.sort(key=lambda c: c[0])
    for _, entry, st in children:
        key = key_prefix + entry.name
        if stat_module.S_ISDIR(st.st_mode):
            if not recursive:
                yield ObjectInfo(key=key + "/", size=0)
                continue
            identity = (st.st_dev, st.st_ino)
            if identity in ancestors:
                if not counting_listing.get():
                    log.warning("skipping %s: symbolic link loop", entry.path)
                continue
            yield from _walk_dir(Path(entry.path), key + "/", recursive, ancestors | {identity})
        else:
            yield ObjectInfo(key=key, size=st.st_size, last_modified=_mtime(st))


def _translate(exc: OSError, path: Path) -> DicomCloudError:
    if isinstance(exc, DicomCloudError):
        return exc
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return NotFoundError(f"{path}: no such file or directory")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDeniedError(f"{path}: permission denied")
    if exc.errno == errno.EISDIR:
        return NotFoundError(f"{path}: is a directory", hint="add --recursive to transfer a directory")
    if exc.errno == errno.ENOSPC:
        return DicomCloudError(f"{path}: no space left on device")
    if exc.errno == errno.ENAMETOOLONG:
        return UnsafeNameError(f"{path}: name too long for this filesystem")
    return DicomCloudError(f"{path}: {exc.strerror or exc}")
