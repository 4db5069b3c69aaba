"""``dicom-cloud receive`` (the C-STORE router) into SeaweedFS, Azurite, fake-gcs-server and a
local directory, client-side encrypted: DCMTK's storescu sends, the objects are read back with
``dicom-cloud download`` and compared element by element with what was sent."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from test_cli import BACKENDS, CLI, Backend, cli_env, make_backend, run_cli

from dimse_helpers import dataset_elements, echo_ok, free_port, run_tool, synthetic_ct, wait_for
from servers import _Proc

pytestmark = pytest.mark.integration


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request, request.param)


@pytest.fixture
def key(tmp_path: Path) -> str:
    path = tmp_path / "master.key"
    path.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    return f"3:{path}"


class Receiver:
    def __init__(self, work: Path, destination: str, env: dict[str, str], *flags: str) -> None:
        self.port = free_port()
        argv = [
            str(CLI),
            "receive",
            destination,
            "--port",
            str(self.port),
            "--spool",
            str(work / "spool"),
            *flags,
        ]
        self.proc = _Proc("dicom-cloud-receive", argv, work, env)
        wait_for(lambda: echo_ok(self.port) or not self.proc.alive(), "receive to answer C-ECHO", 60)
        assert self.proc.alive(), self.proc.log_tail()

    def send(self, *paths: Path) -> str:
        result = run_tool(
            "storescu",
            "-v",
            "-aet",
            "MODALITY",
            "-aec",
            "DICOMCLOUD",
            "127.0.0.1",
            str(self.port),
            *map(str, paths),
        )
        assert result.returncode == 0, result.stderr + self.proc.log_tail()
        return result.stderr

    def terminate(self) -> int:
        os.kill(self.proc.popen.pid, signal.SIGTERM)
        code = self.proc.popen.wait(20)
        self.proc.stop()
        return code


@pytest.fixture
def instances(tmp_path: Path) -> list[Path]:
    generated = tmp_path / "generated.dcm"
    generated.write_bytes(synthetic_ct(generate_uid(), generate_uid(), 7))
    return [Path(get_testdata_file("CT_small.dcm")), Path(get_testdata_file("MR_small.dcm")), generated]  # type: ignore[arg-type]


def test_receive_into_store_encrypted(
    backend: Backend, key: str, instances: list[Path], tmp_path: Path
) -> None:
    env = cli_env(backend.env)
    receiver = Receiver(
        tmp_path,
        backend.url("incoming/"),
        env,
        "--encrypt",
        "client-side",
        "--master-key",
        key,
        "--dicom-tags",
        "Modality",
    )
    try:
        receiver.send(*instances)
    finally:
        code = receiver.terminate()
    assert code == 143, receiver.proc.log_tail()
    assert list((tmp_path / "spool").iterdir()) == []  # every spooled instance was written, then let go

    # Named by the uid layout; encrypted at rest (no DICM marker in the stored bytes).
    raw = tmp_path / "raw"
    run_cli(
        "download",
        backend.url("incoming/"),
        f"{raw}/",
        "-r",
        "--keep-encrypted",
        "--master-key",
        key,
        env=env,
    ).ok()
    stored = sorted(p for p in raw.rglob("*") if p.is_file())
    assert len(stored) == len(instances)
    assert all(p.read_bytes()[128:132] != b"DICM" for p in stored)

    plain = tmp_path / "plain"
    run_cli("download", backend.url("incoming/"), f"{plain}/", "-r", "--master-key", key, env=env).ok()
    by_sop = {p.stem: p for p in plain.rglob("*.dcm")}
    for original in instances:
        sent = dataset_elements(original)
        sop = sent[0x00080018].decode().strip("'\"")
        assert sop in by_sop, sorted(by_sop)
        assert dataset_elements(by_sop[sop]) == sent


def test_receive_selection_and_deidentify_local(instances: list[Path], tmp_path: Path) -> None:
    """--modality keeps only MR (others acknowledged, not written); --deidentify removes the name;
    the manifest and the UID map are written as instances arrive."""
    secret = tmp_path / "deid.key"
    secret.write_bytes(secrets.token_bytes(32))
    out = tmp_path / "out"
    manifest, uid_map = tmp_path / "manifest.jsonl", tmp_path / "uids.jsonl"
    receiver = Receiver(
        tmp_path,
        str(out),
        cli_env(),
        "--modality", "MR", "--deidentify", "--deid-secret-file", str(secret),
        "--manifest", str(manifest), "--deid-map", str(uid_map),
    )  # fmt: skip
    try:
        receiver.send(*instances)
    finally:
        receiver.terminate()
    written = sorted(out.rglob("*.dcm"))
    assert len(written) == 1
    elements = dataset_elements(written[0])
    assert b"CompressedSamples" not in elements.get(0x00100010, b"")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [row["status"] for row in rows].count("uploaded") == 1, rows
    assert uid_map.read_text().strip()


def test_receive_refuses_selection_by_name(tmp_path: Path) -> None:
    run_cli("receive", str(tmp_path / "out"), "--include", "*.dcm", env=cli_env()).fails(2)
