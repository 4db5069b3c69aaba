"""Housekeeping of an archive, run now and then by any service instance while traffic goes on:
objects no index row points at, staging objects of finished upload sessions, empty staging
folders, and extra query tags configured after instances were stored. (Expired upload sessions
are swept by ``Archive.expire_uploads``.)"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import partial

from ..errors import NotFoundError, UsageError
from . import index, uploads
from .bucket import BucketLayout, check_tenant
from .db import Database
from .objects import ArchiveObjects
from .parsing import json_value_text
from .qido import ExtraTag
from .records import OrphanSweep

log = logging.getLogger("dicom_cloud.archive")

#: Keys checked against the index at once.
_BATCH = 1000


async def collect_orphans(
    objects: ArchiveObjects, db: Database, tenant: str, *, older_than: timedelta, dry_run: bool
) -> OrphanSweep:
    """Find (and unless ``dry_run`` delete) the tenant's instance, sidecar and derived objects that
    no index row points at. Objects younger than ``older_than`` (an ingest may be about to commit
    their row) and objects whose date the store does not report are left alone."""
    cutoff = datetime.now(UTC) - older_than
    scanned = orphans = removed = 0

    async def settle(batch: list[tuple[str, str]]) -> tuple[int, int]:
        """(orphans, removed) among ``batch``: (store key, instance key it belongs to)."""
        wanted = list({owner for _, owner in batch})
        known = await db.run(lambda s: index.referenced_object_keys(s, tenant, wanted))
        lost = [key for key, owner in batch if owner not in known]
        if lost and not dry_run:
            await objects.store.delete(lost)
        return len(lost), 0 if dry_run else len(lost)

    for kind in ("instances", "metadata", "derived"):
        batch: list[tuple[str, str]] = []
        async for info in objects.store.list(objects.key(f"{tenant}/{kind}/")):
            scanned += 1
            owner = BucketLayout.instance_key_of(tenant, objects.archive_key(info.key))
            if owner is None or info.last_modified is None or info.last_modified > cutoff:
                continue
            batch.append((info.key, owner))
            if len(batch) == _BATCH:
                found, gone = await settle(batch)
                orphans, removed, batch = orphans + found, removed + gone, []
        if batch:
            found, gone = await settle(batch)
            orphans, removed = orphans + found, removed + gone
    found, gone, seen = await _staging_leftovers(objects, db, tenant, cutoff, dry_run)
    scanned, orphans, removed = scanned + seen, orphans + found, removed + gone
    if orphans:
        log.info("orphaned objects: %d found, %d removed", orphans, removed)
    return OrphanSweep(scanned=scanned, orphans=orphans, removed=removed)


async def _staging_leftovers(
    objects: ArchiveObjects, db: Database, tenant: str, cutoff: datetime, dry_run: bool
) -> tuple[int, int, int]:
    """(found, removed, scanned) staging objects, older than the cutoff, of finished (completed or
    expired) upload sessions, what a presigned URL used again after its session completed
    writes, and of no session at all: what a crash leaves of a STOW-RS request's staged parts
    (those of a live request are younger than the grace period, and removed by the request).
    Completion and expiry remove the rest."""
    prefix = BucketLayout.staging_prefix(tenant)
    stale: dict[str, list[str]] = {}
    scanned = 0
    async for info in objects.store.list(objects.key(prefix)):
        scanned += 1
        session_id = objects.archive_key(info.key)[len(prefix) :].split("/", 1)[0]
        if info.last_modified is None or info.last_modified > cutoff or not session_id:
            continue
        stale.setdefault(session_id, []).append(info.key)
    if not stale:
        return 0, 0, scanned
    ids = list(stale)
    leftovers = await db.run(lambda s: uploads.leftover_ids(s, tenant, ids))
    lost = [key for session_id, keys in stale.items() if session_id in leftovers for key in keys]
    if lost and not dry_run:
        await objects.store.delete(lost)
    return len(lost), 0 if dry_run else len(lost), scanned


async def sweep_orphans(objects: ArchiveObjects, db: Database, *, older_than: timedelta) -> OrphanSweep:
    """:func:`collect_orphans` for every tenant that has objects (the store's first level, so a
    tenant whose only instance never got its row is swept too), and removal of the empty staging
    folders (of finished upload sessions) unchanged for ``older_than``."""
    scanned = orphans = removed = folders = tenants = 0
    async for info in objects.store.list(objects.key(""), recursive=False):
        tenant = objects.archive_key(info.key).rstrip("/")
        if not info.key.endswith("/"):
            continue  # a file at the root: not the archive's
        try:
            check_tenant(tenant)
        except UsageError:
            continue  # not a tenant folder
        sweep = await collect_orphans(objects, db, tenant, older_than=older_than, dry_run=False)
        folders += await objects.store.remove_empty_directories(
            objects.key(BucketLayout.staging_prefix(tenant)), older_than=older_than
        )
        scanned, orphans, removed = scanned + sweep.scanned, orphans + sweep.orphans, removed + sweep.removed
        tenants += 1
    return OrphanSweep(scanned, orphans, removed, empty_folders=folders, tenants=tenants)


async def reindex_extra_tags(
    objects: ArchiveObjects, db: Database, extra_tags: Sequence[ExtraTag], batch: int
) -> int:
    """Fill the configured extra query tags of every stored instance (all tenants) from the
    sidecars. Returns the number of instances visited."""
    tags = [e.tag for e in extra_tags]
    if not tags:
        return 0
    visited, after = 0, 0
    limit = asyncio.Semaphore(16)

    async def values(pk: int, sidecar_key: str) -> tuple[int, list[tuple[str, str, str]]]:
        async with limit:
            try:
                sidecar = json.loads(await objects.get(sidecar_key))
            except NotFoundError:
                return pk, []  # deleted meanwhile
        found = []
        for extra in extra_tags:
            element = sidecar.get(extra.tag)
            text = json_value_text(element) if isinstance(element, dict) else None
            if text is not None:
                found.append((extra.tag, str(element.get("vr", extra.vr)), text))
        return pk, found

    while True:
        page = await db.run(partial(index.instance_page, after=after, size=batch))
        if not page:
            return visited
        found = await asyncio.gather(*(values(pk, key) for pk, key in page))
        await db.run(partial(index.replace_extra_attributes, values=found, tags=tags))
        visited += len(page)
        after = page[-1][0]
