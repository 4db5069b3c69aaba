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
from urllib.parse import urlsplit

import pytest
from test_cli import assert_same_tree, cli_env, run_cli

from faultproxy import FaultProxy, Rule
from servers import S3Server

MiB = 1024 * 1024
MULTIPART = ["--multipart-threshold", "5MiB", "--part-size", "5MiB"]
SMALL_FILES = 240


@dataclass
class Faulty:
    proxy: FaultProxy
    server: S3Server
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        """The CLI's environment: the proxy as the S3 endpoint."""
        return cli_env(self.server.env(), AWS_ENDPOINT_URL=self.proxy.endpoint)

    @property
    def direct_env(self) -> dict[str, str]:
        return cli_env(self.server.env())


@pytest.fixture
def faulty(seaweedfs: S3Server, s3_bucket: str) -> Iterator[Faulty]:
    upstream = urlsplit(seaweedfs.endpoint)
    assert upstream.hostname and upstream.port
    with FaultProxy(upstream.hostname, upstream.port, seed=20261121) as proxy:
        yield Faulty(proxy, seaweedfs, s3_bucket)


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
    """Every key under ``prefix``, listed directly from SeaweedFS (not through the proxy)."""
    result = run_cli("list", f"s3://{faulty.bucket}/{prefix}", "-r", "--json", env=faulty.direct_env).ok()
    base = f"s3://{faulty.bucket}/{prefix}"
    return [r["url"][len(base) :] for r in result.json_lines()]


def _assert_exact_copy(faulty: Faulty, prefix: str, files: dict[str, bytes], tmp_path: Path) -> None:
    keys = _bucket_keys(faulty, prefix)
    assert len(keys) == len(set(keys)), "a key is listed twice"
    assert sorted(keys) == sorted(files), "keys missing or extra (multipart leftovers?)"
    check = tmp_path / f"direct-{prefix.strip('/')}"
    run_cli(
        "download", f"s3://{faulty.bucket}/{prefix}", f"{check}/", "-r", *MULTIPART, env=faulty.direct_env
    ).ok()
    assert_same_tree(check, files)


def _mixed_faults(proxy: FaultProxy) -> None:
    """About one request in six faulted, spread over every kind of fault."""
    proxy.add(Rule("slowdown", probability=0.04))
    proxy.add(Rule("server_error", probability=0.03))
    proxy.add(Rule("too_many_requests", probability=0.03))
    proxy.add(Rule("reset", probability=0.02))
    proxy.add(Rule("drop_request_body", method="PUT", probability=0.04))
    proxy.add(Rule("drop_response_body", probability=0.03))
    proxy.add(Rule("delay", probability=0.03, seconds=0.2))


def _assert_faulted(proxy: FaultProxy, kinds: tuple[str, ...]) -> None:
    for kind in kinds:
        assert proxy.counts[kind] > 0, f"no {kind} injected: {dict(proxy.counts)}"


ALL_FAULTS = ("slowdown", "server_error", "too_many_requests", "reset", "drop_request_body",
              "drop_response_body", "delay")  # fmt: skip


def test_upload_download_copy_through_faults(faulty: Faulty, tree: dict[str, bytes], tmp_path: Path) -> None:
    source = _write(tmp_path / "src", tree)
    _mixed_faults(faulty.proxy)
    url = f"s3://{faulty.bucket}"
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
        "upload", f"{source}/", f"s3://{faulty.bucket}/t/", *options, "--json", env=faulty.env, timeout=300
    ).ok()
    summary = result.json_lines()[-1]
    assert summary["event"] == "summary" and summary["files"] == len(small), summary
    print("throttling summary:", summary)
    assert summary["throttled"] > 0, summary
    assert summary["lowest_concurrency"] <= 16, summary
    _assert_exact_copy(faulty, "t/", small, tmp_path)
    plain = run_cli(
        "upload", f"{source}/", f"s3://{faulty.bucket}/t2/", *options, "-v", env=faulty.env, timeout=300
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
    result = run_cli("upload", f"{source}/", f"s3://{faulty.bucket}/x/", "-r", env=faulty.env, timeout=120)
    result.fails(6).one_line()
    assert "throttling" in result.stderr, str(result)
    assert time.monotonic() - started < 60, str(result)

    # Listings pass, every write is refused: the run stops once the first object has used up its
    # attempts with nothing succeeded, rather than waiting out every remaining object.
    faulty.proxy.clear()
    faulty.proxy.add(Rule("slowdown", method="PUT"))
    started = time.monotonic()
    result = run_cli(
        "upload", f"{source}/", f"s3://{faulty.bucket}/x/", "-r", "--attempts", "3", "--retries", "1",
        env=faulty.env, timeout=120,
    )  # fmt: skip
    result.fails(6)
    assert time.monotonic() - started < 60, str(result)
    assert _bucket_keys(faulty, "x/") == []
