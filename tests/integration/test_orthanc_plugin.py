"""The Orthanc storage plugin inside a real Orthanc (1.10, orthanc-python 4.0) on real storage servers.

One Orthanc per backend for the module (SeaweedFS, Azurite, fake-gcs-server, a local directory), each
configured by ``dicom-cloud orthanc-config`` and storing encrypted (A1). Through Orthanc's REST API:
upload pydicom's valid test files, read them back byte for byte, find the objects under the names the
C++ plugins give them, decrypt them with the CLI, delete them. Then hybrid mode (a migration from
Orthanc's own file storage, moved both ways with /move-storage, synchronously and asynchronously),
DICOMweb (Orthanc's plugin) on top of our storage, and failures: the object store down during a create
and during a remove, with a TCP proxy between Orthanc and SeaweedFS.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from test_cli import cli_env, run_cli

from dicom_cloud.crypto import a1
from dicom_cloud.crypto.keys import KeyRing, MasterKey
from orthanc_server import OrthancError, OrthancServer, start_orthanc, wait_exit
from servers import AzureServer, GCSServer, S3Server

KEY_ID = 7
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: Malformed on purpose in pydicom's test files: not what an archive must keep.
_MALFORMED = {"badVR.dcm"}


# ---------------------------------------------------------------------------------------------------------
# Test data


@dataclass(frozen=True)
class Dicom:
    name: str
    data: bytes
    sop_uid: str
    study_uid: str
    series_uid: str


def _valid_test_files() -> list[Dicom]:
    """pydicom's test files that read without force and carry their identities, one per SOP instance."""
    root = Path(pydicom.__file__).parent / "data" / "test_files"
    seen: set[str] = set()
    out = []
    for path in sorted(root.rglob("*.dcm")):
        if path.name in _MALFORMED:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # odd files are read leniently, and judged by Orthanc
                ds = pydicom.dcmread(path)
            ids = (str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
            ds.file_meta.TransferSyntaxUID  # noqa: B018 - must have file meta
        except Exception:  # noqa: S112 - not a valid file: not part of the set
            continue
        if ids[0] in seen:
            continue
        seen.add(ids[0])
        out.append(Dicom(path.name, path.read_bytes(), *ids))
    return out


CANDIDATES = _valid_test_files()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Dicom]:
    """The candidates that Orthanc itself accepts, judged by an Orthanc on its own file storage."""
    orthanc = start_orthanc(tmp_path_factory.mktemp("orthanc-judge"), {"Name": "judge"})
    try:
        accepted = [d for d in CANDIDATES if orthanc.request("POST", "/instances", d.data)[0] == 200]
    finally:
        orthanc.stop()
    assert len(accepted) >= 25, [d.name for d in CANDIDATES if d not in accepted]
    return accepted


def _make_key(directory: Path, key_id: int = KEY_ID) -> Path:
    path = directory / f"master-{key_id}.key"
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------
# Orthanc per backend


@dataclass
class PluginOrthanc:
    backend: str
    orthanc: OrthancServer
    config: dict[str, Any]
    key_file: Path
    #: Environment of the CLI and of direct store access for this backend.
    env: dict[str, str]
    #: "s3://bucket", "azure://container", "gs://bucket" or the local directory.
    location: str
    ids: dict[str, str]  # file name -> Orthanc instance id
    files: list[Dicom]
    seaweedfs: S3Server
    azurite: AzureServer

    def url(self, key: str) -> str:
        if self.backend == "local":
            return str(Path(self.location) / key)
        return f"{self.location}/{key}"

    def object_names(self) -> list[str]:
        result = run_cli("list", self.url(""), "--recursive", "--json", env=self.env).ok()
        names = []
        for line in result.stdout.splitlines():
            record = json.loads(line)
            key = record.get("key") or record.get("url") or ""
            names.append(key.rsplit("/", 1)[-1] if self.backend != "local" else Path(key).name)
        return sorted(n for n in names if n)


def _orthanc_config(args: list[str | Path], env: dict[str, str]) -> dict[str, Any]:
    result = run_cli("orthanc-config", *args, env=env).ok()
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def _start_backend(
    backend: str,
    tmp: Path,
    seaweedfs: S3Server,
    azurite: AzureServer,
    fake_gcs: GCSServer,
    name: str,
    files: list[Dicom],
) -> PluginOrthanc:
    key = _make_key(tmp)
    common: list[str | Path] = ["--master-key", f"{KEY_ID}:{key}", "--storage-directory", tmp / "orthanc"]
    orthanc_env: dict[str, str] = {}
    if backend == "s3":
        seaweedfs.create_bucket(name)
        env = cli_env(seaweedfs.env())
        args: list[str | Path] = [
            "--s3",
            name,
            "--endpoint",
            seaweedfs.endpoint,
            "--embed-credentials",
            "--storage-class",
            "STANDARD_IA",
        ]
        location = f"s3://{name}"
    elif backend == "azure":
        # No container yet: the plugin creates it at start-up (CreateContainerIfNotExists, default true).
        env = cli_env(azurite.env())
        args = ["--azure", name, "--access-tier", "Cool"]
        location = f"azure://{name}"
    elif backend == "gcs":
        fake_gcs.create_bucket(name)
        env = cli_env(fake_gcs.env())
        args = ["--gcs", name, "--service-account-file", fake_gcs.service_account_file()]
        orthanc_env = {"STORAGE_EMULATOR_HOST": fake_gcs.endpoint, "GOOGLE_CLOUD_PROJECT": "test"}
        location = f"gs://{name}"
    else:
        env = cli_env()
        location = str(tmp / "objects")
        args = ["--local", location]
    config = _orthanc_config([*args, *common, "--dicomweb"], env)
    if backend == "s3":
        config["AwsS3Storage"]["Tags"] = {"Source": "orthanc-tests"}
    orthanc = start_orthanc(tmp / "run", config, env=orthanc_env)
    return PluginOrthanc(backend, orthanc, config, key, env, location, {}, files, seaweedfs, azurite)


@pytest.fixture(scope="module", params=["s3", "azure", "gcs", "local"])
def plugin(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    seaweedfs: S3Server,
    azurite: AzureServer,
    fake_gcs: GCSServer,
    files: list[Dicom],
) -> Iterator[PluginOrthanc]:
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"orthanc-{backend}")
    started = _start_backend(
        backend, tmp, seaweedfs, azurite, fake_gcs, f"orthanc-{backend}-{os.getpid()}", files
    )
    yield started
    started.orthanc.stop()


def _upload_all(plugin: PluginOrthanc) -> None:
    if plugin.ids:
        return
    for dicom in plugin.files:
        answer = plugin.orthanc.post("/instances", dicom.data)
        assert answer["Status"] == "Success", (dicom.name, answer)
        plugin.ids[dicom.name] = answer["ID"]


# ---------------------------------------------------------------------------------------------------------
# Per backend: store, read, names, decrypt, DICOMweb, delete (in this order, on one Orthanc)


def test_upload_and_read_back_byte_identical(plugin: PluginOrthanc) -> None:
    assert len(plugin.files) >= 25
    _upload_all(plugin)
    assert len(plugin.orthanc.get_json("/instances")) == len(plugin.files)
    for dicom in plugin.files:
        assert plugin.orthanc.get(f"/instances/{plugin.ids[dicom.name]}/file") == dicom.data, dicom.name


def test_object_names_are_those_of_the_cpp_plugins(plugin: PluginOrthanc) -> None:
    _upload_all(plugin)
    names = plugin.object_names()
    expected = set()
    for instance in plugin.ids.values():
        for attachment in ("dicom", "dicom-until-pixel-data"):
            with contextlib.suppress(OrthancError):  # not every instance has pixel data
                info = plugin.orthanc.get_json(f"/instances/{instance}/attachments/{attachment}/info")
                extension = ".dcm" if info["ContentType"] == 1 else ".dcm.head"
                expected.add(f"{info['Uuid']}{extension}.enc")
    assert set(names) == expected
    assert all(UUID.match(n) for n in names)


# StorageClass/Tags are AwsS3Storage keys, AccessTier an AzureBlobStorage key.
@pytest.mark.parametrize("plugin", ["s3", "azure"], indirect=True)
def test_storage_class_access_tier_and_tags(plugin: PluginOrthanc) -> None:
    _upload_all(plugin)
    instance = next(iter(plugin.ids.values()))
    uuid = plugin.orthanc.get_json(f"/instances/{instance}/attachments/dicom/info")["Uuid"]
    bucket = plugin.location.split("://")[1]
    if plugin.backend == "s3":
        status, headers = plugin.seaweedfs.s3_head(f"/{bucket}/{uuid}.dcm.enc")
        assert status == 200 and headers["x-amz-storage-class"] == "STANDARD_IA"
        _, tagging = plugin.seaweedfs.s3_request("GET", f"/{bucket}/{uuid}.dcm.enc?tagging")
        assert b"<Key>Source</Key><Value>orthanc-tests</Value>" in tagging
    else:
        from servers import _request_with_headers, _shared_key_headers

        url = f"{plugin.azurite.endpoint}/{bucket}/{uuid}.dcm.enc"
        signed = _shared_key_headers("HEAD", url, plugin.azurite.account, plugin.azurite.key, {})
        status, headers, _ = _request_with_headers("HEAD", url, signed)
        assert status == 200 and headers["x-ms-access-tier"] == "Cool"


def test_objects_are_a1_and_the_cli_decrypts_them(plugin: PluginOrthanc, tmp_path: Path) -> None:
    _upload_all(plugin)
    ring = KeyRing(MasterKey.from_file(KEY_ID, plugin.key_file))
    for dicom in plugin.files[:6]:
        info = plugin.orthanc.get_json(f"/instances/{plugin.ids[dicom.name]}/attachments/dicom/info")
        name = f"{info['Uuid']}.dcm.enc"
        out = tmp_path / f"{dicom.name}.out"
        run_cli(
            "download", plugin.url(name), out, "--master-key", f"{KEY_ID}:{plugin.key_file}", env=plugin.env
        ).ok()
        assert out.read_bytes() == dicom.data, dicom.name
        if plugin.backend == "local":
            stored = (Path(plugin.location) / name).read_bytes()
            assert stored[:2] == b"A1" and a1.header_key_id(stored) == KEY_ID
            assert len(stored) == len(dicom.data) + a1.OVERHEAD
            assert a1.decrypt(stored, ring) == dicom.data


def test_dicomweb_on_top_of_the_plugin(plugin: PluginOrthanc) -> None:
    _upload_all(plugin)
    studies = json.loads(plugin.orthanc.get("/dicom-web/studies"))
    found = {s["0020000D"]["Value"][0] for s in studies}
    assert found == {d.study_uid for d in plugin.files}
    dicom = next(d for d in plugin.files if d.name == "CT_small.dcm")
    instances = json.loads(
        plugin.orthanc.get(f"/dicom-web/studies/{dicom.study_uid}/series/{dicom.series_uid}/instances")
    )
    assert dicom.sop_uid in {i["00080018"]["Value"][0] for i in instances}
    body = plugin.orthanc.get(
        f"/dicom-web/studies/{dicom.study_uid}/series/{dicom.series_uid}/instances/{dicom.sop_uid}"
    )
    assert dicom.data in body  # WADO-RS: the stored file, in a multipart answer


def test_delete_removes_the_objects(plugin: PluginOrthanc) -> None:
    _upload_all(plugin)
    for instance in plugin.ids.values():
        plugin.orthanc.delete(f"/instances/{instance}")
    plugin.ids.clear()
    assert plugin.orthanc.get_json("/instances") == []
    assert plugin.object_names() == []
    assert plugin.orthanc.get_json("/dicom-cloud/pending-removals") == []


def test_legacy_structure_root_path_and_unknown_files(tmp_path: Path, files: list[Dicom]) -> None:
    objects = tmp_path / "objects"
    config = _orthanc_config(
        [
            "--local",
            objects,
            "--structure",
            "legacy",
            "--root-path",
            "pacs/",
            "--storage-directory",
            tmp_path / "o",
        ],
        cli_env(),
    )
    orthanc = start_orthanc(tmp_path / "legacy", config)
    try:
        dicom = next(d for d in files if d.name == "CT_small.dcm")
        instance = orthanc.post("/instances", dicom.data)["ID"]
        uuid = orthanc.get_json(f"/instances/{instance}/attachments/dicom/info")["Uuid"]
        assert (objects / "pacs" / uuid[0:2] / uuid[2:4] / uuid).read_bytes() == dicom.data
        assert orthanc.get(f"/instances/{instance}/file") == dicom.data
    finally:
        orthanc.stop()

    # Flat names with EnableLegacyUnknownFiles: a header stored as .unk (older plugins) is still read.
    config = _orthanc_config(["--local", objects, "--storage-directory", tmp_path / "flat"], cli_env())
    config["DicomCloudLocalStorage"]["EnableLegacyUnknownFiles"] = True
    orthanc = start_orthanc(tmp_path / "flat-run", config)
    try:
        instance = orthanc.post("/instances", dicom.data)["ID"]
        head = orthanc.get_json(f"/instances/{instance}/attachments/dicom-until-pixel-data/info")["Uuid"]
        (objects / f"{head}.dcm.head").rename(objects / f"{head}.unk")
        assert orthanc.get(f"/instances/{instance}/attachments/dicom-until-pixel-data/data")[:132].endswith(
            b"DICM"
        )
        orthanc.delete(f"/instances/{instance}")
        assert not (objects / f"{head}.unk").exists()
    finally:
        orthanc.stop()


# ---------------------------------------------------------------------------------------------------------
# Hybrid mode: migrating an Orthanc that used its own file storage, both ways


def _fs_files(storage: Path) -> set[str]:
    return {p.name for p in storage.glob("??/??/*") if p.is_file()}


def _wait_job(orthanc: OrthancServer, path: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: dict[str, Any] = orthanc.get_json(path)
        if status["State"] in ("Success", "Failure"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {path} did not finish: {status}")


def test_hybrid_migration_both_ways(tmp_path: Path, seaweedfs: S3Server, files: list[Dicom]) -> None:
    bucket = f"orthanc-hybrid-{os.getpid()}"
    seaweedfs.create_bucket(bucket)
    storage = tmp_path / "orthanc"
    subset = files[:8]
    # 1. Orthanc on its own file storage, no plugin.
    plain = start_orthanc(tmp_path / "plain", {"StorageDirectory": str(storage), "Name": "plain"})
    ids = {d.name: plain.post("/instances", d.data)["ID"] for d in subset}
    plain.stop()
    old_files = _fs_files(storage)
    assert old_files

    # 2. The plugin in WriteToObjectStorage: old files still read from disk, new ones go to the bucket.
    key = _make_key(tmp_path)
    env = cli_env(seaweedfs.env())
    config = _orthanc_config(
        [
            "--s3",
            bucket,
            "--endpoint",
            seaweedfs.endpoint,
            "--embed-credentials",
            "--hybrid",
            "WriteToObjectStorage",
            "--master-key",
            f"{KEY_ID}:{key}",
            "--storage-directory",
            storage,
        ],
        env,
    )
    orthanc = start_orthanc(tmp_path / "hybrid", config)
    try:
        for dicom in subset:
            assert orthanc.get(f"/instances/{ids[dicom.name]}/file") == dicom.data
        new = files[8]
        new_id = orthanc.post("/instances", new.data)["ID"]
        uuid = orthanc.get_json(f"/instances/{new_id}/attachments/dicom/info")["Uuid"]
        assert seaweedfs.s3_request("HEAD", f"/{bucket}/{uuid}.dcm.enc")[0] == 200
        assert _fs_files(storage) == old_files

        # Bad requests are 4xx, unknown resources 404.
        for body in (
            b"not json",
            b'{"Resources": "x", "TargetStorage": "file-system"}',
            b'{"Resources": [], "TargetStorage": "tape"}',
        ):
            status, _ = orthanc.request("POST", "/move-storage", body)
            assert status == 400, body
        status, _ = orthanc.request(
            "POST", "/move-storage", b'{"Resources": ["nope"], "TargetStorage": "object-storage"}'
        )
        assert status == 404

        # 3. Synchronous move of the first study to object storage.
        first = subset[0]
        study = orthanc.get_json(f"/instances/{ids[first.name]}/study")["ID"]
        answer = orthanc.post(
            "/move-storage", json.dumps({"Resources": [study], "TargetStorage": "object-storage"})
        )
        assert answer["AttachmentsMoved"] >= 1 and answer["Errors"] == []
        uuid = orthanc.get_json(f"/instances/{ids[first.name]}/attachments/dicom/info")["Uuid"]
        assert uuid not in _fs_files(storage)
        assert seaweedfs.s3_request("HEAD", f"/{bucket}/{uuid}.dcm.enc")[0] == 200
        assert orthanc.get(f"/instances/{ids[first.name]}/file") == first.data
        # Again: nothing to do.
        again = orthanc.post(
            "/move-storage", json.dumps({"Resources": [study], "TargetStorage": "object-storage"})
        )
        assert again["AttachmentsMoved"] == 0 and again["AttachmentsSkipped"] == answer["AttachmentsMoved"]

        # 4. Asynchronous move of everything to object storage, then back to the file system.
        everything = [*ids.values(), new_id]
        job = orthanc.post(
            "/move-storage",
            json.dumps({"Resources": everything, "TargetStorage": "object-storage", "Asynchronous": True}),
        )
        assert job["Path"].startswith("/dicom-cloud/move-storage/jobs/")
        status = _wait_job(orthanc, job["Path"])
        assert status["State"] == "Success", status
        assert _fs_files(storage) == set()
        job = orthanc.post(
            "/move-storage",
            json.dumps(
                {"Resources": everything, "TargetStorage": "file-system", "Asynchronous": True, "Priority": 5}
            ),
        )
        status = _wait_job(orthanc, job["Path"])
        assert status["State"] == "Success" and status["Content"]["AttachmentsMoved"] > 0, status
        assert job["ID"] in orthanc.get_json("/dicom-cloud/move-storage/jobs")
        listing = seaweedfs.s3_request("GET", f"/{bucket}?list-type=2")[1].decode()
        assert "<Key>" not in listing
        moved = _fs_files(storage)
        assert len(moved) >= len(everything)
        # Encryption applies on both sides: what is on disk now is A1.
        ring = KeyRing(MasterKey.from_file(KEY_ID, key))
        sample = next(storage.glob("??/??/*"))
        assert a1.decrypt(sample.read_bytes(), ring)
        for dicom in [*subset, new]:
            instance = new_id if dicom is new else ids[dicom.name]
            assert orthanc.get(f"/instances/{instance}/file") == dicom.data
    finally:
        orthanc.stop()


# ---------------------------------------------------------------------------------------------------------
# Failures: the object store goes away


class FlakyProxy:
    """A TCP proxy to a server that can be switched off (connections refused and cut) and on."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.up = True
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def set_up(self, up: bool) -> None:
        self.up = up
        if not up:
            with self._lock:
                for s in list(self._open):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                        s.close()
                self._open.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self.set_up(False)
        self._listener.close()


def test_object_store_down(tmp_path: Path, seaweedfs: S3Server, files: list[Dicom]) -> None:
    bucket = f"orthanc-flaky-{os.getpid()}"
    seaweedfs.create_bucket(bucket)
    proxy = FlakyProxy(int(seaweedfs.endpoint.rsplit(":", 1)[1]))
    env = cli_env(seaweedfs.env())
    config = _orthanc_config(
        [
            "--s3",
            bucket,
            "--endpoint",
            f"http://127.0.0.1:{proxy.port}",
            "--embed-credentials",
            "--storage-directory",
            tmp_path / "orthanc",
        ],
        env,
    )
    config["AwsS3Storage"].update(MaxRetries=0, ConnectionTimeout=2, RequestTimeout=5)
    orthanc = start_orthanc(tmp_path / "run", config)
    bucket_keys = lambda: re.findall(  # noqa: E731
        r"<Key>([^<]+)</Key>", seaweedfs.s3_request("GET", f"/{bucket}?list-type=2")[1].decode()
    )
    try:
        first, second = files[0], files[1]
        first_id = orthanc.post("/instances", first.data)["ID"]
        stored = sorted(bucket_keys())
        assert stored

        proxy.set_up(False)
        # A create while the store is down: an error, nothing indexed, nothing left in the bucket.
        status, _ = orthanc.request("POST", "/instances", second.data)
        assert status >= 500
        assert orthanc.get_json("/instances") == [first_id]
        # A remove while the store is down: Orthanc forgets the instance, the plugin keeps the objects
        # to remove in its durable list.
        orthanc.delete(f"/instances/{first_id}")
        pending = orthanc.get_json("/dicom-cloud/pending-removals")
        assert sorted(p["key"] for p in pending) == stored
        assert all(p["storage"] == "object-storage" and p["error"] for p in pending)
        assert (tmp_path / "orthanc" / "dicom-cloud-pending-removals.jsonl").read_text().count("\n") == len(
            stored
        )
        assert sorted(bucket_keys()) == stored
        retry = orthanc.post("/dicom-cloud/pending-removals/retry")
        assert retry == {"Removed": 0, "Pending": len(stored)}

        proxy.set_up(True)
        retry = orthanc.post("/dicom-cloud/pending-removals/retry")
        assert retry == {"Removed": len(stored), "Pending": 0}
        assert bucket_keys() == []
        assert orthanc.get_json("/dicom-cloud/pending-removals") == []
        # And it works again.
        second_id = orthanc.post("/instances", second.data)["ID"]
        assert orthanc.get(f"/instances/{second_id}/file") == second.data
    finally:
        orthanc.stop()
        proxy.close()


# ---------------------------------------------------------------------------------------------------------
# Start-up errors reach Orthanc: it refuses to start


def test_bad_configuration_stops_orthanc(tmp_path: Path) -> None:
    config = _orthanc_config(
        ["--local", tmp_path / "objects", "--storage-directory", tmp_path / "o"], cli_env()
    )
    config["DicomCloudLocalStorage"]["StorageStructure"] = "tree"
    orthanc = start_orthanc(tmp_path / "run", config, wait=False)
    code = wait_exit(orthanc)
    assert code != 0
    assert "StorageStructure 'tree' is invalid" in orthanc.log_tail(80)
