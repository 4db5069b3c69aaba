"""End-to-end tests of the ``dicom-cloud`` console script against real servers.

Every test runs the installed console script (``<venv>/bin/dicom-cloud``) in a subprocess with an
explicit environment: the caller's environment without any AWS_*/AZURE_*/GOOGLE_*/STORAGE_EMULATOR_HOST
variable, plus the variables of the server under test. Assertions are on exit codes, stdout/stderr and
the bytes that end up in buckets and directories.

Data: real DICOM files bundled with pydicom (including truncated, big-endian, meta-less and odd-VR
ones), DICOM files generated here (UTF-8 patient names, a 17 MiB image above the multipart threshold
used on the command line) and a zero-byte file, under names with spaces, Unicode and ``#?&+=%``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_cloud.localio import PARTIAL_SUFFIX
from servers import (
    AzureServer,
    GCSServer,
    S3Server,
    _fake_gcs_binary,
    _port_open,
    _Proc,
    _request,
    _wait_until,
    free_ports,
)

CLI = Path(sys.executable).parent / "dicom-cloud"
MiB = 1024 * 1024
BACKENDS = ["s3", "azure", "gcs", "local"]
REMOTE = ["s3", "azure", "gcs"]
#: Options that make the 17 MiB file go through multipart uploads / ranged downloads quickly.
MULTIPART = ["--multipart-threshold", "5MiB", "--part-size", "5MiB"]

_DROP_PREFIXES = ("AWS_", "AZURE_", "GOOGLE_", "DICOM_CLOUD_")
_DROP = {"STORAGE_EMULATOR_HOST", "CLOUDSDK_CONFIG"}
_STATE_DIR = tempfile.mkdtemp(prefix="dicom-cloud-test-state-")


# ---------------------------------------------------------------------------------------------------------
# Running the console script


def cli_env(*server_envs: Mapping[str, str], **extra: str) -> dict[str, str]:
    """The caller's environment without provider settings, plus the given servers' variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP_PREFIXES) and k not in _DROP}
    # No ~/.aws profile may leak in (the tests' own identities only).
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent/dicom-cloud-tests"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    # Job journals of the tests go to a directory of their own, not the user's state directory.
    env["DICOM_CLOUD_STATE_DIR"] = _STATE_DIR
    for server_env in server_envs:
        env.update(server_env)
    env.update(extra)
    return env


@dataclass
class Result:
    args: list[str]
    code: int
    stdout: str
    stderr: str
    seconds: float

    def __str__(self) -> str:
        return (
            f"dicom-cloud {' '.join(self.args)}\n-> exit {self.code} in {self.seconds:.1f} s\n"
            f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}"
        )

    def ok(self) -> Result:
        assert self.code == 0, str(self)
        assert "Traceback" not in self.stderr, str(self)
        return self

    def fails(self, code: int) -> Result:
        """Exited with ``code``, saying why in one ``dicom-cloud: error:`` line, without a traceback."""
        assert self.code == code, str(self)
        assert "Traceback" not in self.stderr and "Traceback" not in self.stdout, str(self)
        assert "panicked" not in self.stderr, str(self)
        errors = [line for line in self.stderr.splitlines() if line.startswith("dicom-cloud: error:")]
        assert len(errors) == 1, str(self)
        return self

    def one_line(self) -> Result:
        """stderr is the error line, optionally followed by its hint: nothing else."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert lines and lines[0].startswith("dicom-cloud: error:"), str(self)
        assert all(line.startswith("hint: ") for line in lines[1:]), str(self)
        assert len(lines) <= 2, str(self)
        return self

    def json_lines(self) -> list[dict[str, Any]]:
        records = []
        for line in self.stdout.splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"stdout line is not JSON: {line!r}\n{self}")
        return records


def run_cli(
    *args: str | Path,
    env: Mapping[str, str],
    timeout: float = 120,
    cwd: Path | None = None,
    stdin: Any = subprocess.DEVNULL,
) -> Result:
    argv = [str(a) for a in args]
    started = time.monotonic()
    proc = subprocess.run(
        [str(CLI), *argv],
        env=dict(env),
        cwd=cwd,
        stdin=stdin,
        capture_output=True,
        timeout=timeout,
    )
    return Result(
        argv,
        proc.returncode,
        proc.stdout.decode("utf-8"),  # strict: the CLI must print valid UTF-8
        proc.stderr.decode("utf-8", "replace"),
        time.monotonic() - started,
    )


def test_console_script_is_installed() -> None:
    assert CLI.is_file() and os.access(CLI, os.X_OK), f"{CLI} missing: pip install -e ."
    run_cli("version", env=cli_env()).ok()
    result = run_cli("--help", env=cli_env()).ok()
    for command in ("upload", "download", "copy", "list", "delete", "share"):
        assert command in result.stdout


# ---------------------------------------------------------------------------------------------------------
# Test data


def _pydicom_file(name: str) -> Path:
    found = get_testdata_file(name)
    if found:
        return Path(found)
    path = Path(pydicom.data.__file__).parent / "charset_files" / name
    assert path.is_file(), f"pydicom test file {name} not found"
    return path


#: Real DICOM files from pydicom, some with odd contents, and where they go in the source tree.
PYDICOM_FILES = {
    "CT_small.dcm": "CT_small.dcm",
    "MR_small_bigendian.dcm": "series 1/MR big endian.dcm",
    "no_meta.dcm": "series 1/no_meta.dcm",  # no file meta information
    "ExplVR_BigEndNoMeta.dcm": "series 1/ExplVR_BigEndNoMeta.dcm",
    "rtplan_truncated.dcm": "études/é 漢字/odd #?&+=%.dcm",  # truncated file
    "MR_truncated.dcm": "études/é 漢字/lit%20eral+plus.dcm",  # a literal %20 must stay %20
    "badVR.dcm": "deep/a/b/c/badVR.dcm",
    "UN_sequence.dcm": "deep/a/b/c/UN_sequence.dcm",
    "nested_priv_SQ.dcm": "deep/a/b/nested_priv_SQ.dcm",
    "meta_missing_tsyntax.dcm": "deep/a/meta_missing_tsyntax.dcm",
    "empty_charset_LEI.dcm": "deep/empty_charset_LEI.dcm",
    "waveform_ecg.dcm": "ecg/waveform_ecg.dcm",
    "chrX1.dcm": "名前/chrX1 (utf-8).dcm",
}
BIG = "large/big image.dcm"
UNICODE_DCM = "generated/Müller José 山田.dcm"
EMPTY = "empty.dcm"


def _generated_dicom(path: Path, *, patient: str, pixels: bytes, rows: int, columns: int) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = patient
    ds.PatientID = "dicom-cloud-cli"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@dataclass
class Tree:
    """A source directory and what each file holds (relative ``/`` names -> bytes)."""

    root: Path
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(len(b) for b in self.files.values())

    def top_level(self) -> tuple[set[str], set[str]]:
        """(files, directories) directly inside the root."""
        files = {n for n in self.files if "/" not in n}
        dirs = {n.split("/", 1)[0] + "/" for n in self.files if "/" in n}
        return files, dirs


def _write_tree(root: Path, files: Mapping[str, bytes]) -> Tree:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return Tree(root, dict(files))


@dataclass
class Data:
    full: Tree  # everything, with the 17 MiB file
    small: Tree  # a few small files
    many: Tree  # 50 small files


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    base = tmp_path_factory.mktemp("cli-data")
    files: dict[str, bytes] = {rel: _pydicom_file(name).read_bytes() for name, rel in PYDICOM_FILES.items()}
    gen = base / "gen"
    rng = random.Random(20240611)
    rows, columns = 4352, 4096  # 17 MiB of 8-bit pixels: above a 5 MiB multipart threshold, 4 parts
    _generated_dicom(gen / "big.dcm", patient="Big^Image", pixels=rng.randbytes(rows * columns), rows=rows,
                     columns=columns)  # fmt: skip
    _generated_dicom(gen / "u.dcm", patient="Müller^José=山田^太郎", pixels=rng.randbytes(64 * 64),
                     rows=64, columns=64)  # fmt: skip
    files[BIG] = (gen / "big.dcm").read_bytes()
    files[UNICODE_DCM] = (gen / "u.dcm").read_bytes()
    files[EMPTY] = b""
    assert len(files[BIG]) > 17 * MiB
    full = _write_tree(base / "full", files)
    small = _write_tree(
        base / "small",
        {
            "CT_small.dcm": files["CT_small.dcm"],
            "series 1/no_meta.dcm": files["series 1/no_meta.dcm"],
            "études/é 漢字/odd #?&+=%.dcm": files["études/é 漢字/odd #?&+=%.dcm"],
            EMPTY: b"",
        },
    )
    small_sources = [files[rel] for rel in PYDICOM_FILES.values() if len(files[rel]) < 40_000]
    many = _write_tree(
        base / "many",
        {f"s{i // 10}/img {i:03d}.dcm": small_sources[i % len(small_sources)] for i in range(50)},
    )
    return Data(full, small, many)


def local_files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_tree(got_root: Path, expected: Tree | Mapping[str, bytes]) -> None:
    files = expected.files if isinstance(expected, Tree) else expected
    got = local_files(got_root)
    partial = [n for n in got if n.endswith(PARTIAL_SUFFIX)]
    assert not partial, f"partial files left behind: {partial}"
    assert sorted(got) == sorted(files)
    for rel, data in files.items():
        content = got[rel].read_bytes()
        assert len(content) == len(data), rel
        assert hashlib.sha256(content).digest() == hashlib.sha256(data).digest(), f"{rel} differs"


# ---------------------------------------------------------------------------------------------------------
# Backends


@dataclass
class Backend:
    name: str
    #: Root of the bucket as a URL without trailing slash, or the local directory.
    root: str
    env: dict[str, str]
    server: Any = None
    bucket: str = ""

    def url(self, key: str = "") -> str:
        return f"{self.root}/{key}"

    @property
    def is_local(self) -> bool:
        return self.name == "local"


def make_backend(request: pytest.FixtureRequest, name: str) -> Backend:
    if name == "local":
        root = request.getfixturevalue("local_root")
        return Backend("local", str(root), {})
    if name == "s3":
        server = request.getfixturevalue("seaweedfs")
        bucket = request.getfixturevalue("s3_bucket")
        return Backend(name, f"s3://{bucket}", server.env(), server, bucket)
    if name == "azure":
        server = request.getfixturevalue("azurite")
        bucket = request.getfixturevalue("azure_container")
        return Backend(name, f"azure://{bucket}", server.env(), server, bucket)
    if name == "gcs":
        server = request.getfixturevalue("fake_gcs")
        bucket = request.getfixturevalue("gcs_bucket")
        return Backend(name, f"gs://{bucket}", server.env(), server, bucket)
    raise AssertionError(name)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request, request.param)


@pytest.fixture
def remote(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request, request.param)


def listed(backend: Backend, prefix: str, env: Mapping[str, str] | None = None) -> dict[str, int]:
    """Relative name -> size of every object under ``prefix``, read with ``list -r --json``."""
    result = run_cli("list", backend.url(prefix), "-r", "--json", env=env or cli_env(backend.env)).ok()
    base = backend.url(prefix)
    out = {}
    for record in result.json_lines():
        assert record["url"].startswith(base), record
        out[record["url"][len(base) :]] = record["size"]
    return out


_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN", "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT",
)  # fmt: skip


def stat_metadata(monkeypatch: pytest.MonkeyPatch, backend: Backend, key: str) -> dict[str, str]:
    """The object's metadata through the library API (in this process), keys lower-cased."""
    from dicom_cloud import api

    with monkeypatch.context() as m:
        for var in _CREDENTIAL_ENV:
            m.delenv(var, raising=False)
        for var, value in backend.env.items():
            m.setenv(var, value)
        info = api.stat(backend.url(key))
    return {k.lower(): v for k, v in info.metadata.items()}


# ---------------------------------------------------------------------------------------------------------
# Upload, list, download


def test_upload_list_download_round_trip(backend: Backend, data: Data, tmp_path: Path) -> None:
    env = cli_env(backend.env)
    tree = data.full

    # A single file: to an explicit key, and into a "directory" (trailing slash).
    ct = tree.root / "CT_small.dcm"
    run_cli("upload", ct, backend.url("single/renamed.dcm"), env=env).ok()
    run_cli("upload", tree.root / UNICODE_DCM, backend.url("single/"), env=env).ok()
    assert listed(backend, "single/") == {
        "renamed.dcm": len(tree.files["CT_small.dcm"]),
        UNICODE_DCM.rsplit("/", 1)[1]: len(tree.files[UNICODE_DCM]),
    }

    # A directory tree, with the big file going through multipart.
    result = run_cli("upload", tree.root, backend.url("study/"), "-r", *MULTIPART, env=env).ok()
    assert result.stdout == ""  # progress and summary go to stderr; stdout stays clean for pipes
    assert f"{len(tree.files)} files" in result.stderr

    # list -r --json: every line parses, keys and sizes are exactly the tree's.
    lines = run_cli("list", backend.url("study/"), "-r", "--json", env=env).ok().json_lines()
    assert len(lines) == len(tree.files)
    base = backend.url("study/")
    for record in lines:
        assert {"key", "url", "size", "type", "last_modified"} <= set(record), record
        assert record["type"] == "object"
        assert record["url"].startswith(base)
        assert record["key"].endswith(record["url"][len(base) :])
        assert record["last_modified"]
    sizes = {r["url"][len(base) :]: r["size"] for r in lines}
    assert sizes == {rel: len(b) for rel, b in tree.files.items()}
    assert [r["url"] for r in lines] == sorted((r["url"] for r in lines), key=lambda u: u.encode())

    # list -l: one level, directories as PRE, files with their size.
    result = run_cli("list", backend.url("study/"), "-l", env=env).ok()
    top_files, top_dirs = tree.top_level()
    seen_files: dict[str, int] = {}
    seen_dirs: set[str] = set()
    for line in result.stdout.splitlines():
        match = re.fullmatch(r"(.{19})  (.{12})  (.+)", line)
        assert match, f"unexpected list -l line {line!r}"
        name = match.group(3)
        if match.group(2).strip() == "PRE":
            seen_dirs.add(name)
        else:
            seen_files[name] = int(match.group(2))
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", match.group(1)), line
    assert seen_dirs == top_dirs
    assert seen_files == {n: len(tree.files[n]) for n in top_files}
    assert f"{len(top_files) + len(top_dirs)} entries" in result.stderr

    # download -r into a fresh directory: identical bytes, no partial files.
    dest = tmp_path / "download"
    result = run_cli("download", backend.url("study/"), f"{dest}/", "-r", *MULTIPART, env=env).ok()
    assert_same_tree(dest, tree)
    # Also with the default (non-multipart) settings and into a directory that does not end in '/'.
    dest2 = tmp_path / "download-default"
    run_cli("download", backend.url("study/"), dest2, "-r", env=env).ok()
    assert_same_tree(dest2, tree)

    # The downloaded DICOM files still parse.
    big = pydicom.dcmread(dest / BIG)
    assert str(big.PatientName) == "Big^Image"
    assert len(big.PixelData) == 4352 * 4096
    assert str(pydicom.dcmread(dest / UNICODE_DCM).PatientName) == "Müller^José=山田^太郎"

    # A single object to an explicit file, and into an existing directory.
    one = tmp_path / "one"
    one.mkdir()
    odd = "études/é 漢字/odd #?&+=%.dcm"
    run_cli("download", backend.url("study/" + odd), one / "x.dcm", env=env).ok()
    assert (one / "x.dcm").read_bytes() == tree.files[odd]
    run_cli("download", backend.url("study/" + BIG), one, *MULTIPART, env=env).ok()
    assert (one / "big image.dcm").read_bytes() == tree.files[BIG]
    run_cli("download", backend.url("study/" + EMPTY), one, env=env).ok()
    assert (one / EMPTY).read_bytes() == b""
    assert sorted(local_files(one)) == ["big image.dcm", EMPTY, "x.dcm"]


def test_upload_dry_run_writes_nothing(backend: Backend, data: Data, tmp_path: Path) -> None:
    env = cli_env(backend.env)
    tree = data.small
    result = run_cli("upload", tree.root, backend.url("dry/"), "-r", "--dry-run", env=env).ok()
    planned = result.stdout.splitlines()
    assert len(planned) == len(tree.files), str(result)
    for rel in tree.files:
        line = f"would copy {tree.root / rel} -> {backend.url('dry/' + rel)}"
        assert any(p.startswith(line) for p in planned), f"{line!r} not in plan:\n{result}"
    assert "Would transfer 4 files" in result.stderr

    records = run_cli("upload", tree.root, backend.url("dry/"), "-r", "--dry-run", "--json", env=env)
    events = records.ok().json_lines()
    assert [e["event"] for e in events[:-1]] == ["planned"] * len(tree.files)
    assert events[-1] == {**events[-1], "event": "summary", "files": 4, "bytes": tree.total, "dry_run": True}

    run_cli("upload", tree.root / "CT_small.dcm", backend.url("dry/one.dcm"), "--dry-run", env=env).ok()
    assert listed(backend, "") == {}
    if backend.is_local:
        assert list(Path(backend.root).iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Copy


@pytest.mark.parametrize(
    ("src_name", "dst_name"),
    [("s3", "gcs"), ("gcs", "azure"), ("azure", "s3"), ("s3", "s3")],
    ids=["s3-to-gcs", "gcs-to-azure", "azure-to-s3", "s3-to-s3-same-bucket"],
)
def test_copy_between_providers(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    data: Data,
    tmp_path: Path,
    src_name: str,
    dst_name: str,
) -> None:
    src = make_backend(request, src_name)
    dst = make_backend(request, dst_name)  # the same bucket for s3 -> s3
    env = cli_env(src.env, dst.env)
    tree = data.full
    run_cli("upload", tree.root, src.url("orig/"), "-r", "--tags", "Origin=upload", *MULTIPART, env=env).ok()

    result = run_cli("copy", src.url("orig/"), dst.url("copied/"), "-r", "--json", *MULTIPART, env=env).ok()
    summary = result.json_lines()[-1]
    assert summary["event"] == "summary"
    assert (summary["files"], summary["bytes"], summary["failed"]) == (len(tree.files), tree.total, 0)
    # A single object into a prefix, and the big one to an explicit key.
    run_cli("copy", src.url("orig/CT_small.dcm"), dst.url("single/"), env=env).ok()
    run_cli("copy", src.url("orig/" + BIG), dst.url("single/big.dcm"), *MULTIPART, env=env).ok()

    dest = tmp_path / "check"
    run_cli("download", dst.url("copied/"), f"{dest}/", "-r", env=env).ok()
    assert_same_tree(dest, tree)
    single = tmp_path / "single"
    run_cli("download", dst.url("single/"), f"{single}/", "-r", env=env).ok()
    assert_same_tree(single, {"CT_small.dcm": tree.files["CT_small.dcm"], "big.dcm": tree.files[BIG]})
    if src.root == dst.root:
        # A server-side copy keeps the source's metadata; a streamed one would not have it.
        assert stat_metadata(monkeypatch, dst, "copied/" + BIG).get("origin") == "upload"
        assert stat_metadata(monkeypatch, dst, "copied/CT_small.dcm").get("origin") == "upload"


# ---------------------------------------------------------------------------------------------------------
# Share


@pytest.mark.parametrize("remote", REMOTE, indirect=True)
def test_share_link_gives_exact_bytes(remote: Backend, data: Data) -> None:
    env = cli_env(remote.env)
    tree = data.small
    run_cli("upload", tree.root, remote.url("share/"), "-r", env=env).ok()
    odd = "études/é 漢字/odd #?&+=%.dcm"
    with httpx.Client(trust_env=False, timeout=30) as client:
        result = run_cli("share", remote.url("share/" + odd), "--expires", "10m", env=env).ok()
        lines = result.stdout.splitlines()
        assert len(lines) == 1, str(result)
        answer = client.get(lines[0])
        assert answer.status_code == 200, answer.text[:500]
        assert answer.content == tree.files[odd]

        record = json.loads(run_cli("share", remote.url("share/CT_small.dcm"), "--json", env=env).ok().stdout)
        assert record["url"] == remote.url("share/CT_small.dcm")
        assert client.get(record["link"]).content == tree.files["CT_small.dcm"]

        links = run_cli("share", remote.url("share/"), "-r", "--json", env=env).ok().json_lines()
        base = remote.url("share/")
        assert sorted(r["url"][len(base) :] for r in links) == sorted(tree.files)
        for r in links:
            assert client.get(r["link"]).content == tree.files[r["url"][len(base) :]], r["url"]

    run_cli("share", remote.url("share/missing.dcm"), env=env).fails(3)
    run_cli("share", remote.url("share/CT_small.dcm"), "--expires", "soon", env=env).fails(2)
    run_cli("share", remote.url("share/CT_small.dcm"), "--expires", "0", env=env).fails(2)


def test_share_local_is_not_supported(data: Data) -> None:
    result = run_cli("share", data.small.root / "CT_small.dcm", env=cli_env()).fails(10).one_line()
    assert result.stdout == ""


# ---------------------------------------------------------------------------------------------------------
# Delete


def test_delete(backend: Backend, data: Data) -> None:
    env = cli_env(backend.env)
    tree = data.small
    run_cli("upload", tree.root, backend.url("del/"), "-r", env=env).ok()
    run_cli("upload", tree.root / "CT_small.dcm", backend.url("keep/CT_small.dcm"), env=env).ok()
    everything = {rel: len(b) for rel, b in tree.files.items()}

    # Without --force and with stdin not a terminal: refused, nothing deleted.
    run_cli("delete", backend.url("del/"), "-r", env=env).fails(2).one_line()
    run_cli("delete", backend.url("del/CT_small.dcm"), env=env).fails(2).one_line()
    assert listed(backend, "del/") == everything

    # --dry-run names every object and deletes nothing.
    result = run_cli("delete", backend.url("del/"), "-r", "--dry-run", env=env).ok()
    lines = result.stdout.splitlines()
    assert len(lines) == len(tree.files)
    for rel in tree.files:
        assert any(line.startswith("would delete") and line.endswith("del/" + rel) for line in lines), rel
    assert "Would delete 4 objects" in result.stderr
    records = run_cli("delete", backend.url("del/"), "-r", "--dry-run", "--json", env=env).ok().json_lines()
    assert {r["event"] for r in records} == {"would_delete"}
    assert sorted(r["size"] for r in records) == sorted(everything.values())
    assert listed(backend, "del/") == everything

    # One object.
    result = run_cli("delete", backend.url("del/CT_small.dcm"), "--force", env=env).ok()
    assert "Deleted 1 object" in result.stderr
    assert listed(backend, "del/") == {k: v for k, v in everything.items() if k != "CT_small.dcm"}
    run_cli("delete", backend.url("del/CT_small.dcm"), "--force", env=env).fails(3).one_line()

    # A prefix without -r is refused.
    run_cli("delete", backend.url("del/series 1/"), "--force", env=env).fails(2)

    # Everything under a prefix; the sibling prefix is untouched.
    result = run_cli("delete", backend.url("del/"), "-r", "--force", env=env).ok()
    assert "Deleted 3 objects" in result.stderr
    assert listed(backend, "del/") == {}
    assert listed(backend, "") == {"keep/CT_small.dcm": len(tree.files["CT_small.dcm"])}


# ---------------------------------------------------------------------------------------------------------
# --json transfer events


def _check_events(result: Result, tree: Tree, *, skipped: bool = False) -> dict[str, Any]:
    records = result.json_lines()
    assert records, str(result)
    summary = records[-1]
    assert summary["event"] == "summary", str(result)
    assert all(r["event"] != "summary" for r in records[:-1])
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in records[:-1]:
        assert {"event", "src", "dst", "size"} <= set(r), r
        by_kind.setdefault(r["event"], []).append(r)
    n = len(tree.files)
    final = "skipped" if skipped else "completed"
    assert len(by_kind.get("started", [])) == n
    assert len(by_kind.get(final, [])) == n, str(result)
    assert not by_kind.get("failed")
    assert sorted(r["size"] for r in by_kind[final]) == sorted(len(b) for b in tree.files.values())
    expected = {"files": 0 if skipped else n, "bytes": 0 if skipped else tree.total,
                "skipped": n if skipped else 0, "failed": 0, "dry_run": False}  # fmt: skip
    assert {k: summary[k] for k in expected} == expected
    assert isinstance(summary["seconds"], (int, float))
    return summary


def test_json_transfer_events(backend: Backend, data: Data, tmp_path: Path) -> None:
    env = cli_env(backend.env)
    tree = data.full
    result = run_cli("upload", tree.root, backend.url("j/"), "-r", "--json", *MULTIPART, env=env).ok()
    _check_events(result, tree)
    assert result.stderr == "", str(result)
    # The big file reports progress that adds up with its completion to its size.
    events = [r for r in result.json_lines() if r.get("src", "").endswith("big image.dcm")]
    moved = sum(r.get("bytes", 0) for r in events if r["event"] == "progress")
    assert moved <= len(tree.files[BIG])

    result = run_cli("download", backend.url("j/"), tmp_path / "d", "-r", "--json", *MULTIPART, env=env).ok()
    _check_events(result, tree)
    assert_same_tree(tmp_path / "d", tree)

    # Again with --no-overwrite: everything is skipped.
    result = run_cli("upload", tree.root, backend.url("j/"), "-r", "--json", "--no-overwrite", *MULTIPART,
                     env=env).ok()  # fmt: skip
    _check_events(result, tree, skipped=True)

    # --quiet: nothing at all on success.
    result = run_cli("upload", data.small.root, backend.url("q/"), "-r", "-q", env=env).ok()
    assert (result.stdout, result.stderr) == ("", "")


# ---------------------------------------------------------------------------------------------------------
# --tags


@pytest.mark.parametrize(
    "backend",
    [
        "s3",
        "azure",
        "gcs",
        "local",
    ],
    indirect=True,
)
def test_tags_visible_in_metadata(backend: Backend, data: Data, monkeypatch: pytest.MonkeyPatch) -> None:
    env = cli_env(backend.env)
    tags = "Source=PACS1,Dataset=CT chest,Site_2=a.b"
    run_cli("upload", data.small.root, backend.url("t/"), "-r", "--tags", tags, env=env).ok()
    run_cli("upload", data.full.root / BIG, backend.url("big.dcm"), "--tags", tags, *MULTIPART, env=env).ok()
    for key in ("t/CT_small.dcm", "t/empty.dcm", "t/études/é 漢字/odd #?&+=%.dcm", "big.dcm"):
        metadata = stat_metadata(monkeypatch, backend, key)
        assert metadata.get("source") == "PACS1", (key, metadata)
        assert metadata.get("dataset") == "CT chest", (key, metadata)
        assert metadata.get("site_2") == "a.b", (key, metadata)


def test_tags_with_dash_on_azure(request: pytest.FixtureRequest, data: Data,
                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    azure = make_backend(request, "azure")
    result = run_cli("upload", data.small.root, azure.url("t/"), "-r", "--tags", "Study-Id=7",
                     env=cli_env(azure.env))  # fmt: skip
    # Either refused up front as a usage error about --tags, or stored.
    assert result.code in (0, 2), str(result)
    if result.code == 2:
        result.fails(2).one_line()
        assert "--tags" in result.stderr
    else:
        assert stat_metadata(monkeypatch, azure, "t/CT_small.dcm").get("study-id") == "7"


@pytest.mark.parametrize("remote", REMOTE, indirect=True)
def test_tags_on_server_side_copy(remote: Backend, data: Data, monkeypatch: pytest.MonkeyPatch) -> None:
    env = cli_env(remote.env)
    run_cli("upload", data.small.root / "CT_small.dcm", remote.url("a.dcm"), env=env).ok()
    run_cli("copy", remote.url("a.dcm"), remote.url("b.dcm"), "--tags", "Source=copy", env=env).ok()
    assert stat_metadata(monkeypatch, remote, "b.dcm").get("source") == "copy"


@pytest.mark.parametrize("tags", ["novalue", "=v", "1abc=v", "K=é", "a b=c", "K=V,,L=W", "K/x=1"])
def test_bad_tags_are_usage_errors(seaweedfs: S3Server, s3_bucket: str, data: Data, tags: str) -> None:
    env = cli_env(seaweedfs.env())
    result = run_cli("upload", data.small.root, f"s3://{s3_bucket}/t/", "-r", "--tags", tags, env=env)
    result.fails(2).one_line()
    assert "--tags" in result.stderr
    status, body = seaweedfs.s3_request("GET", f"/{s3_bucket}?list-type=2")
    assert status == 200 and b"<Key>" not in body, body[:500]


# ---------------------------------------------------------------------------------------------------------
# Errors and exit codes


def test_wrong_secret_s3(seaweedfs: S3Server, s3_bucket: str, data: Data, tmp_path: Path) -> None:
    good = cli_env(seaweedfs.env())
    run_cli("upload", data.small.root / "CT_small.dcm", f"s3://{s3_bucket}/a.dcm", env=good).ok()
    env = cli_env(seaweedfs.env(), AWS_SECRET_ACCESS_KEY="0" * 32)
    url = f"s3://{s3_bucket}"
    run_cli("list", f"{url}/", env=env).fails(4).one_line()
    run_cli("upload", data.small.root / "CT_small.dcm", f"{url}/b.dcm", env=env).fails(4).one_line()
    run_cli("upload", data.small.root, f"{url}/tree/", "-r", env=env).fails(4).one_line()
    run_cli("download", f"{url}/a.dcm", tmp_path / "a.dcm", env=env).fails(4).one_line()
    run_cli("download", f"{url}/", tmp_path / "d", "-r", env=env).fails(4).one_line()
    run_cli("delete", f"{url}/a.dcm", "--force", env=env).fails(4).one_line()
    run_cli("share", f"{url}/a.dcm", env=env).fails(4).one_line()
    assert not (tmp_path / "a.dcm").exists()
    assert listed(Backend("s3", url, seaweedfs.env()), "") == {"a.dcm": len(data.small.files["CT_small.dcm"])}


def test_wrong_key_azure(azurite: AzureServer, azure_container: str, data: Data, tmp_path: Path) -> None:
    bad_key = "QUJD" * 22 + "QQ=="  # valid base64, wrong key
    env = cli_env(
        {"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string.replace(azurite.key, bad_key)}
    )
    url = f"azure://{azure_container}"
    run_cli("list", f"{url}/", env=env).fails(4).one_line()
    run_cli("upload", data.small.root / "CT_small.dcm", f"{url}/b.dcm", env=env).fails(4).one_line()
    run_cli("download", f"{url}/", tmp_path / "d", "-r", env=env).fails(4).one_line()


def test_readonly_identity_cannot_write(seaweedfs: S3Server, s3_bucket: str, data: Data) -> None:
    url = f"s3://{s3_bucket}"
    run_cli("upload", data.small.root / "CT_small.dcm", f"{url}/a.dcm", env=cli_env(seaweedfs.env())).ok()
    env = cli_env(seaweedfs.env(readonly=True))
    run_cli("list", f"{url}/", env=env).ok()  # reading is allowed
    run_cli("upload", data.small.root / "CT_small.dcm", f"{url}/b.dcm", env=env).fails(5)
    run_cli("upload", data.small.root, f"{url}/tree/", "-r", env=env).fails(5)
    run_cli("copy", f"{url}/a.dcm", f"{url}/c.dcm", env=env).fails(5)
    assert listed(Backend("s3", url, seaweedfs.env()), "") == {"a.dcm": len(data.small.files["CT_small.dcm"])}


@pytest.mark.parametrize("recursive", [False, True], ids=["one", "recursive"])
def test_readonly_identity_cannot_delete(seaweedfs: S3Server, s3_bucket: str, data: Data,
                                         recursive: bool) -> None:  # fmt: skip
    url = f"s3://{s3_bucket}"
    run_cli("upload", data.small.root / "CT_small.dcm", f"{url}/a.dcm", env=cli_env(seaweedfs.env())).ok()
    env = cli_env(seaweedfs.env(readonly=True))
    target = [f"{url}/", "-r"] if recursive else [f"{url}/a.dcm"]
    result = run_cli("delete", *target, "--force", env=env)
    assert listed(Backend("s3", url, seaweedfs.env()), "") == {"a.dcm": len(data.small.files["CT_small.dcm"])}
    result.fails(5)


@pytest.mark.parametrize("scheme", ["s3", "azure", "gs"])
def test_missing_bucket(request: pytest.FixtureRequest, scheme: str, data: Data, tmp_path: Path) -> None:
    server = request.getfixturevalue({"s3": "seaweedfs", "azure": "azurite", "gs": "fake_gcs"}[scheme])
    env = cli_env(server.env())
    url = f"{scheme}://missing-{uuid.uuid4().hex[:12]}"
    run_cli("list", f"{url}/", env=env).fails(3).one_line()
    run_cli("list", f"{url}/", "-r", "--json", env=env).fails(3).one_line()
    run_cli("upload", data.small.root / "CT_small.dcm", f"{url}/a.dcm", env=env).fails(3).one_line()
    run_cli("upload", data.small.root, f"{url}/t/", "-r", env=env).fails(3).one_line()
    run_cli("download", f"{url}/a.dcm", tmp_path / "a.dcm", env=env).fails(3).one_line()
    run_cli("download", f"{url}/", tmp_path / "d", "-r", env=env).fails(3).one_line()
    run_cli("delete", f"{url}/a.dcm", "--force", env=env).fails(3).one_line()
    assert list(tmp_path.iterdir()) == []


def test_missing_object_or_prefix(seaweedfs: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    env = cli_env(seaweedfs.env())
    url = f"s3://{s3_bucket}"
    run_cli("download", f"{url}/nope.dcm", tmp_path / "x.dcm", env=env).fails(3).one_line()
    run_cli("download", f"{url}/nope/", tmp_path / "d", "-r", env=env).fails(3).one_line()
    run_cli("copy", f"{url}/nope.dcm", f"{url}/x.dcm", env=env).fails(3).one_line()
    run_cli("delete", f"{url}/nope/", "-r", "--force", env=env).fails(3).one_line()
    assert list(tmp_path.iterdir()) == []


def test_missing_local_path(seaweedfs: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    env = cli_env(seaweedfs.env())
    missing = tmp_path / "no such dir"
    run_cli("upload", missing / "x.dcm", f"s3://{s3_bucket}/x.dcm", env=env).fails(3).one_line()
    run_cli("upload", f"{missing}/", f"s3://{s3_bucket}/x/", "-r", env=env).fails(3).one_line()
    run_cli("download", f"{missing}/", tmp_path / "d", "-r", env=env).fails(3).one_line()
    run_cli("copy", missing / "x.dcm", tmp_path / "y.dcm", env=env).fails(3).one_line()
    assert not missing.exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["list"], id="list"),
        pytest.param(["list", "-r", "--json"], id="list-r"),
        pytest.param(["delete", "-r", "--force"], id="delete-r"),
    ],
)
def test_missing_local_directory_listing(tmp_path: Path, command: list[str]) -> None:
    result = run_cli(command[0], f"{tmp_path / 'no such dir'}/", *command[1:], env=cli_env())
    result.fails(3)


@pytest.mark.parametrize("remote", REMOTE, indirect=True)
def test_closed_port_is_a_network_error(remote: Backend, data: Data, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    closed = f"127.0.0.1:{port}"
    if remote.name == "s3":
        env, extra = cli_env(remote.env), ["--endpoint", f"http://{closed}"]
    elif remote.name == "azure":
        conn = re.sub(r"127\.0\.0\.1:\d+", closed, remote.env["AZURE_STORAGE_CONNECTION_STRING"])
        env, extra = cli_env({"AZURE_STORAGE_CONNECTION_STRING": conn}), []
    else:
        env, extra = cli_env(remote.env, STORAGE_EMULATOR_HOST=f"http://{closed}"), []
    for args in (
        ["list", remote.url()],
        ["upload", data.small.root / "CT_small.dcm", remote.url("a.dcm")],
        ["upload", data.small.root, remote.url("t/"), "-r"],
        ["download", remote.url("t/"), tmp_path / "d", "-r"],
    ):
        # A hang (retrying a closed port without end) fails through run_cli's 60 s timeout.
        result = run_cli(*args, *extra, "--retries", "0", "--timeout", "5", env=env, timeout=60)
        result.fails(6).one_line()
    assert not (tmp_path / "d").exists()


def test_usage_errors(seaweedfs: S3Server, s3_bucket: str, data: Data, tmp_path: Path) -> None:
    env = cli_env(seaweedfs.env())
    url = f"s3://{s3_bucket}"
    run_cli("upload", data.small.root / "CT_small.dcm", f"{url}/t/CT_small.dcm", env=env).ok()
    cases: list[list[str | Path]] = [
        # a directory or prefix without -r
        ["upload", data.small.root, f"{url}/x/"],
        ["download", f"{url}/t", tmp_path / "d"],
        ["download", f"{url}/t/", tmp_path / "d"],
        ["copy", f"{url}/t/", f"{url}/u/"],
        ["delete", f"{url}/t/", "--force"],
        # bad schemes and URLs
        ["upload", data.small.root / "CT_small.dcm", "ftp://host/x.dcm"],
        ["list", "http://example.com/bucket/"],
        ["download", "s3://", tmp_path / "x"],
        ["list", "s3://Bad_Bucket!/"],
        ["list", "gs://UPPER/"],
        ["upload", data.small.root / "CT_small.dcm", "file://relative/x.dcm"],
        # wrong direction
        ["upload", f"{url}/t/CT_small.dcm", f"{url}/x.dcm"],
        ["download", f"{url}/t/CT_small.dcm", f"{url}/x.dcm"],
        # bad option values
        ["upload", data.small.root / "CT_small.dcm", f"{url}/x.dcm", "--part-size", "1MiB"],
        ["upload", data.small.root / "CT_small.dcm", f"{url}/x.dcm", "--part-size", "lots"],
        ["upload", data.small.root / "CT_small.dcm", f"{url}/x.dcm", "--multipart-threshold", "0"],
        ["upload", data.small.root / "CT_small.dcm", f"{url}/x.dcm", "--encrypt", "client-side"],
        ["share", f"{url}/t/CT_small.dcm", "--expires", "8d"],
    ]
    for args in cases:
        run_cli(*args, env=env).fails(2)  # (argument errors may show the usage text first)
    # Errors from the argument parser itself: exit 2, a usage message, no traceback.
    for argv in (["upload", "--nope", "a", "b"], ["upload", "only-one"], ["frobnicate"],
                 ["upload", "a", "b", "--parallel", "0"]):  # fmt: skip
        result = run_cli(*argv, env=env)
        assert result.code == 2 and "Traceback" not in result.stderr, str(result)
        assert "usage" in result.stderr.lower() or "error" in result.stderr.lower(), str(result)
    assert not (tmp_path / "d").exists()
    assert listed(Backend("s3", url, seaweedfs.env()), "") == {
        "t/CT_small.dcm": len(data.small.files["CT_small.dcm"])
    }


@pytest.mark.parametrize(
    "target",
    ["s3://{s3}/a/../x.dcm", "s3://{s3}/a//x.dcm", "azure://{az}/a/../x.dcm", "azure://{az}/./x.dcm"],
)
def test_dot_segments_in_remote_urls_are_usage_errors(
    seaweedfs: S3Server, s3_bucket: str, azurite: AzureServer, azure_container: str, data: Data, target: str
) -> None:
    env = cli_env(seaweedfs.env(), azurite.env())
    url = target.format(s3=s3_bucket, az=azure_container)
    run_cli("upload", data.small.root / "CT_small.dcm", url, env=env).fails(2)


# ---------------------------------------------------------------------------------------------------------
# Hostile object names


@pytest.fixture(scope="module")
def fake_gcs_memory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GCSServer]:
    """fake-gcs-server with its memory backend: keeps object names verbatim (its filesystem backend
    resolves '..' into its own data directory)."""
    workdir = tmp_path_factory.mktemp("fake-gcs-memory")
    (port,) = free_ports(1)
    argv = [str(_fake_gcs_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
            "-backend", "memory", "-external-url", f"http://127.0.0.1:{port}",
            "-public-host", f"127.0.0.1:{port}"]  # fmt: skip
    proc = _Proc("fake-gcs-memory", argv, workdir)
    server = GCSServer(endpoint=f"http://127.0.0.1:{port}", _proc=proc)
    try:
        _wait_until(
            proc, lambda: _port_open(port) and _request("GET", f"{server.endpoint}/storage/v1/b")[0] == 200
        )
    except RuntimeError as e:
        pytest.fail(f"fake-gcs-server (memory) could not start: {e}", pytrace=False)
    yield server
    server.stop()


def _unsafe(relative: str) -> bool:
    """Whether a name could not be written as-is under a local directory."""
    return (
        "\\" in relative
        or "\x00" in relative
        or relative.startswith("/")
        or any(seg in ("", ".", "..") for seg in relative.split("/"))
    )


@dataclass
class Hostile:
    url: str  # the prefix to download: ".../h/"
    env: dict[str, str]
    stored: dict[str, bytes]  # names under the prefix as the server stored them -> content
    escape_target: Path  # a path outside the test's directories that a traversal would create

    @property
    def safe(self) -> dict[str, bytes]:
        return {k: v for k, v in self.stored.items() if not _unsafe(k)}

    @property
    def unsafe(self) -> list[str]:
        return sorted(k for k in self.stored if _unsafe(k))


def _gcs_put_raw(server: GCSServer, bucket: str, name: str, body: bytes) -> int:
    quoted = urllib.parse.quote(name, safe="")
    return _request(
        "POST",
        f"{server.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={quoted}",
        {"Content-Type": "application/octet-stream"},
        body,
    )[0]


def _gcs_names(server: GCSServer, bucket: str) -> list[str]:
    status, body = _request("GET", f"{server.endpoint}/storage/v1/b/{bucket}/o")
    assert status == 200, body[:500]
    return [item["name"] for item in json.loads(body).get("items", [])]


def _content(name: str) -> bytes:
    return b"DICM-ish " + name.encode("utf-8", "surrogateescape")


@pytest.fixture(params=["s3", "azure", "gcs", "gcs-memory"])
def hostile(request: pytest.FixtureRequest) -> Hostile:
    """Objects with hostile names put through raw requests, and the names each server really stored."""
    kind = request.param
    escape = Path(tempfile.gettempdir()) / f"dicom-cloud-escape-{uuid.uuid4().hex}.dcm"
    deep = "../" * 12 + str(escape).lstrip("/")  # h/../../..../tmp/dicom-cloud-escape-*.dcm
    names: list[str]
    if kind == "s3":
        server: Any = request.getfixturevalue("seaweedfs")
        bucket = request.getfixturevalue("s3_bucket")
        for name in ["x/../../evil.dcm", "../evil2.dcm", deep, "/lead.dcm", "back\\slash.dcm", "./dot.dcm",
                     "ok.dcm", "sub/ok2.dcm"]:  # fmt: skip
            server.s3_request("PUT", f"/{bucket}/h/{name}", _content("h/" + name))  # SeaweedFS refuses some
        status, body = server.s3_request("GET", f"/{bucket}?list-type=2")
        assert status == 200, body[:500]
        names = [html.unescape(n) for n in re.findall(r"<Key>(.*?)</Key>", body.decode())]

        def fetch(name: str) -> bytes:
            body: bytes = server.s3_request("GET", f"/{bucket}/{name}")[1]
            return body

        url, env = f"s3://{bucket}/h/", server.env()
    elif kind == "azure":
        server = request.getfixturevalue("azurite")
        bucket = request.getfixturevalue("azure_container")
        for path in ["x/../../evil.dcm", "..%2F..%2Fevil2.dcm", deep, "%2Flead.dcm", "back%5Cslash.dcm",
                     "ok.dcm", "sub/ok2.dcm"]:  # fmt: skip
            status, _ = server.azure_request(
                "PUT", f"/{bucket}/h/{path}", {"x-ms-blob-type": "BlockBlob"}, _content("h/" + path)
            )
            assert status == 201
        status, body = server.azure_request("GET", f"/{bucket}?restype=container&comp=list")
        assert status == 200, body[:500]
        names = [html.unescape(n) for n in re.findall(r"<Name>(.*?)</Name>", body.decode())]

        def fetch(name: str) -> bytes:
            body: bytes = server.azure_request("GET", f"/{bucket}/{name}")[1]
            return body

        url, env = f"azure://{bucket}/h/", server.env()
    else:
        server = request.getfixturevalue("fake_gcs" if kind == "gcs" else "fake_gcs_memory")
        if kind == "gcs":
            bucket = request.getfixturevalue("gcs_bucket")
            # The filesystem backend maps names to files: no '..' that would climb out of its bucket.
            raw = ["x/../y/evil.dcm", "/lead.dcm", "back\\slash.dcm", "ok.dcm", "sub/ok2.dcm"]
        else:
            bucket = f"mem-{uuid.uuid4().hex[:12]}"
            server.create_bucket(bucket)
            raw = ["x/../../evil.dcm", "../evil2.dcm", deep, "/lead.dcm", "back\\slash.dcm", "./dot.dcm",
                   "sub/..", "ok.dcm", "sub/ok2.dcm"]  # fmt: skip
        for name in raw:
            assert _gcs_put_raw(server, bucket, "h/" + name, _content("h/" + name)) == 200
        names = _gcs_names(server, bucket)

        def fetch(name: str) -> bytes:
            quoted = urllib.parse.quote(name, safe="")
            return _request("GET", f"{server.endpoint}/storage/v1/b/{bucket}/o/{quoted}?alt=media")[1]

        url, env = f"gs://{bucket}/h/", server.env()
    # Content only matters for the names that can be downloaded.
    stored = {n[2:]: (b"" if _unsafe(n[2:]) else fetch(n)) for n in names if n.startswith("h/")}
    assert stored.get("ok.dcm") == _content("h/ok.dcm") and "sub/ok2.dcm" in stored, stored
    return Hostile(url, env, stored, escape)


def _download_hostile(hostile: Hostile, tmp_path: Path) -> tuple[Result, Path, Path]:
    jail = tmp_path / "jail"
    cwd = jail / "a" / "b"
    cwd.mkdir(parents=True)
    dest = cwd / "dest"
    result = run_cli("download", hostile.url, f"{dest}/", "-r", env=cli_env(hostile.env), cwd=cwd)
    return result, jail, dest


def test_hostile_names_never_escape(hostile: Hostile, tmp_path: Path) -> None:
    result, jail, dest = _download_hostile(hostile, tmp_path)
    try:
        outside = [p for p in jail.rglob("*") if p.is_file() and dest not in p.parents]
        assert not outside, f"written outside {dest}: {outside}\n{result}"
        assert not hostile.escape_target.exists(), f"{hostile.escape_target} written!\n{result}"
        assert "Traceback" not in result.stderr, str(result)
        if hostile.unsafe:
            assert result.code in (1, 9), f"unsafe names {hostile.unsafe} but:\n{result}"
        else:
            result.ok()  # the server normalised every name: a plain download
        if dest.exists():
            for rel, path in local_files(dest).items():
                assert rel in hostile.safe and path.read_bytes() == hostile.safe[rel], rel
    finally:
        hostile.escape_target.unlink(missing_ok=True)


def _hostile_xfail(kind: str, reason: str) -> Any:
    return pytest.param(kind, marks=pytest.mark.xfail(reason=reason, strict=True))


@pytest.mark.parametrize(
    "hostile",
    [
        "s3",
        "gcs",
        _hostile_xfail(
            "azure",
            "KNOWN LIMITATION: one blob named with '..' makes obstore's listing fail, so a recursive "
            "download of that prefix stops with exit 9 naming the problem; no safe object is downloaded",
        ),
        "gcs-memory",
    ],
    indirect=True,
)
def test_hostile_names_safe_objects_downloaded(hostile: Hostile, tmp_path: Path) -> None:
    result, _, dest = _download_hostile(hostile, tmp_path)
    hostile.escape_target.unlink(missing_ok=True)
    if not hostile.unsafe:
        result.ok()
    else:
        assert result.code == 1, str(result)  # some transfers failed, the others completed
        failed = f"{len(hostile.unsafe)} of {len(hostile.stored)} transfers failed"
        assert failed in result.stderr, str(result)
    assert_same_tree(dest, hostile.safe)


# ---------------------------------------------------------------------------------------------------------
# Clean exit


def test_clean_exit_repeated(seaweedfs: S3Server, s3_bucket: str, data: Data, tmp_path: Path) -> None:
    """obstore can abort CPython's shutdown (SIGABRT): every run must still exit 0."""
    env = cli_env(seaweedfs.env())
    url = f"s3://{s3_bucket}/many/"
    run_cli("upload", data.many.root, url, "-r", env=env).ok()
    codes = []
    for i in range(15):
        listing = run_cli("list", f"s3://{s3_bucket}/", "-r", env=env)
        dest = tmp_path / f"d{i}"
        download = run_cli("download", url, dest, "-r", "-q", env=env)
        codes.append((listing.code, download.code))
        listing.ok()
        assert len(listing.stdout.splitlines()) == 50
        download.ok()
        assert len(local_files(dest)) == 50
        shutil.rmtree(dest)
    assert codes == [(0, 0)] * 15
    final = tmp_path / "final"
    run_cli("download", url, final, "-r", env=env).ok()
    assert_same_tree(final, data.many)


# ---------------------------------------------------------------------------------------------------------
# Server-side encryption and what a person sees on a terminal


def test_server_side_encryption_on_s3(seaweedfs: S3Server, s3_bucket: str, data: Data) -> None:
    env = cli_env(seaweedfs.env())
    source = data.small.root / "CT_small.dcm"
    run_cli("upload", source, f"s3://{s3_bucket}/sse/a.dcm", "--encrypt", "server-side", env=env).ok()
    run_cli("upload", source, f"s3://{s3_bucket}/sse/plain.dcm", env=env).ok()
    status, headers = seaweedfs.s3_head(f"/{s3_bucket}/sse/a.dcm")
    assert status == 200 and headers.get("x-amz-server-side-encryption") == "AES256", headers
    status, headers = seaweedfs.s3_head(f"/{s3_bucket}/sse/plain.dcm")
    assert status == 200 and "x-amz-server-side-encryption" not in headers, headers
    # And it reads back as the same bytes.
    out = data.small.root.parent / "sse-back.dcm"
    run_cli("download", f"s3://{s3_bucket}/sse/a.dcm", out, env=env).ok()
    assert out.read_bytes() == source.read_bytes()
    run_cli("upload", source, f"s3://{s3_bucket}/x.dcm", "--encrypt", "client-side", env=env).fails(2)


def test_progress_bar_on_a_terminal(seaweedfs: S3Server, s3_bucket: str, data: Data, tmp_path: Path) -> None:
    """On a terminal the transfer shows a live bar and ends with one summary line."""
    import pty

    env = cli_env(seaweedfs.env(), COLUMNS="120", TERM="xterm")
    argv = [str(CLI), "upload", str(data.small.root), f"s3://{s3_bucket}/tty/", "-r"]
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI with the pty as its terminal
        os.execve(argv[0], argv, env)  # noqa: S606 - the real console script, no shell
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    text = output.decode("utf-8", "replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "Uploaded" in text and "0 failed" in text, text
    assert "Traceback" not in text


def test_aws_profile_from_shared_files(
    seaweedfs: S3Server, s3_bucket: str, data: Data, tmp_path: Path
) -> None:
    """Keys from ~/.aws/credentials under AWS_PROFILE, region and endpoint from ~/.aws/config."""
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[archive]\n"
        f"aws_access_key_id = {seaweedfs.access_key}\n"
        f"aws_secret_access_key = {seaweedfs.secret_key}\n"
    )
    config = tmp_path / "config"
    config.write_text(f"[profile archive]\nregion = us-east-1\nendpoint_url = {seaweedfs.endpoint}\n")
    env = cli_env(AWS_PROFILE="archive")
    env["AWS_SHARED_CREDENTIALS_FILE"], env["AWS_CONFIG_FILE"] = str(credentials), str(config)
    run_cli("upload", data.small.root / "CT_small.dcm", f"s3://{s3_bucket}/profile/a.dcm", env=env).ok()
    listing = run_cli("list", f"s3://{s3_bucket}/profile/", env=env).ok()
    assert "a.dcm" in listing.stdout
    env["AWS_PROFILE"] = "missing"
    run_cli("list", f"s3://{s3_bucket}/", env=env).fails(2)


def _profile_files(tmp_path: Path, config: str, credentials: str = "") -> dict[str, str]:
    (tmp_path / "aws-config").write_text(config)
    (tmp_path / "aws-credentials").write_text(credentials)
    return {
        "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
    }


def _profile_round_trip(url: str, data: Data, tmp_path: Path, env: dict[str, str]) -> None:
    """Upload (one object multipart), list, list the buckets, share, download: every signer the S3
    store uses."""
    run_cli("upload", data.small.root / "CT_small.dcm", f"{url}a.dcm", env=env).ok()
    run_cli("upload", data.full.root / BIG, f"{url}big.dcm", *MULTIPART, env=env).ok()
    listing = run_cli("list", url, env=env).ok()
    assert "a.dcm" in listing.stdout and "big.dcm" in listing.stdout
    assert url.split("/")[2] in run_cli("list", "s3://", env=env).ok().stdout  # ListBuckets, our SigV4
    link = run_cli("share", f"{url}a.dcm", "--expires", "10m", env=env).ok().stdout.strip()
    with httpx.Client(trust_env=False, timeout=30) as client:  # presigned with the same keys
        assert client.get(link).content == data.small.files["CT_small.dcm"]
    out = tmp_path / "back"
    run_cli("download", url, out, "--recursive", env=env).ok()
    assert (out / "a.dcm").read_bytes() == data.small.files["CT_small.dcm"]
    assert (out / "big.dcm").read_bytes() == data.full.files[BIG]


def test_aws_profile_with_credential_process(
    seaweedfs: S3Server, s3_bucket: str, data: Data, tmp_path: Path
) -> None:
    """A profile whose keys come from credential_process (run by botocore, as the AWS CLI runs it)."""
    script = tmp_path / "credentials.py"
    keys = {"Version": 1, "AccessKeyId": seaweedfs.access_key, "SecretAccessKey": seaweedfs.secret_key}
    script.write_text(f"import json\nprint(json.dumps({keys!r}))\n")
    env = cli_env(AWS_PROFILE="process")
    env.update(
        _profile_files(
            tmp_path,
            f"[profile process]\ncredential_process = {sys.executable} {script}\n"
            f"region = us-east-1\nendpoint_url = {seaweedfs.endpoint}\n",
        )
    )
    _profile_round_trip(f"s3://{s3_bucket}/process/", data, tmp_path, env)
    verbose = run_cli("list", f"s3://{s3_bucket}/process/", "--verbose", env=env).ok()
    assert seaweedfs.secret_key not in verbose.stdout + verbose.stderr
    script.write_text("import sys\nsys.exit('no credentials today')\n")
    failed = run_cli("list", f"s3://{s3_bucket}/process/", env=env).fails(4).one_line()
    assert "AWS profile 'process' (credential_process)" in failed.stderr


def test_aws_profile_assuming_a_role(seaweedfs: S3Server, s3_bucket: str, data: Data, tmp_path: Path) -> None:
    """role_arn + source_profile: botocore assumes the role through the server's STS with the source
    profile's keys; every request then carries the role session's temporary keys and token."""
    config = (
        f"[profile base]\nregion = us-east-1\nendpoint_url = {seaweedfs.endpoint}\n"
        f"[profile archive]\nrole_arn = {seaweedfs.role_arn}\nsource_profile = base\n"
        f"region = us-east-1\nendpoint_url = {seaweedfs.endpoint}\n"
        f"[profile other-role]\nrole_arn = arn:aws:iam::000000000000:role/nobody\nsource_profile = base\n"
        f"region = us-east-1\nendpoint_url = {seaweedfs.endpoint}\n"
    )
    credentials = (
        f"[base]\naws_access_key_id = {seaweedfs.access_key}\n"
        f"aws_secret_access_key = {seaweedfs.secret_key}\n"
    )
    env = cli_env(AWS_PROFILE="archive")
    env.update(_profile_files(tmp_path, config, credentials))
    _profile_round_trip(f"s3://{s3_bucket}/role/", data, tmp_path, env)
    env["AWS_PROFILE"] = (
        "other-role"  # a role the source identity may not assume: refused, nothing else tried
    )
    failed = run_cli("list", f"s3://{s3_bucket}/role/", env=env).fails(4).one_line()
    assert "AWS profile 'other-role' (role_arn)" in failed.stderr


def test_azure_account_and_key_variables(azurite: AzureServer, azure_container: str, data: Data) -> None:
    env = cli_env(
        AZURE_STORAGE_ACCOUNT=azurite.account,
        AZURE_STORAGE_KEY=azurite.key,
        AZURE_STORAGE_BLOB_ENDPOINT=azurite.endpoint,
    )
    run_cli("upload", data.small.root / "CT_small.dcm", f"az://{azure_container}/k/a.dcm", env=env).ok()
    assert "a.dcm" in run_cli("list", f"azure://{azure_container}/k/", env=env).ok().stdout
    env["AZURE_STORAGE_KEY"] = base64.b64encode(b"x" * 64).decode()
    run_cli("list", f"azure://{azure_container}/k/", "--retries", "0", env=env).fails(4)


def test_sse_customer_key_from_the_command_line(
    seaweedfs: S3Server, s3_bucket: str, data: Data, tmp_path: Path
) -> None:
    """SSE-C: the key file is needed to write and to read back; without it the read is refused."""
    key_file = tmp_path / "sse.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    env = cli_env(seaweedfs.env())
    source = data.small.root / "CT_small.dcm"
    url = f"s3://{s3_bucket}/ssec/a.dcm"
    run_cli("upload", source, url, "--sse-customer-key-file", key_file, env=env).ok()
    back = tmp_path / "back.dcm"
    run_cli("download", url, back, "--sse-customer-key-file", key_file, env=env).ok()
    assert back.read_bytes() == source.read_bytes()
    refused = run_cli("download", url, tmp_path / "nokey.dcm", "--retries", "0", env=env)
    assert refused.code != 0 and "Traceback" not in refused.stderr, str(refused)
    assert not (tmp_path / "nokey.dcm").exists()
    bad = tmp_path / "bad.key"
    bad.write_text(base64.b64encode(os.urandom(16)).decode())
    result = run_cli("upload", source, url, "--sse-customer-key-file", bad, env=env).fails(2)
    assert "16 bytes" in result.stderr and bad.read_text().strip() not in result.stderr
    run_cli("upload", source, url, "--gcs-kms-key", "projects/p/locations/l/keyRings/r/cryptoKeys/k",
            env=env).fails(2)  # fmt: skip


def test_dicom_aware_upload(
    seaweedfs: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--layout names objects from headers, --validate leaves non-DICOM out with a reason,
    --dicom-tags records attributes, and patient data is refused in names, metadata and --tags."""
    src = tmp_path / "study"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(_pydicom_file(name), src / name)
    (src / "notes.txt").write_text("not an image")
    env = cli_env(seaweedfs.env())
    url = f"s3://{s3_bucket}/archive/"
    result = run_cli(
        "upload", src, url, "-r", "--layout", "uid", "--validate", "--dicom-tags", "Modality", env=env
    )
    result.ok()
    assert "notes.txt" in result.stderr and "not DICOM" in result.stderr
    ct = pydicom.dcmread(src / "CT_small.dcm", stop_before_pixels=True)
    key = f"archive/{ct.StudyInstanceUID}/{ct.SeriesInstanceUID}/{ct.SOPInstanceUID}.dcm"
    listing = run_cli("list", url, "-r", "--json", env=env).ok().json_lines()
    assert key in [r["key"] for r in listing] and len(listing) == 2
    for var, value in seaweedfs.env().items():
        monkeypatch.setenv(var, value)
    from dicom_cloud import api

    assert api.stat(f"s3://{s3_bucket}/{key}").metadata.get("dicom_modality") == "CT"
    hashed = run_cli(
        "upload", src, f"s3://{s3_bucket}/hashed/", "-r", "--layout", "hashed", "--validate", env=env
    )
    hashed.ok()
    names = [
        r["key"] for r in run_cli("list", f"s3://{s3_bucket}/hashed/", "-r", "--json", env=env).json_lines()
    ]
    assert names and not any(ct.SOPInstanceUID in n or ct.StudyInstanceUID in n for n in names)
    for refused in (
        ["--layout", "{PatientName}/{SOPInstanceUID}.dcm"],
        ["--dicom-tags", "PatientID"],
        ["--tags", "PatientID=123"],
    ):
        run_cli("upload", src / "CT_small.dcm", url, *refused, env=env).fails(2)
    run_cli("upload", src / "CT_small.dcm", url, "--tags", "PatientID=123", "--allow-phi", env=env).ok()
    run_cli("upload", src / "notes.txt", url, "--layout", "uid", env=env).fails(12)


def test_deidentify_filters_manifest_and_study_download(
    seaweedfs: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """--deidentify on the way up (consistent UIDs, no patient data), a manifest of what went where,
    selection by modality, `list --studies`, and `download --study` of one study."""
    src = tmp_path / "study"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"):
        shutil.copy(_pydicom_file(name), src / name)
    secret = tmp_path / "deid.key"
    secret.write_bytes(os.urandom(32))
    env = cli_env(seaweedfs.env())
    url = f"s3://{s3_bucket}/anon/"
    manifest = tmp_path / "manifest.jsonl"
    run_cli(
        "upload", src, url, "-r", "--deidentify", "--deid-secret-file", secret, "--layout", "uid",
        "--manifest", manifest, env=env,
    ).ok()  # fmt: skip
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert {r["status"] for r in rows} == {"uploaded"} and len(rows) == 3
    ct = pydicom.dcmread(src / "CT_small.dcm", stop_before_pixels=True)
    assert all(ct.StudyInstanceUID not in json.dumps(r) for r in rows)
    back = tmp_path / "back"
    run_cli("download", url, back, "-r", env=env).ok()
    for path in back.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert str(ds.PatientName).startswith("ANON-") and ds.PatientName != ct.PatientName
        assert not str(ds.StudyInstanceUID).startswith("1.3.6.1.4.1.5962")
    studies = run_cli("list", url, "-r", "--studies", "--json", env=env).ok().json_lines()
    assert len(studies) == 3 and sum(s["instances"] for s in studies) == 3
    ct_row = next(r for r in rows if r["modality"] == "CT")
    one = tmp_path / "one"
    run_cli("download", url, one, "-r", "--study", ct_row["study_instance_uid"], env=env).ok()
    assert len(list(one.rglob("*.dcm"))) == 1
    only_mr = tmp_path / "mr"
    run_cli("upload", src, f"s3://{s3_bucket}/mr/", "-r", "--modality", "MR", env=env).ok()
    run_cli("download", f"s3://{s3_bucket}/mr/", only_mr, "-r", env=env).ok()
    assert [p.name for p in only_mr.rglob("*.dcm")] == ["MR_small.dcm"]
    run_cli("upload", src, url, "-r", "--deidentify", env=env).fails(2)


def test_on_conflict_deid_map_and_metadata_listing(
    seaweedfs: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """Two files with one SOP Instance UID but different bytes meet under a DICOM layout."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(_pydicom_file("MR_small.dcm"), src / "a.dcm")
    shutil.copy(_pydicom_file("MR_truncated.dcm"), src / "b.dcm")  # same UIDs, other bytes
    env = cli_env(seaweedfs.env())
    url = f"s3://{s3_bucket}/c/"
    common = ["--layout", "uid", "--dicom-tags", "Modality"]
    run_cli("upload", src / "a.dcm", url, *common, env=env).ok()
    run_cli(
        "upload", src / "a.dcm", url, *common, "--on-conflict", "fail", env=env
    ).ok()  # identical: skipped
    run_cli("upload", src / "b.dcm", url, *common, "--on-conflict", "fail", env=env).fails(8)
    run_cli("upload", src / "b.dcm", url, *common, "--on-conflict", "skip", env=env).ok()
    assert len(run_cli("list", url, "-r", "--json", env=env).ok().json_lines()) == 1
    run_cli("upload", src / "b.dcm", url, *common, "--on-conflict", "keep-both", env=env).ok()
    listed = run_cli("list", url, "-r", "--json", "--metadata", env=env).ok().json_lines()
    assert len(listed) == 2 and any("~" in r["key"] for r in listed)
    assert all(r["metadata"].get("dicom_modality") == "MR" for r in listed)
    secret, mapping = tmp_path / "deid.key", tmp_path / "map.jsonl"
    secret.write_bytes(os.urandom(32))
    run_cli("upload", src / "a.dcm", f"s3://{s3_bucket}/anon/", "--deidentify", "--deid-secret-file", secret,
            "--deid-map", mapping, env=env).ok()  # fmt: skip
    pairs = [json.loads(line) for line in mapping.read_text().splitlines()]
    mr = pydicom.dcmread(src / "a.dcm", stop_before_pixels=True)
    assert any(p["old"] == mr.SOPInstanceUID and p["new"].startswith("2.25.") for p in pairs)
