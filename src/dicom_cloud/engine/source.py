"""The source side of one item before any route runs: local files that change under us, the DICOM
policy (header read, filters, the layout's name, attributes as metadata), and rekey's "is there
anything to do"."""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import stat as stat_module
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..checksum import crc32c_file
from ..crypto.a1 import header_key_id
from ..crypto.envelope import ClientEncryption, recorded_key_id
from ..errors import DicomCloudError, DicomFormatError, NotFoundError, SourceChangedError, UnreadableFileError
from ..location import Location
from ..store import CHECKSUM_METADATA_KEY
from .model import Attempt, FilteredOut, Skip, TransferItem, TransferOptions

if TYPE_CHECKING:
    from ..dicom.deidentify import DeidentifyOptions
    from ..dicom.header import DicomIdentity
    from ..dicom.upload import DicomPolicy


@cache
def header_only() -> DicomPolicy:
    """Header reading for DICOM filters when no DICOM policy was asked for."""
    from ..dicom.upload import DicomPolicy

    return DicomPolicy()


def open_source(item: TransferItem, src_url: str) -> os.stat_result:
    """The state of a local source file as its transfer begins, once it is known to open.

    A file that cannot be read, or vanished or changed since it was listed, fails alone. (An open
    and an fstat take microseconds: a hop to a worker thread would cost more than it saves.)"""
    try:
        fd = os.open("/" + item.src_key, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFoundError(f"{src_url}: vanished since it was listed") from None
    except PermissionError:
        raise UnreadableFileError(f"{src_url}: permission denied (cannot read the file)") from None
    except OSError as exc:
        raise UnreadableFileError(f"{src_url}: cannot read the file ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat_module.S_ISREG(st.st_mode):
        raise NotFoundError(f"{src_url}: is no longer a regular file")
    if item.relative is not None and st.st_size != item.size:
        raise SourceChangedError(
            f"{src_url} changed since it was listed ({item.size} bytes, now {st.st_size}); not written",
            hint="run the same command again once the file is complete",
        )
    return st


def check_unchanged(attempt: Attempt, length: int | None = None) -> None:
    """After a local file was read: refuse what may mix two versions of it."""
    before = attempt.snapshot
    if before is None:
        return
    src_url = attempt.src_url
    try:
        after = os.stat("/" + attempt.item.src_key)
    except FileNotFoundError:
        raise SourceChangedError(f"{src_url} vanished while it was read; not written") from None
    size = length if length is not None else after.st_size
    if (after.st_ino, after.st_size, after.st_mtime_ns, size) != (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
        before.st_size,
    ):
        raise SourceChangedError(
            f"{src_url} changed while it was read; not written",
            hint="run the same command again once the file is complete",
        )


async def remove_unless_unchanged(attempt: Attempt, dst: Location) -> None:
    """After a large local file was uploaded: if it changed meanwhile, the object may mix two
    versions and its CRC32C may not describe it; remove it and fail."""
    try:
        check_unchanged(attempt)
    except SourceChangedError:
        with contextlib.suppress(DicomCloudError):
            await dst.store.delete([attempt.item.dst_key])
        raise


def source_crc(
    src: Location, crypt: ClientEncryption, item: TransferItem
) -> Callable[[], Awaitable[str | None]]:
    """How to learn the CRC32C of the source's bytes when they are written unchanged (computed once,
    when first asked)."""

    known: list[str | None] = []

    async def compute() -> str | None:
        if known:
            return known[0]
        if src.is_local:
            crc: str | None = await asyncio.to_thread(crc32c_file, Path("/" + item.src_key))
        else:
            info = await src.store.stat(item.src_key)
            stored = info.metadata.get(CHECKSUM_METADATA_KEY)
            # An encrypted source may be decrypted on the way: its stored CRC is not the written one's.
            encrypted = crypt.detect(item.src_key, info.metadata)
            crc = stored.lower() if stored and not encrypted else None
        known.append(crc)
        return crc

    return compute


async def apply_dicom_policy(
    policy: DicomPolicy, attempt: Attempt, src: Location, dst: Location, options: TransferOptions
) -> dict[str, str]:
    """Read the instance's header; name the object by the layout (the attempt's item is renamed);
    return the attributes to record as metadata."""
    item = attempt.item
    selecting = options.filter is not None and options.filter.needs_header
    try:
        identity = await policy.identify(src.store, item.src_key, local=src.is_local, size=item.size)
    except DicomFormatError as exc:
        if policy is header_only() and selecting:
            raise FilteredOut("not DICOM: does not match the DICOM filters") from None
        if policy.skip_invalid:
            raise Skip(f"not uploaded: {exc.reason}") from exc
        raise
    if options.deidentify is not None:
        identity = deidentified_identity(identity, options.deidentify)
    attempt.identity = identity
    if selecting and options.filter is not None and not options.filter.accepts_identity(identity):
        raise FilteredOut("does not match the DICOM filters")
    name = policy.object_name(identity, posixpath.basename(item.src_key))
    if name is not None:
        attempt.item = replace(item, dst_key=dst.join(name), relative=name)
        attempt.named = attempt.item.dst_key
    return policy.metadata(identity)


def deidentified_identity(identity: DicomIdentity, options: DeidentifyOptions) -> DicomIdentity:
    """The identity the de-identified instance will have: UIDs remapped, patient data gone."""
    from ..dicom.deidentify import new_uid

    def remap(uid: str | None) -> str | None:
        return new_uid(options.secret, uid) if uid else uid

    return replace(
        identity,
        study_instance_uid=remap(identity.study_instance_uid),
        series_instance_uid=remap(identity.series_instance_uid),
        sop_instance_uid=remap(identity.sop_instance_uid) or identity.sop_instance_uid,
        patient_id=None,
        accession_number=None,
        study_date=None,
        extra={},
    )


async def skip_unless_rekey_needed(src: Location, crypt: ClientEncryption, attempt: Attempt) -> None:
    """For rekey: only encrypted objects not yet under the current master key are rewritten."""
    assert crypt.ring is not None
    item = attempt.item
    info = await src.store.stat(item.src_key)
    fmt = crypt.detect(item.src_key, info.metadata)
    if fmt is None:
        raise Skip(f"{attempt.src_url} is not client-side encrypted")
    key_id = recorded_key_id(info.metadata)
    if key_id is None:  # an object written by Orthanc: the key id is in its first bytes
        key_id = header_key_id(await src.store.get_range(item.src_key, 0, 6))
    if key_id == crypt.ring.current.id and fmt == crypt.encrypt_as:
        raise Skip(f"{attempt.src_url} is already under master key {key_id}")
