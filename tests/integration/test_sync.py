"""``sync``, ``verify``, ``jobs`` and ``resume`` through the real console script, against SeaweedFS,
Azurite, fake-gcs-server and local directories.

Each test checks what ends up where (bytes compared), what the command says (counts in its JSON
summary), and that what must not change did not.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from test_cli import (
    CLI,
    Backend,
    Result,
    assert_same_tree,
    cli_env,
    listed,
    make_backend,
    run_cli,
)
from test_cli import _gcs_put_raw as _gcs_put_raw

from servers import GCSServer


def _tree(root: Path, files: Mapping[str, bytes]) -> dict[str, bytes]:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return dict(files)


def _files(count: int = 12, seed: int = 7) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {
        f"study {i // 4}/séries/img {i:02d}.dcm": rng.randbytes(rng.randint(100, 5000)) for i in range(count)
    }
    files["empty.dcm"] = b""
    files["名前/ünïcode.dcm"] = rng.randbytes(300)
    return files


def _summary(result: Result) -> dict[str, Any]:
    records = [r for r in result.json_lines() if r.get("event") == "summary"]
    assert len(records) == 1, str(result)
    return records[0]


def _sync(src: str, dst: str, env: Mapping[str, str], *extra: str) -> Result:
    return run_cli("sync", src, dst, "--json", *extra, env=env)


def _download(backend: Backend, prefix: str, into: Path) -> None:
    run_cli("download", backend.url(prefix), into, "-r", "-q", env=cli_env(backend.env)).ok()


@pytest.fixture
def remote(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request, request.param)


@pytest.mark.parametrize("remote", ["s3", "azure", "gcs"], indirect=True)
def test_sync_local_to_remote_then_changes_and_delete(remote: Backend, tmp_path: Path) -> None:
    env = cli_env(remote.env)
    src = tmp_path / "src"
    files = _tree(src, _files())
    dst = remote.url("archive/")

    plan = _sync(str(src), dst, env, "--dry-run").ok()
    planned = {r["name"] for r in plan.json_lines() if r.get("event") == "plan"}
    assert planned == set(files)
    assert listed(remote, "archive/") == {}, "a dry run wrote something"

    first = _summary(_sync(str(src), dst, env).ok())
    assert (first["created"], first["updated"], first["deleted"]) == (len(files), 0, 0)
    again = _summary(_sync(str(src), dst, env).ok())
    assert (again["created"], again["updated"], again["unchanged"]) == (0, 0, len(files))

    # Same size, other bytes: only the checksum can tell. A new file; a file gone from the source.
    changed = "study 0/séries/img 01.dcm"
    files[changed] = bytes(b ^ 0xFF for b in files[changed])
    (src / changed).write_bytes(files[changed])
    files["new.dcm"] = b"new content"
    (src / "new.dcm").write_bytes(files["new.dcm"])
    gone = "study 1/séries/img 05.dcm"
    (src / gone).unlink()
    kept = files.pop(gone)

    without_delete = _summary(_sync(str(src), dst, env).ok())
    assert (without_delete["created"], without_delete["updated"], without_delete["deleted"]) == (1, 1, 0)
    assert gone in listed(remote, "archive/"), "deleted without --delete"
    plan = _sync(str(src), dst, env, "--delete", "--dry-run").ok()
    assert [r["name"] for r in plan.json_lines() if r.get("action") == "delete"] == [gone]
    with_delete = _summary(_sync(str(src), dst, env, "--delete").ok())
    assert (with_delete["created"], with_delete["updated"], with_delete["deleted"]) == (0, 0, 1)

    back = tmp_path / "back"
    _download(remote, "archive/", back)
    assert_same_tree(back, files)
    run_cli("verify", str(src), dst, env=env).ok()
    assert kept  # the removed file's bytes are only in this test now


@pytest.mark.parametrize("remote", ["s3", "azure"], indirect=True)
def test_sync_remote_to_local_and_cloud_to_cloud(remote: Backend, request: pytest.FixtureRequest,
                                                  tmp_path: Path) -> None:  # fmt: skip
    gcs = make_backend(request, "gcs")
    env = cli_env(remote.env, gcs.env)
    src = tmp_path / "src"
    files = _tree(src, _files(20, seed=3))
    run_cli("upload", src, remote.url("tree/"), "-r", "-q", env=env).ok()

    local = tmp_path / "local"
    first = _summary(_sync(remote.url("tree/"), str(local), env).ok())
    assert first["created"] == len(files)
    assert_same_tree(local, files)
    assert _summary(_sync(remote.url("tree/"), str(local), env).ok())["unchanged"] == len(files)

    copied = _summary(_sync(remote.url("tree/"), gcs.url("mirror/"), env).ok())
    assert copied["created"] == len(files)
    assert _summary(_sync(remote.url("tree/"), gcs.url("mirror/"), env).ok())["unchanged"] == len(files)
    run_cli("verify", remote.url("tree/"), gcs.url("mirror/"), env=env).ok()
    # An extra object in the mirror is removed by --delete, and only that one.
    run_cli("upload", src / "empty.dcm", gcs.url("mirror/stray.dcm"), "-q", env=env).ok()
    deleted = _summary(_sync(remote.url("tree/"), gcs.url("mirror/"), env, "--delete").ok())
    assert deleted["deleted"] == 1
    assert sorted(listed(gcs, "mirror/")) == sorted(files)


def test_max_delete_refuses_mass_deletion(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    remote = make_backend(request, "s3")
    env = cli_env(remote.env)
    src = tmp_path / "src"
    files = _tree(src, _files(10))
    _sync(str(src), remote.url("keep/"), env).ok()
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = run_cli("sync", empty, remote.url("keep/"), "--delete", env=env).fails(14)
    assert "--max-delete" in refused.stderr
    assert sorted(listed(remote, "keep/")) == sorted(files), "something was deleted"
    # A count as the limit; then an explicit 100% lets it through.
    for name in list(files)[:8]:
        (src / name).unlink()
    run_cli("sync", src, remote.url("keep/"), "--delete", "--max-delete", "5", env=env).fails(14)
    result = _sync(str(src), remote.url("keep/"), env, "--delete", "--max-delete", "100%").ok()
    assert _summary(result)["deleted"] == 8
    run_cli("sync", src, remote.url("keep/"), "--max-delete", "lots", env=env).fails(2)


def test_bidirectional_sync_merges_changes_deletions_and_conflicts(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    remote = make_backend(request, "s3")
    env = cli_env(remote.env)
    a = tmp_path / "a"
    _tree(a, {"both.dcm": b"same", "only-a.dcm": b"from a", "edit.dcm": b"v1", "drop.dcm": b"to drop"})
    b = remote.url("b/")
    run_cli("upload", tmp_path / "a" / "both.dcm", remote.url("b/both.dcm"), "-q", env=env).ok()
    run_cli("upload", a / "only-a.dcm", remote.url("b/only-b.dcm"), "-q", env=env).ok()  # another name

    first = _summary(_sync(str(a), b, env, "--bidirectional").ok())
    assert first["deleted"] == 0 and first["conflicts"] == 0
    assert sorted(p.name for p in a.iterdir()) == [
        "both.dcm",
        "drop.dcm",
        "edit.dcm",
        "only-a.dcm",
        "only-b.dcm",
    ]
    assert sorted(listed(remote, "b/")) == ["both.dcm", "drop.dcm", "edit.dcm", "only-a.dcm", "only-b.dcm"]

    # Edit on A, delete on B: the edit travels, the deletion travels.
    (a / "edit.dcm").write_bytes(b"v2 from a")
    run_cli("delete", remote.url("b/drop.dcm"), "--force", "-q", env=env).ok()
    second = _summary(_sync(str(a), b, env, "--bidirectional").ok())
    assert (second["updated"], second["deleted"], second["conflicts"]) == (1, 1, 0)
    assert not (a / "drop.dcm").exists()
    back = tmp_path / "back1"
    _download(remote, "b/", back)
    assert (back / "edit.dcm").read_bytes() == b"v2 from a"

    # Both sides edit the same file: the newer (B) keeps the name; A's version is kept beside it.
    (a / "edit.dcm").write_bytes(b"v3 from a")
    time.sleep(1.1)
    other = tmp_path / "v3b.dcm"
    other.write_bytes(b"v3 from b, newer")
    run_cli("upload", other, remote.url("b/edit.dcm"), "-q", env=env).ok()
    third = _summary(_sync(str(a), b, env, "--bidirectional").ok())
    assert third["conflicts"] == 1
    assert (a / "edit.dcm").read_bytes() == b"v3 from b, newer"
    kept = [p for p in a.iterdir() if p.name.startswith("edit.conflict-")]
    assert len(kept) == 1 and kept[0].read_bytes() == b"v3 from a"
    # The next run carries the kept copy across; then both sides agree and a run changes nothing.
    _sync(str(a), b, env, "--bidirectional").ok()
    run_cli("verify", str(a), b, env=env).ok()
    quiet = _summary(_sync(str(a), b, env, "--bidirectional").ok())
    assert (quiet["created"], quiet["updated"], quiet["deleted"], quiet["conflicts"]) == (0, 0, 0, 0)


@pytest.mark.parametrize("remote", ["s3", "gcs"], indirect=True)
def test_verify_reports_every_kind_of_difference(remote: Backend, tmp_path: Path) -> None:
    env = cli_env(remote.env)
    src = tmp_path / "src"
    files = _tree(src, {"same.dcm": b"a" * 100, "size.dcm": b"b" * 100, "content.dcm": b"c" * 100,
                        "missing.dcm": b"d"})  # fmt: skip
    run_cli("upload", src, remote.url("v/"), "-r", "-q", env=env).ok()
    run_cli("verify", src, remote.url("v/"), env=env).ok()
    other = tmp_path / "other"
    _tree(other, {"size.dcm": b"b" * 99, "content.dcm": b"C" * 100, "extra.dcm": b"e"})
    for name in ("size.dcm", "content.dcm", "extra.dcm"):
        run_cli("upload", other / name, remote.url(f"v/{name}"), "-q", env=env).ok()
    run_cli("delete", remote.url("v/missing.dcm"), "--force", "-q", env=env).ok()
    result = run_cli("verify", src, remote.url("v/"), "--json", env=env)
    assert result.code == 1, str(result)
    found = {r["name"]: r["kind"] for r in result.json_lines() if r.get("event") == "difference"}
    assert found == {"size.dcm": "size", "content.dcm": "content", "missing.dcm": "missing",
                     "extra.dcm": "extra"}  # fmt: skip
    assert files


def test_sync_refuses_hostile_names_into_a_directory(
    fake_gcs: GCSServer, gcs_bucket: str, tmp_path: Path
) -> None:
    """fake-gcs-server stores names as given: '..' segments reach the client, which must refuse them."""
    for name in ("t/ok.dcm", "t/../../escape.dcm", "t/a/../../../x.dcm", "t/back\\slash.dcm"):
        assert _gcs_put_raw(fake_gcs, gcs_bucket, name, b"data") in (200, 201), name
    target = tmp_path / "deep" / "target"
    result = run_cli("sync", f"gs://{gcs_bucket}/t/", target, env=cli_env(fake_gcs.env()))
    assert result.code in (1, 9), str(result)
    assert "Traceback" not in result.stderr
    assert (target / "ok.dcm").read_bytes() == b"data"
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"deep/target/ok.dcm"}, written


# -- journal, jobs, resume ------------------------------------------------------------------


def _state_dir(env: Mapping[str, str]) -> Path:
    return Path(env["DICOM_CLOUD_STATE_DIR"]) / "jobs"


def _done_count(env: Mapping[str, str]) -> int:
    total = 0
    for path in _state_dir(env).glob("*.sqlite"):
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2)
            total += db.execute("SELECT count(*) FROM done").fetchone()[0]
            db.close()
        except sqlite3.Error:
            pass
    return total


def test_kill_9_mid_upload_then_resume_completes_exactly(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A few thousand files and a large one; kill -9 mid-way; `resume`; the bucket matches exactly."""
    remote = make_backend(request, "s3")
    env = cli_env(remote.env, DICOM_CLOUD_STATE_DIR=str(tmp_path / "state"))
    src = tmp_path / "src"
    rng = random.Random(99)
    files = {f"s{i // 100:02d}/i{i:04d}.dcm": rng.randbytes(rng.randint(200, 3000)) for i in range(3000)}
    files["large/big.dcm"] = rng.randbytes(48 * 1024 * 1024)
    _tree(src, files)
    argv = ["upload", str(src), remote.url("k9/"), "-r", "-j", "8", "--multipart-threshold", "8MiB",
            "--part-size", "5MiB", "--json"]  # fmt: skip
    proc = subprocess.Popen([str(CLI), *argv], env=dict(env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path)  # fmt: skip
    deadline = time.monotonic() + 90
    while _done_count(env) < 600 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the upload ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _done_count(env)
    assert 0 < done_before < len(files)

    jobs = run_cli("jobs", "--json", env=env).ok()
    [job] = [r for r in jobs.json_lines()]
    assert job["status"] == "interrupted" and job["verb"] == "upload" and job["done"] == done_before

    resumed = run_cli("resume", job["id"][:8], env=env, cwd=tmp_path, timeout=300).ok()
    summary = _summary(resumed)
    assert summary["skipped"] >= done_before  # finished objects were not sent again
    assert summary["files"] + summary["skipped"] == len(files)
    assert run_cli("jobs", "--json", env=env).ok().json_lines() == []  # complete: forgotten
    got = listed(remote, "k9/")
    assert got == {rel: len(data) for rel, data in files.items()}
    run_cli("verify", src, remote.url("k9/"), env=env).ok()


def test_a_running_job_is_locked(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    remote = make_backend(request, "s3")
    env = cli_env(remote.env, DICOM_CLOUD_STATE_DIR=str(tmp_path / "state"))
    src = tmp_path / "src"
    _tree(src, {f"f{i:04d}.dcm": os.urandom(2000) for i in range(1500)})
    argv = ["upload", str(src), remote.url("lock/"), "-r", "-j", "1", "-q"]
    proc = subprocess.Popen(
        [str(CLI), *argv], env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while _done_count(env) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        second = run_cli(*argv, env=env)
        second.fails(13)
        running = [r for r in run_cli("jobs", "--json", env=env).ok().json_lines()]
        assert running and running[0]["status"] == "running"
        run_cli("jobs", "--forget", running[0]["id"], env=env).fails(13)
    finally:
        proc.kill()
        proc.wait()
    # The lock died with the process: the job resumes.
    run_cli(*argv, env=env, timeout=300).ok()


def test_interrupted_sync_resumes_without_recopying(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    remote = make_backend(request, "s3")
    env = cli_env(remote.env, DICOM_CLOUD_STATE_DIR=str(tmp_path / "state"))
    src = tmp_path / "src"
    files = _tree(src, {f"d{i // 50}/f{i:04d}.dcm": os.urandom(1500) for i in range(1500)})
    argv = ["sync", str(src), remote.url("sy/"), "-j", "4", "-q"]
    proc = subprocess.Popen(
        [str(CLI), *argv], env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while len(listed(remote, "sy/")) < 300 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(listed(remote, "sy/"))
    result = _summary(_sync(str(src), remote.url("sy/"), env).ok())
    # What the killed run recorded is not copied again (a second or so of work may be).
    assert result["created"] + result["updated"] <= len(files) - before + 200, result
    assert result["created"] + result["updated"] + result["unchanged"] == len(files)
    run_cli("verify", src, remote.url("sy/"), env=env).ok()
    assert json.dumps(result)


def _session_saved(env: Mapping[str, str]) -> bool:
    for path in _state_dir(env).glob("*.sqlite"):
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2)
            found = db.execute("SELECT count(*) FROM sessions").fetchone()[0]
            db.close()
        except sqlite3.Error:
            continue
        if found:
            return True
    return False


@pytest.mark.parametrize("remote", ["s3", "azure"], indirect=True)
def test_kill_9_mid_multipart_upload_continues_from_the_parts_on_the_server(
    remote: Backend, tmp_path: Path
) -> None:
    env = cli_env(remote.env, DICOM_CLOUD_STATE_DIR=str(tmp_path / "state"))
    big = tmp_path / "big.dcm"
    big.write_bytes(random.Random(5).randbytes(160 * 1024 * 1024))
    sizes = ["--multipart-threshold", "8MiB", "--part-size", "5MiB", "--part-concurrency", "1"]
    argv = ["upload", str(big), remote.url("mp/big.dcm"), *sizes, "-v"]
    proc = subprocess.Popen(
        [str(CLI), *argv], env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path
    )
    deadline = time.monotonic() + 60
    while not _session_saved(env) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.4)  # a few parts reach the server
    assert proc.poll() is None, "the upload ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert listed(remote, "mp/") == {}, "a partial object became visible"
    resumed = run_cli(*argv, env=env, cwd=tmp_path, timeout=300).ok()
    assert "parts already on the server" in resumed.stderr, str(resumed)
    back = tmp_path / "back.dcm"
    run_cli("download", remote.url("mp/big.dcm"), back, "-q", env=env).ok()
    assert back.read_bytes() == big.read_bytes()
    assert run_cli("jobs", "--json", env=env).ok().json_lines() == []


def _same_size_same_mtime_rewrite(path: Path, data: bytes) -> None:
    """Other bytes of the same length, with the modification time put back: what an in-place edit
    that restores timestamps (or a clock that did not tick) leaves."""
    before = path.stat()
    assert len(data) == before.st_size
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_sync_checksum_sees_what_the_fast_path_trusts(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    remote = make_backend(request, "s3")
    env = cli_env(remote.env, DICOM_CLOUD_STATE_DIR=str(tmp_path / "state"))
    src = tmp_path / "src"
    files = _tree(src, {"a.dcm": b"A" * 300, "b.dcm": b"B" * 300})
    assert _summary(_sync(str(src), remote.url("ck/"), env).ok())["created"] == 2
    _same_size_same_mtime_rewrite(src / "a.dcm", b"a" * 300)

    # The fast path: same versions as the last sync recorded equal, so no request, no comparison.
    assert _summary(_sync(str(src), remote.url("ck/"), env).ok())["unchanged"] == 2
    found = run_cli("verify", src, remote.url("ck/"), "--json", env=env)
    assert found.code == 1, str(found)
    assert [r["name"] for r in found.json_lines() if r.get("event") == "difference"] == ["a.dcm"]

    # --checksum compares every pair as verify does: it finds the change and copies it.
    plan = _sync(str(src), remote.url("ck/"), env, "--checksum", "--dry-run").ok()
    assert [r["name"] for r in plan.json_lines() if r.get("event") == "plan"] == ["a.dcm"]
    checked = _summary(_sync(str(src), remote.url("ck/"), env, "--checksum").ok())
    assert (checked["updated"], checked["unchanged"]) == (1, 1)
    run_cli("verify", src, remote.url("ck/"), env=env).ok()
    assert files


def _multipart_put(backend: Backend, key: str, data: bytes, part_size: int) -> str:
    """An object uploaded as S3 multipart the way s5cmd or aws-cli do it: no dicom-cloud metadata,
    an ETag that is the MD5 of the part MD5s. Returns that ETag."""
    import asyncio

    from dicom_cloud.backends.s3_multipart import S3ResumableUploads
    from dicom_cloud.backends.sigv4 import S3Bucket, SigningCredentials
    from dicom_cloud.store import PutOptions

    server = backend.server
    keys = SigningCredentials(server.access_key, server.secret_key)
    uploads = S3ResumableUploads(S3Bucket(backend.bucket, server.endpoint, server.region, keys, True))

    async def put() -> str:
        state = await uploads.begin(key, len(data), part_size, PutOptions())
        parts = [
            await uploads.upload_part(state, number, data[start : start + part_size])
            for number, start in enumerate(range(0, len(data), part_size), start=1)
        ]
        info = await uploads.complete(state, parts)
        await uploads.close()
        return (info.etag or "").strip('"')

    return asyncio.run(put())


def test_sync_and_verify_agree_on_multipart_objects_of_other_tools(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    remote = make_backend(request, "s3")
    env = cli_env(remote.env, DICOM_CLOUD_STATE_DIR=str(tmp_path / "state"))
    mib = 1024 * 1024
    rng = random.Random(11)
    src = tmp_path / "src"
    files = _tree(
        src,
        {
            "aws-cli.dcm": rng.randbytes(17 * mib + 5),  # 8 MiB parts
            "rclone.dcm": rng.randbytes(11 * mib),  # 5 MiB parts
            "odd-parts.dcm": rng.randbytes(13 * mib),  # 6 MiB parts: no size that tools use
            "changed.dcm": rng.randbytes(9 * mib),  # same size, other bytes on the server
        },
    )
    part_sizes = {
        "aws-cli.dcm": 8 * mib,
        "rclone.dcm": 5 * mib,
        "odd-parts.dcm": 6 * mib,
        "changed.dcm": 5 * mib,
    }
    for name, part in part_sizes.items():
        data = files[name] if name != "changed.dcm" else bytes(reversed(files[name]))
        etag = _multipart_put(remote, f"mp/{name}", data, part)
        assert etag.endswith(f"-{-(-len(data) // part)}"), etag  # a multipart ETag, as AWS gives

    # verify: equal where the bytes are equal (an ETag recomputed, or the object read), not elsewhere.
    found = run_cli("verify", src, remote.url("mp/"), "--json", env=env)
    assert found.code == 1, str(found)
    differences = {r["name"]: r["kind"] for r in found.json_lines() if r.get("event") == "difference"}
    assert differences == {"changed.dcm": "content"}

    # sync plans to copy only what verify says differs, or what no checksum could tell without
    # reading (--checksum reads it, and then agrees with verify exactly).
    plan = _sync(str(src), remote.url("mp/"), env, "--dry-run").ok()
    planned = {r["name"] for r in plan.json_lines() if r.get("event") == "plan"}
    assert planned == {"changed.dcm", "odd-parts.dcm"}
    plan = _sync(str(src), remote.url("mp/"), env, "--dry-run", "--checksum").ok()
    assert {r["name"] for r in plan.json_lines() if r.get("event") == "plan"} == {"changed.dcm"}
    # The other direction: the local tree is the destination.
    back = tmp_path / "back"
    _tree(back, files)
    plan = _sync(remote.url("mp/"), str(back), env, "--dry-run", "--checksum").ok()
    assert {r["name"] for r in plan.json_lines() if r.get("event") == "plan"} == {"changed.dcm"}

    done = _summary(_sync(str(src), remote.url("mp/"), env, "--checksum").ok())
    assert (done["created"], done["updated"], done["unchanged"]) == (0, 1, 3)
    run_cli("verify", src, remote.url("mp/"), env=env).ok()
    assert _summary(_sync(str(src), remote.url("mp/"), env).ok())["unchanged"] == 4


def test_runs_refused_before_transferring_leave_no_job(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    remote = make_backend(request, "s3")
    env = cli_env(remote.env, DICOM_CLOUD_STATE_DIR=str(tmp_path / "state"))
    bad = cli_env(remote.env, DICOM_CLOUD_STATE_DIR=str(tmp_path / "state"), AWS_SECRET_ACCESS_KEY="0" * 32)
    src = tmp_path / "src"
    _tree(src, {f"{i}.dcm": os.urandom(100) for i in range(4)})
    _sync(str(src), remote.url("kept/"), env).ok()
    empty = tmp_path / "empty"
    empty.mkdir()
    for attempt in range(5):  # about fifteen refused runs, each once a job of its own
        run_cli("upload", tmp_path / f"missing-{attempt}", remote.url("up/"), "-r", env=env).fails(3)
        run_cli("upload", src, remote.url(f"up-{attempt}/"), "-r", env=bad).fails(4)
        run_cli("sync", empty, remote.url("kept/"), "--delete", env=env).fails(14)
    assert run_cli("jobs", "--json", env=env).ok().json_lines() == []
    resumed = run_cli("resume", env=env).ok()
    assert "no unfinished jobs" in resumed.stderr
    # The completed sync's state survived the refused runs: the next sync is quiet.
    assert _summary(_sync(str(src), remote.url("kept/"), env).ok())["unchanged"] == 4


def test_jobs_prune_removes_records_that_cannot_be_resumed(tmp_path: Path) -> None:
    from dicom_cloud.journal import JobSpec, Journal

    state = tmp_path / "state"
    env = cli_env(DICOM_CLOUD_STATE_DIR=str(state))
    jobs = state / "jobs"
    jobs.mkdir(parents=True)
    src = tmp_path / "src"
    src.mkdir()

    def record(source: Path, destination: str, *, done: bool) -> str:
        spec = JobSpec(
            "upload", str(source), destination, {}, argv=("upload", str(source), destination, "-r")
        )
        journal = Journal.open(spec, jobs)
        journal.is_done("k", "v")
        if done:
            journal.record_done("k", "v", "d", 1, None)
        journal.close()
        return spec.id

    keep = record(src, "s3://b/keep/", done=True)
    stale = {record(src, "s3://b/never/", done=False), record(tmp_path / "gone", "s3://b/gone/", done=True)}
    listed_before = {job["id"] for job in run_cli("jobs", "--json", env=env).ok().json_lines()}
    assert listed_before == {keep, *stale}
    dry = run_cli("jobs", "--prune", "--dry-run", "--json", env=env).ok().json_lines()
    assert {r["id"] for r in dry} == stale and all(r["dry_run"] for r in dry)
    pruned = run_cli("jobs", "--prune", env=env).ok()
    assert "Pruned 2 stale jobs" in pruned.stderr
    assert [job["id"] for job in run_cli("jobs", "--json", env=env).ok().json_lines()] == [keep]
    assert "Pruned 0 stale jobs" in run_cli("jobs", "--prune", env=env).ok().stderr
    assert "Pruned 1 stale job\n" in run_cli("jobs", "--prune", "--older-than", "0s", env=env).ok().stderr
    run_cli("jobs", "--older-than", "7d", env=env).fails(2)
    run_cli("jobs", "--prune", "--older-than", "soon", env=env).fails(2)


def test_verify_compares_one_file_with_one_object(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    remote = make_backend(request, "s3")
    env = cli_env(remote.env)
    scan = tmp_path / "scan.dcm"
    scan.write_bytes(os.urandom(3000))
    run_cli("upload", scan, remote.url("one/scan.dcm"), "-q", env=env).ok()

    same = run_cli("verify", scan, remote.url("one/scan.dcm"), env=env).ok()
    assert "Compared 1 object (" in same.stderr and ": 0 differences" in same.stderr, str(same)
    # Into a prefix: the same name inside it.
    run_cli("verify", scan, remote.url("one/"), env=env).ok()
    run_cli("verify", remote.url("one/scan.dcm"), tmp_path, env=env).ok()

    other = tmp_path / "other.dcm"
    other.write_bytes(bytes(b ^ 1 for b in scan.read_bytes()))
    differs = run_cli("verify", other, remote.url("one/scan.dcm"), "--json", env=env)
    assert differs.code == 1, str(differs)
    [difference] = [r for r in differs.json_lines() if r.get("event") == "difference"]
    assert (difference["kind"], difference["name"]) == ("content", remote.url("one/scan.dcm"))
    plain = run_cli("verify", other, remote.url("one/scan.dcm"), env=env).fails(1)
    assert "Compared 1 object (" in plain.stderr and ": 1 difference\n" in plain.stderr, str(plain)
    assert "the objects differ (1 difference)" in plain.stderr
    missing = run_cli("verify", scan, remote.url("one/absent.dcm"), "--json", env=env)
    assert [r["kind"] for r in missing.json_lines() if r.get("event") == "difference"] == ["missing"]
    run_cli("verify", tmp_path / "absent.dcm", remote.url("one/"), env=env).fails(3)

    # An object of another tool's multipart upload: equal by the same comparison as sync's.
    big = tmp_path / "big.dcm"
    big.write_bytes(random.Random(2).randbytes(11 * 1024 * 1024))
    _multipart_put(remote, "one/big.dcm", big.read_bytes(), 5 * 1024 * 1024)
    run_cli("verify", big, remote.url("one/big.dcm"), env=env).ok()
