"""Helpers shared by the archive tests: synthetic instances, the pydicom test files, a runner."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar

import pydicom.data
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_cloud.archive import Archive, ArchiveSettings

T = TypeVar("T")
TEST_FILES = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def read_test_file(name: str) -> bytes:
    return (TEST_FILES / name).read_bytes()


def all_test_files() -> list[Path]:
    return sorted(p for p in TEST_FILES.iterdir() if p.is_file())


def make_instance(
    study: str,
    series: str,
    sop: str,
    *,
    preamble: bytes = bytes(128),
    pixels: bool = True,
    frames: int = 1,
    **attributes: Any,
) -> bytes:
    """A small valid Part 10 CT instance (8x8, 16-bit) with the given attribute values."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_SOP_CLASS
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    ds.PatientID = "P1"
    ds.PatientName = "Doe^John"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if pixels:
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = b"".join(bytes([f, 0]) * 64 for f in range(frames))
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    return preamble + data[128:]


class Run:
    """Runs coroutines on one event loop for the length of a test."""

    def __init__(self) -> None:
        self.runner = asyncio.Runner()

    def __call__(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)


@contextmanager
def opened(settings: ArchiveSettings) -> Iterator[tuple[Archive, Run]]:
    run = Run()
    archive = run(Archive.open(settings))
    try:
        yield archive, run
    finally:
        run(archive.close())
        run.runner.close()
