"""The real CLI through a fault-injecting proxy (tests/faultproxy.py) in front of SeaweedFS.

Each test points the CLI at the proxy, which answers some requests itself (503 SlowDown, 500, 429),
delays some, and drops connections part-way through request or response bodies. Afterwards the
bucket is read directly, not through the proxy: the job must have finished, with every byte
verified, nothing duplicated and nothing lost.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from test_cli import assert_same_tree, cli_env, run_cli
from test_interrupts import start, wait_until

from faultproxy import FaultProxy, Rule
from servers import AzureServer, GCSServer, S3Server, unique_name

MiB = 1024 * 1024
MULTIPART = ["--multipart-threshold", "5MiB", "--part-size", "5MiB"]
SMALL_FILES = 240


@dataclass
class Faulty:
    proxy: FaultProxy
    server: Any
    #: The bucket's URL without a trailing slash ("s3://bucket").
    root: str
    #: The CLI's environment with the proxy as the endpoint, and with the server itself.
    env: dict[str, str]
    direct_env: dict[str, str]


def _upstream(endpoint: str) -> tuple[str, int]:
    parts = urlsplit(endpoint)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


@pytest.fixture
def faulty(seaweedfs: S3Server, s3_bucket: str) -> Iterator[Faulty]:
    with FaultProxy(*_upstream(seaweedfs.endpoint), seed=20261121) as proxy:
        env = cli_env(seaweedfs.env(), AWS_ENDPOINT_URL=proxy.endpoint)
        yield Faulty(proxy, seaweedfs, f"s3://{s3_bucket}", env, cli_env(seaweedfs.env()))


@pytest.fixture
def faulty_azure(azurite: AzureServer, azure_container: str) -> Iterator[Faulty]:
    """The same in front of Azurite: SharedKey signatures do not cover the host, only the path."""
    with FaultProxy(*_upstream(azurite.endpoint), seed=7) as proxy:
        through = azurite.connection_string.replace(azurite.endpoint, f"{proxy.endpoint}/{azurite.account}")
        assert through != azurite.connection_string
        env = cli_env(azurite.env(), AZURE_STORAGE_CONNECTION_STRING=through)
        yield Faulty(proxy, azurite, f"azure://{azure_container}", env, cli_env(azurite.env()))


@pytest.fixture
def faulty_gcs(fake_gcs: GCSServer, gcs_bucket: str) -> Iterator[Faulty]:
    """The same in front of fake-gcs-server (JSON API; the resumable upload sessions it names are
    on the host it was asked at, the proxy's, so their chunks pass through the proxy too)."""
    with FaultProxy(*_upstream(fake_gcs.endpoint), seed=3) as proxy:
        env = cli_env(fake_gcs.env(), STORAGE_EMULATOR_HOST=proxy.endpoint)
        yield Faulty(proxy, fake_gcs, f"gs://{gcs_bucket}", env, cli_env(fake_gcs.env()))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A few hundred small files in a few directories, an empty one, and two multipart-sized ones."""
    rng = random.Random(11)
    files: dict[str, bytes] = {}
    for i in range(SMALL_FILES):
        files[f"d{i % 7}/f{i:04d}.dcm"] = rng.randbytes(rng.randrange(1, 24 * 1024))
    files["empty.dcm"] = b""
    files["big/one.dcm"] = rng.randbytes(11 * MiB + 17)
    files["big/two.dcm"] = rng.randbytes(6 * MiB)
    return files


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _bucket_keys(faulty: Faulty, prefix: str) -> list[str]:
    """Every key under ``prefix``, listed directly from the server (not through the proxy)."""
    base = f"{faulty.root}/{prefix}"
    result = run_cli("list", base, "-r", "--json", env=faulty.direct_env).ok()
    return [r["url"][len(base) :] for r in result.json_lines()]


def _assert_exact_copy(faulty: Faulty, prefix: str, files: dict[str, bytes], tmp_path: Path) -> None:
    keys = _bucket_keys(faulty, prefix)
    assert len(keys) == len(set(keys)), "a key is listed twice"
    assert sorted(keys) == sorted(files), "keys missing or extra (multipart leftovers?)"
    check = tmp_path / f"direct-{prefix.strip('/')}"
    run_cli("download", f"{faulty.root}/{prefix}", f"{check}/", "-r", *MULTIPART, env=faulty.direct_env).ok()
    assert_same_tree(check, files)


def _mixed_faults(proxy: FaultProxy) -> None:
    """About one request in five faulted, spread over every kind of fault. Every n-th request
    rather than a draw, so that each kind is injected however the concurrent requests interleave."""
    proxy.add(Rule("drop_request_body", method="PUT", every=19))
    proxy.add(Rule("slowdown", every=23))
    proxy.add(Rule("too_many_requests", every=29))
    proxy.add(Rule("server_error", every=31))
    proxy.add(Rule("delay", every=33, seconds=0.2))
    proxy.add(Rule("drop_response_body", every=37))
    proxy.add(Rule("reset", every=41))


def _assert_faulted(proxy: FaultProxy, kinds: tuple[str, ...]) -> None:
    for kind in kinds:
        assert proxy.counts[kind] > 0, f"no {kind} injected: {dict(proxy.counts)}"


ALL_FAULTS = ("slowdown", "server_error", "too_many_requests", "reset", "drop_request_body",
              "drop_response_body", "delay")  # fmt: skip


def test_upload_download_copy_through_faults(faulty: Faulty, tree: dict[str, bytes], tmp_path: Path) -> None:
    source = _write(tmp_path / "src", tree)
    _mixed_faults(faulty.proxy)
    url = faulty.root
    run_cli(
        "upload", f"{source}/", f"{url}/up/", "-r", *MULTIPART, "-j", "16", env=faulty.env, timeout=300
    ).ok()
    _assert_faulted(faulty.proxy, ALL_FAULTS)
    upload_counts = dict(faulty.proxy.counts)
    _assert_exact_copy(faulty, "up/", tree, tmp_path)

    faulty.proxy.counts.clear()
    down = tmp_path / "down"
    run_cli(
        "download", f"{url}/up/", f"{down}/", "-r", *MULTIPART, "-j", "16", env=faulty.env, timeout=300
    ).ok()
    _assert_faulted(faulty.proxy, ("slowdown", "reset", "drop_response_body", "too_many_requests"))
    assert_same_tree(down, tree)

    faulty.proxy.counts.clear()
    run_cli(
        "copy", f"{url}/up/", f"{url}/copied/", "-r", *MULTIPART, "-j", "16", env=faulty.env, timeout=300
    ).ok()
    _assert_faulted(faulty.proxy, ("slowdown", "reset", "too_many_requests"))
    _assert_exact_copy(faulty, "copied/", tree, tmp_path)
    print("faults injected during the upload:", upload_counts)


def test_throttling_backs_concurrency_off(faulty: Faulty, tree: dict[str, bytes], tmp_path: Path) -> None:
    small = {k: v for k, v in tree.items() if not k.startswith("big/")}
    source = _write(tmp_path / "src", small)
    # obstore retries each throttled request itself (--retries): the engine hears of throttling
    # when those retries are used up, as under sustained throttling; half the writes refused here.
    faulty.proxy.add(Rule("too_many_requests", method="PUT", probability=0.3))
    faulty.proxy.add(Rule("slowdown", method="PUT", probability=0.3))
    options = ["-r", "-j", "32", "--retries", "2", "--attempts", "10"]
    result = run_cli(
        "upload", f"{source}/", f"{faulty.root}/t/", *options, "--json", env=faulty.env, timeout=300
    ).ok()
    summary = result.json_lines()[-1]
    assert summary["event"] == "summary" and summary["files"] == len(small), summary
    print("throttling summary:", summary)
    assert summary["throttled"] > 0, summary
    assert summary["lowest_concurrency"] <= 16, summary
    _assert_exact_copy(faulty, "t/", small, tmp_path)
    plain = run_cli(
        "upload", f"{source}/", f"{faulty.root}/t2/", *options, "-v", env=faulty.env, timeout=300
    ).ok()
    assert "concurrency went down to" in plain.stderr, str(plain)  # the summary line
    assert "the store is throttling: concurrency 32 -> 16" in plain.stderr, str(plain)  # the log


def test_permanently_throttled_endpoint_ends_with_exit_6(
    faulty: Faulty, tree: dict[str, bytes], tmp_path: Path
) -> None:
    small = dict(list(tree.items())[:40])
    source = _write(tmp_path / "src", small)
    faulty.proxy.add(Rule("slowdown"))  # everything, the first listing included
    started = time.monotonic()
    result = run_cli("upload", f"{source}/", f"{faulty.root}/x/", "-r", env=faulty.env, timeout=120)
    result.fails(6).one_line()
    assert "throttling" in result.stderr, str(result)
    assert time.monotonic() - started < 60, str(result)

    # Listings pass, every write is refused: the run stops once the first object has used up its
    # attempts with nothing succeeded, rather than waiting out every remaining object.
    faulty.proxy.clear()
    faulty.proxy.add(Rule("slowdown", method="PUT"))
    started = time.monotonic()
    result = run_cli(
        "upload", f"{source}/", f"{faulty.root}/x/", "-r", "--attempts", "3", "--retries", "1",
        env=faulty.env, timeout=120,
    )  # fmt: skip
    result.fails(6)
    assert time.monotonic() - started < 60, str(result)
    assert _bucket_keys(faulty, "x/") == []


def test_azure_upload_and_download_through_faults(
    faulty_azure: Faulty, tree: dict[str, bytes], tmp_path: Path
) -> None:
    files = {k: v for k, v in tree.items() if not k.startswith("d") or k < "d2"} | {
        "big/one.dcm": tree["big/one.dcm"]
    }
    source = _write(tmp_path / "src", files)
    _mixed_faults(faulty_azure.proxy)
    url = faulty_azure.root
    options = ["-r", *MULTIPART, "-j", "16"]
    run_cli("upload", f"{source}/", f"{url}/up/", *options, env=faulty_azure.env, timeout=300).ok()
    _assert_faulted(faulty_azure.proxy, ("slowdown", "reset", "drop_request_body"))
    _assert_exact_copy(faulty_azure, "up/", files, tmp_path)
    down = tmp_path / "down"
    run_cli("download", f"{url}/up/", f"{down}/", *options, env=faulty_azure.env, timeout=300).ok()
    assert_same_tree(down, files)


def test_gcs_upload_and_download_through_faults(
    faulty_gcs: Faulty, tree: dict[str, bytes], tmp_path: Path
) -> None:
    files = {k: v for k, v in tree.items() if not k.startswith("d") or k < "d2"} | {
        "big/one.dcm": tree["big/one.dcm"]
    }
    source = _write(tmp_path / "src", files)
    _mixed_faults(faulty_gcs.proxy)
    url = faulty_gcs.root
    options = ["-r", *MULTIPART, "-j", "16"]
    run_cli("upload", f"{source}/", f"{url}/up/", *options, env=faulty_gcs.env, timeout=300).ok()
    _assert_faulted(faulty_gcs.proxy, ("slowdown", "reset", "too_many_requests"))
    _assert_exact_copy(faulty_gcs, "up/", files, tmp_path)
    down = tmp_path / "down"
    run_cli("download", f"{url}/up/", f"{down}/", *options, env=faulty_gcs.env, timeout=300).ok()
    assert_same_tree(down, files)


@pytest.mark.parametrize(
    ("chunk", "outcome"),
    [
        # The last chunk finalised the object; sent again, it finds the session gone.
        (3, "the object is complete"),
        # The emulator appends a resent chunk twice (GCS keeps offsets): the object's CRC32C
        # differs from the file's, the object is deleted and written again.
        (1, "the object is checked and written again"),
    ],
)
def test_a_gcs_chunk_whose_answer_is_lost(
    faulty_gcs: Faulty, tree: dict[str, bytes], tmp_path: Path, chunk: int, outcome: str
) -> None:
    """A chunk that reached the server with its answer lost on the way back is sent again; what
    the server then holds decides (the object checked by size and CRC32C, or a new session)."""
    files = {"big/one.dcm": tree["big/one.dcm"]}  # 11 MiB: three chunks of 5, 5 and 1 MiB
    source = _write(tmp_path / "src", files)
    faulty_gcs.proxy.add(Rule("drop_response_body", method="PUT", path="upload_id", every=chunk, count=1))
    run_cli("upload", f"{source}/", f"{faulty_gcs.root}/up/", "-r", *MULTIPART, env=faulty_gcs.env).ok()
    assert faulty_gcs.proxy.counts["drop_response_body"] == 1, outcome
    _assert_exact_copy(faulty_gcs, "up/", files, tmp_path)


@pytest.mark.parametrize(
    "rules",
    [
        # The commit made the object, its answer was lost, and the server forgot the upload: the
        # object's ETag (derived from the parts') shows it is complete.
        [Rule("drop_response_body", method="POST", path="uploadId=", count=1),
         Rule("no_such_upload", method="POST", path="uploadId=", count=1)],
        # The commit refused before any object was made: a retryable error, and the next attempt
        # asks the server which parts it holds (here: all) and commits again.
        [Rule("no_such_upload", method="POST", path="uploadId=", count=1)],
    ],
    ids=["commit-answer-lost", "upload-gone"],
)  # fmt: skip
def test_an_s3_multipart_commit_that_finds_its_upload_gone(
    faulty: Faulty, tree: dict[str, bytes], tmp_path: Path, rules: list[Rule]
) -> None:
    """Either way the upload completes without a second one begun (no parts sent again)."""
    files = {"big/one.dcm": tree["big/one.dcm"]}
    source = _write(tmp_path / "src", files)
    for rule in rules:
        faulty.proxy.add(rule)
    begun = faulty.proxy.add(Rule("delay", method="POST", path=r"\?uploads", seconds=0.0))
    run_cli("upload", f"{source}/", f"{faulty.root}/up/", "-r", *MULTIPART, env=faulty.env).ok()
    assert faulty.proxy.counts["no_such_upload"] == 1
    assert begun.fired == 1  # CreateMultipartUpload
    _assert_exact_copy(faulty, "up/", files, tmp_path)


def test_slow_answers_time_out_and_are_retried(
    faulty: Faulty, tree: dict[str, bytes], tmp_path: Path
) -> None:
    small = dict(list(tree.items())[:30])
    source = _write(tmp_path / "src", small)
    # Longer than --timeout: each of these requests is abandoned and made again.
    faulty.proxy.add(Rule("delay", method="PUT", every=4, count=4, seconds=3.0))
    faulty.proxy.add(Rule("delay", method="GET", every=4, count=4, seconds=3.0))
    url = f"{faulty.root}/slow/"
    run_cli("upload", f"{source}/", url, "-r", "--timeout", "1", env=faulty.env, timeout=120).ok()
    down = tmp_path / "down"
    run_cli("download", url, f"{down}/", "-r", "--timeout", "1", env=faulty.env, timeout=120).ok()
    assert faulty.proxy.counts["delay"] == 8
    assert_same_tree(down, small)
    _assert_exact_copy(faulty, "slow/", small, tmp_path)


def test_a_multipart_copy_killed_mid_upload_leaves_no_unfinished_upload(
    faulty: Faulty, seaweedfs: S3Server, tmp_path: Path
) -> None:
    """A streamed copy between buckets cannot be continued; killed with its parts in flight, the
    next run of the job must remove the upload the dead one began (docs/resume.md, "Markers")."""
    data = random.Random(5).randbytes(12 * MiB)  # three parts of 5 MiB
    source = _write(tmp_path / "src", {"big.dcm": data})
    run_cli("upload", f"{source}/", f"{faulty.root}/src/", "-r", env=faulty.direct_env).ok()
    dst_bucket = unique_name("s3")
    seaweedfs.create_bucket(dst_bucket)

    def unfinished() -> bytes:
        status, body = seaweedfs.s3_request("GET", f"/{dst_bucket}?uploads")
        assert status == 200, body
        return body

    env = cli_env(faulty.env, DICOM_CLOUD_STATE_DIR=str(tmp_path / "state"))
    argv = ["copy", f"{faulty.root}/src/", f"s3://{dst_bucket}/copy/", "-r", *MULTIPART]
    faulty.proxy.add(Rule("delay", method="PUT", path="partNumber=", seconds=20.0))  # parts hang
    running = start([*argv, "--json"], env)
    try:
        wait_until(running, lambda: b"<Upload>" in unfinished(), "multipart upload begun")
    finally:
        running.proc.kill()
        running.proc.wait()
    assert b"<Upload>" in unfinished()  # what the killed run left on the server
    faulty.proxy.clear()
    run_cli(*argv, env=env, timeout=120).ok()  # the same job, run again
    assert b"<Upload>" not in unfinished()
    down = tmp_path / "down"
    run_cli("download", f"s3://{dst_bucket}/copy/", f"{down}/", "-r", env=faulty.direct_env).ok()
    assert (down / "big.dcm").read_bytes() == data
