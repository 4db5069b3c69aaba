"""API tokens, share links and upload sessions (with quarantine), on memory:// and SQLite."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from archive_helpers import Run, make_instance, opened, read_test_file
from dicom_cloud.archive import Archive, ArchiveSettings, DeclaredFile
from dicom_cloud.archive import access as access_rules
from dicom_cloud.archive.models import ApiTokenRow
from dicom_cloud.checksum import crc32c_hex
from dicom_cloud.errors import (
    ConflictError,
    NotFoundError,
    NotSupportedError,
    RejectedObjectError,
    UsageError,
)

STUDY = "1.2.5"


@pytest.fixture
def archive(mem_bucket: str) -> Iterator[tuple[Archive, Run]]:
    with opened(ArchiveSettings(f"memory://{mem_bucket}", "sqlite://")) as pair:
        yield pair


def test_tokens(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    token, record = run(a.create_token("acme", "ci", ["read", "write"]))
    assert token.startswith("dcat_") and len(token) > 40
    assert record.scopes == ("read", "write") and record.allows("read") and not record.allows("admin")
    # Only the SHA-256 is stored.
    rows = a._db.run_sync(lambda s: list(s.scalars(select(ApiTokenRow))))
    assert [r.token_hash for r in rows] == [hashlib.sha256(token.encode()).hexdigest()]
    assert token not in json.dumps([r.__dict__ for r in rows], default=str)

    assert run(a.authenticate(token)) == record
    assert run(a.authenticate(token + "x")) is None
    assert run(a.authenticate("")) is None
    assert run(a.authenticate("Bearer " + token)) is None
    admin_token, admin = run(a.create_token("acme", "root", ["admin"]))
    assert admin.allows("write") and admin.allows("read")
    assert [t.name for t in run(a.list_tokens("acme"))] == ["ci", "root"]
    assert run(a.list_tokens("other")) == []
    with pytest.raises(NotFoundError):
        run(a.revoke_token("other", record.id))  # another tenant cannot revoke it
    revoked = run(a.revoke_token("acme", record.id))
    assert revoked.revoked is not None
    assert run(a.authenticate(token)) is None
    assert run(a.authenticate(admin_token)) == admin
    for scopes in ([], ["root"], "read"):
        with pytest.raises(UsageError):
            run(a.create_token("acme", "x", scopes))  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        run(a.create_token("acme", " ", ["read"]))


def test_tokens_may_expire(archive: tuple[Archive, Run]) -> None:
    """A token made with a lifetime is accepted until then and refused after (clock injected),
    and is listed with its expiry; one without a lifetime never expires."""
    a, run = archive
    token, record = run(a.create_token("acme", "ci", ["write"], timedelta(days=30)))
    forever, _ = run(a.create_token("acme", "ops", ["admin"]))
    assert record.expires is not None
    assert timedelta(days=30) - timedelta(seconds=5) < record.expires - record.created <= timedelta(days=30)
    assert run(a.authenticate(token)) == record
    just_before = record.expires - timedelta(seconds=1)
    assert run(a.authenticate(token, now=just_before)) == record
    assert run(a.authenticate(token, now=record.expires)) is None
    assert run(a.authenticate(token, now=record.expires + timedelta(days=1))) is None
    assert run(a.authenticate(forever, now=record.expires + timedelta(days=10000))) is not None
    listed = {t.name: t for t in run(a.list_tokens("acme"))}
    assert listed["ci"].expires == record.expires and listed["ops"].expires is None
    assert listed["ci"].expired(now=record.expires) and not listed["ci"].expired()
    assert not listed["ops"].expired(now=record.expires)
    for lifetime in (timedelta(0), timedelta(seconds=-1), timedelta(days=3651)):
        with pytest.raises(UsageError):
            run(a.create_token("acme", "x", ["read"], lifetime))


def test_share_links(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    run(a.store_instance("acme", make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.1")))
    token, link = run(a.create_share("acme", STUDY, timedelta(hours=2)))
    assert token.startswith("dcsh_")
    assert link.study_instance_uid == STUDY and link.expires - link.created == timedelta(hours=2)
    assert run(a.resolve_share(token)) == link
    assert run(a.resolve_share(token[:-1])) is None
    assert run(a.resolve_share("dcat_" + token[5:])) is None
    # Expiry: resolved against a later clock.
    later = datetime.now(UTC) + timedelta(hours=3)
    assert a._db.run_sync(lambda s: access_rules.resolve_share(s, token, now=later)) is None
    assert [s.id for s in run(a.list_shares("acme", STUDY))] == [link.id]
    assert run(a.list_shares("other")) == []
    with pytest.raises(NotFoundError):
        run(a.revoke_share("other", link.id))
    assert run(a.revoke_share("acme", link.id)).revoked is not None
    assert run(a.resolve_share(token)) is None
    with pytest.raises(NotFoundError):
        run(a.create_share("acme", "9.9.9", timedelta(hours=1)))
    for bad in (timedelta(0), timedelta(days=400)):
        with pytest.raises(UsageError):
            run(a.create_share("acme", STUDY, bad))


def test_upload_session_accepts_and_quarantines(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    good = make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.1")
    polyglot = make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.2", preamble=b"MZ" + bytes(126))
    junk = b"this is not DICOM at all" * 10
    truncated = read_test_file("MR_truncated.dcm")
    files = [
        DeclaredFile("good.dcm", len(good), crc32c_hex(good)),
        DeclaredFile("poly.dcm", len(polyglot)),
        DeclaredFile("junk.bin", len(junk)),
        DeclaredFile("wrong-size.dcm", len(good) + 1),
        DeclaredFile("wrong-crc.dcm", len(good), "00000000"),
        DeclaredFile("missing.dcm", 10),
        DeclaredFile("truncated.dcm", len(truncated)),
    ]
    upload = run(a.create_upload("acme", files))
    assert upload.state == "pending" and len(upload.staging_keys) == 7
    assert all(k.startswith(f"acme/staging/{upload.id}/") for k in upload.staging_keys)
    with pytest.raises(NotSupportedError):
        run(a.upload_urls(upload))  # memory:// cannot presign: the service takes the bytes itself
    for i, data in enumerate([good, polyglot, junk]):
        run(a.write_staging("acme", upload.id, i, data))
    # Sizes differ from the declarations: written straight to staging as a client could.
    run(a.store.put(a.store_key(upload.staging_keys[3]), good))
    run(a.store.put(a.store_key(upload.staging_keys[4]), good))
    run(a.store.put(a.store_key(upload.staging_keys[6]), truncated))
    with pytest.raises(UsageError):
        run(a.write_staging("acme", upload.id, 3, good))

    outcome = run(a.complete_upload("acme", upload.id))
    assert [(f.index, f.name, f.created) for f in outcome.accepted] == [
        (0, "good.dcm", True),
        (1, "poly.dcm", True),
    ]
    reasons = {f.name: (f.reason, f.quarantine_key) for f in outcome.rejected}
    assert reasons["junk.bin"][0] == "not DICOM (no DICM marker)"
    assert reasons["wrong-size.dcm"][0] == "size differs from the declared size"
    assert reasons["wrong-crc.dcm"][0] == "CRC32C differs from the declared checksum"
    assert reasons["missing.dcm"] == ("not uploaded", None)
    assert reasons["truncated.dcm"][0] == "truncated in the pixel data"
    for name in ("junk.bin", "wrong-size.dcm", "wrong-crc.dcm", "truncated.dcm"):
        key = reasons[name][1]
        assert key is not None and key.startswith(f"acme/quarantine/{upload.id}/")
        note = json.loads(bytes(run(a.store.get(a.store_key(key) + ".reason.json"))))
        assert note["reason"] == reasons[name][0]
    assert bytes(run(a.store.get(a.store_key(reasons["junk.bin"][1])))) == junk  # type: ignore[arg-type]
    keys = [o.key for o in run(_listing(a))]
    assert not [k for k in keys if "/staging/" in k]  # staging is emptied
    assert len(run(a.search_instances("acme", {}))) == 2
    [poly] = run(a.instances("acme", STUDY, f"{STUDY}.1", f"{STUDY}.1.2"))
    assert run(a.read_instance(poly))[:128] == bytes(128)

    # Completing again returns the recorded outcome.
    assert run(a.complete_upload("acme", upload.id)) == outcome
    assert run(a.get_upload("acme", upload.id)).state == "completed"
    with pytest.raises(NotFoundError):
        run(a.get_upload("other", upload.id))
    with pytest.raises(NotFoundError):
        run(a.complete_upload("other", upload.id))


async def _listing(a: Archive) -> list:  # type: ignore[type-arg]
    return [o async for o in a.store.list("")]


def test_upload_session_expiry_and_states(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    data = make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.1")
    upload = run(a.create_upload("acme", [DeclaredFile("a.dcm", len(data))], timedelta(seconds=30)))
    run(a.write_staging("acme", upload.id, 0, data))
    run(a.set_upload_state("acme", upload.id, "completing"))
    with pytest.raises(ConflictError):
        run(a.complete_upload("acme", upload.id))
    run(a.set_upload_state("acme", upload.id, "pending"))
    # Expire it by moving its deadline into the past.
    from dicom_cloud.archive.models import UploadSessionRow

    def expire(session):  # type: ignore[no-untyped-def]
        session.get(UploadSessionRow, upload.id).expires = datetime.now(UTC) - timedelta(seconds=1)

    a._db.run_sync(expire)
    with pytest.raises(UsageError, match="expired"):
        run(a.complete_upload("acme", upload.id))
    assert run(a.get_upload("acme", upload.id)).state == "expired"
    assert not [o for o in run(_listing(a)) if "/staging/" in o.key]


@pytest.mark.parametrize(
    "files",
    [
        [],
        [DeclaredFile("a", 0)],
        [DeclaredFile("", 5)],
        [DeclaredFile("a", 5, "xyz")],
        [DeclaredFile("a", 10**12)],
    ],
)
def test_bad_upload_declarations(archive: tuple[Archive, Run], files: list[DeclaredFile]) -> None:
    a, run = archive
    with pytest.raises(UsageError):
        run(a.create_upload("acme", files))


def test_ingest_object_refuses_keys_outside_the_tenant_staging(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    for key in ("other/staging/x/0", "acme/instances/x", "acme/staging/../instances/x"):
        with pytest.raises(UsageError):
            run(a.ingest_object("acme", key))
    with pytest.raises(RejectedObjectError, match="not uploaded"):
        run(a.ingest_object("acme", "acme/staging/none/0"))


def test_expired_uploads_are_swept(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    data = make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.1")
    old = run(a.create_upload("acme", [DeclaredFile("a.dcm", len(data))], timedelta(minutes=5)))
    fresh = run(a.create_upload("beta", [DeclaredFile("b.dcm", len(data))], timedelta(hours=5)))
    run(a.write_staging("acme", old.id, 0, data))
    run(a.write_staging("beta", fresh.id, 0, data))
    assert run(a.expire_uploads()) == 0
    assert run(a.expire_uploads(datetime.now(UTC) + timedelta(hours=1))) == 1
    assert run(a.get_upload("acme", old.id)).state == "expired"
    assert run(a.get_upload("beta", fresh.id)).state == "pending"
    assert [o.key.split("/")[0] for o in run(_listing(a)) if "/staging/" in o.key] == ["beta"]


def test_only_one_of_two_concurrent_completions_ingests(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    data = make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.1")
    upload = run(a.create_upload("acme", [DeclaredFile("a.dcm", len(data))]))
    run(a.write_staging("acme", upload.id, 0, data))

    async def both() -> list[object]:
        return await asyncio.gather(
            *(a.complete_upload("acme", upload.id) for _ in range(2)), return_exceptions=True
        )

    outcomes = run(both())
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(done) >= 1 and all(o == done[0] for o in done)
    assert all(isinstance(o, ConflictError) for o in outcomes if isinstance(o, BaseException))
    assert len(done[0].accepted) == 1  # type: ignore[attr-defined]
