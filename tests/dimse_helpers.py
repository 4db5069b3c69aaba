"""Helpers of the DIMSE tests: DCMTK's tools (required: scripts/install-test-servers installs the
Debian package ``dcmtk``), a ``storescp`` receiving into a directory, small synthetic instances,
and comparisons of received files with the originals."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DCMTK_HINT = "DCMTK is missing: run scripts/install-test-servers (Debian package dcmtk)"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def dcmtk(tool: str) -> str:
    """The path of a DCMTK tool; fails the test (never skips) when it is not installed."""
    path = shutil.which(tool)
    assert path is not None, DCMTK_HINT
    return path


def run_tool(tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk(tool), *args], capture_output=True, text=True, timeout=timeout, check=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting: {what}")
        time.sleep(0.1)


def echo_ok(port: int, calling: str = "ECHOSCU", called: str = "DICOMCLOUD") -> bool:
    result = run_tool("echoscu", "-aet", calling, "-aec", called, "-to", "5", "127.0.0.1", str(port))
    return result.returncode == 0


def synthetic_ct(
    study: str, series: str, number: int, *, patient: str = "Test^Patient", pixels: int = 64
) -> bytes:
    """A small CT image (Part 10 bytes), ``pixels`` x ``pixels`` 16-bit."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = patient
    ds.PatientID = "PID-" + study[-6:]
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = pixels
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes((number + i) % 251 for i in range(pixels * pixels * 2))
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dataset_elements(path_or_bytes: Path | bytes) -> dict[int, bytes]:
    """Each data element's raw value bytes, file meta and trailing padding left out (storescp
    drops dataset padding (FFFC,FFFC) and writes its own file meta)."""
    source = BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    ds = pydicom.dcmread(source)
    out = {}
    for element in ds:
        if element.tag == 0xFFFCFFFC:
            continue
        value = element.value
        out[int(element.tag)] = value if isinstance(value, bytes) else repr(value).encode()
    return out


class StoreScp:
    """DCMTK's storescp receiving into ``directory`` as AE ``ae_title`` on a free port."""

    def __init__(self, directory: Path, ae_title: str = "DEST") -> None:
        self.directory = directory
        self.ae_title = ae_title
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", ae_title, "+xa", "-od", str(directory), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: echo_ok(self.port, called=ae_title), "storescp to listen", 20)

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)
