"""Helpers shared by the archive tests: synthetic instances, the pydicom test files, a runner."""

from __future__ import annotations

import asyncio
import random
import string
import warnings
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
    side: int = 8,
    **attributes: Any,
) -> bytes:
    """A valid Part 10 CT instance (``side`` x ``side``, 16-bit, 8 by default) with the given
    attribute values; frame ``f`` has every pixel set to ``f % 256``."""
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
        ds.Rows = ds.Columns = side
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = b"".join(bytes([f % 256, 0]) * side * side for f in range(frames))
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


# --- the QIDO corpus, searched on SQLite (unit) and PostgreSQL (integration) ---------

A, B, C, X = "1.2.840.1", "1.2.840.2", "1.2.840.3", "1.2.840.9"


def _instances() -> list[tuple[str, bytes]]:
    def inst(tenant: str, study: str, series: str, n: int, **attrs: Any) -> tuple[str, bytes]:
        return tenant, make_instance(
            study, f"{study}.{series}", f"{study}.{series}.{n}", InstanceNumber=n, **attrs
        )

    a = dict(
        PatientName="Doe^John", PatientID="P1", PatientBirthDate="19700101", PatientSex="M",
        StudyDate="20200115", StudyTime="093000", AccessionNumber="ACC1", StudyDescription="CT Chest",
        ReferringPhysicianName="Smith^Ann", StudyID="S1",
    )  # fmt: skip
    b = dict(
        PatientName="DOE^JANE", PatientID="P2", StudyDate="20201231", StudyTime="1430",
        AccessionNumber="ACC2", StudyDescription="MR Brain", InstitutionName="General Hospital",
    )  # fmt: skip
    c = dict(PatientName="Roe^Richard", PatientID="P3", StudyDate="20210601", StudyDescription="CT 50%_off")
    return [
        inst("acme", A, "1", 1, Modality="CT", SeriesNumber=1, SeriesDescription="axial", **a),
        inst("acme", A, "1", 2, Modality="CT", SeriesNumber=1, SeriesDescription="axial", **a),
        inst("acme", A, "2", 1, Modality="SR", SeriesNumber=2, pixels=False, **a),
        inst("acme", B, "1", 1, Modality="MR", SeriesNumber=1, **b),
        inst("acme", C, "1", 1, Modality="CT", SeriesNumber=3, **c),
        inst("acme", C, "1", 2, Modality="CT", SeriesNumber=3, **c),
        inst("acme", C, "1", 3, Modality="CT", SeriesNumber=3, **c),
        inst("other", X, "1", 1, Modality="CT", SeriesNumber=1, **a),
    ]


QIDO_EXTRA_TAGS = ["InstitutionName"]


def load_qido_corpus(a: Archive, run: Run) -> None:
    """Three studies of tenant acme (A, B, C) and one of tenant other (X), with labels."""
    for tenant, data in _instances():
        run(a.store_instance(tenant, data))
    run(a.set_labels("acme", A, tags=["teaching", "lung"], description="Nice nodule case"))
    run(a.set_labels("acme", C, tags=["teaching"]))


#: (query parameters, the acme studies they find, in order): every matching type.
STUDY_MATCHING_CASES: list[tuple[dict[str, Any], list[str]]] = [
    ({}, [A, B, C]),
    ({"PatientID": "P1"}, [A]),
    ({"00100020": "P2"}, [B]),  # tag form
    ({"PatientID": ""}, [A, B, C]),  # universal matching
    ({"PatientName": "doe^john"}, [A]),  # PN: case-insensitive
    ({"PatientName": "Doe*"}, [A, B]),
    ({"PatientName": "*o?^*"}, [A, B, C]),
    ({"PatientName": "R*"}, [C]),
    ({"StudyDescription": "CT*"}, [A, C]),
    ({"StudyDescription": "ct*"}, []),  # other text: case-sensitive
    ({"StudyDescription": "CT 50%_off"}, [C]),
    ({"StudyDescription": "CT 5%"}, []),  # % and _ are literal
    ({"StudyDescription": "*%*"}, [C]),
    ({"StudyDescription": "CT?Chest"}, [A]),
    ({"AccessionNumber": "ACC2"}, [B]),
    ({"StudyInstanceUID": f"{A},{C}"}, [A, C]),
    ({"StudyInstanceUID": f"{B}\\{C}"}, [B, C]),
    ({"StudyInstanceUID": X}, []),  # another tenant's study
    ({"StudyDate": "20200115"}, [A]),
    ({"StudyDate": "20200101-20201231"}, [A, B]),
    ({"StudyDate": "20201231-"}, [B, C]),
    ({"StudyDate": "-20200115"}, [A]),
    ({"StudyTime": "0900-1000"}, [A]),
    ({"StudyTime": "1430"}, [B]),
    ({"StudyTime": "14-"}, [B]),
    ({"ModalitiesInStudy": "SR"}, [A]),
    ({"ModalitiesInStudy": "MR,SR"}, [A, B]),
    ({"ModalitiesInStudy": "CT"}, [A, C]),
    ({"Modality": "MR"}, [B]),
    ({"ReferringPhysicianName": "smith*"}, [A]),
    ({"PatientBirthDate": "19700101"}, [A]),
    ({"PatientSex": "M"}, [A]),
    ({"StudyID": "S1"}, [A]),
    ({"InstitutionName": "General*"}, [B]),  # configured extra query tag
    ({"00080080": "General Hospital"}, [B]),
    ({"label": "teaching"}, [A, C]),
    ({"label": "lung,other"}, [A]),
    ({"label": ["teaching", "lung"]}, [A]),  # repeated: all groups
    ({"labeldescription": "*nodule*"}, [A]),
    ({"PatientName": "Doe*", "StudyDate": "20200201-"}, [B]),
    ({"PatientName": "Doe*", "ModalitiesInStudy": "MR"}, [B]),
    ({"PatientID": "' OR '1'='1"}, []),  # bound parameters: no injection
    ({"fuzzymatching": "true", "PatientID": "P1"}, [A]),
    # Fuzzy person names: each word begins a word of the name, any order, any case.
    ({"fuzzymatching": "true", "PatientName": "jo"}, [A]),
    ({"fuzzymatching": "true", "PatientName": "doe"}, [A, B]),
    ({"fuzzymatching": "true", "PatientName": "JANE doe"}, [B]),
    ({"fuzzymatching": "true", "PatientName": "rich^ro"}, [C]),
    ({"fuzzymatching": "true", "PatientName": "oe"}, []),  # inside a word: no
    ({"fuzzymatching": "true", "PatientName": "jo*n"}, [A]),
    ({"fuzzymatching": "true", "ReferringPhysicianName": "ann"}, [A]),
    ({"fuzzymatching": "false", "PatientName": "jo"}, []),
    # Unknown keys and attributes the index does not hold: ignored (with a warning).
    ({"_": "123", "PatientID": "P1"}, [A]),
    ({"PatientWeight": "70", "PatientID": "P2"}, [B]),
]


# --- malformed input, reproducibly random ------------------------------------------------


def mutated_instances(seed: int, count: int) -> list[bytes]:
    """Valid instances with a few random bytes changed in their first 2 KB (headers, meta)."""
    rnd = random.Random(seed)
    names = ("CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm")
    bases = [read_test_file(n) for n in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the over-long values are the point
        long_values = dict(
            PatientName="A\x00B^C" + "x" * 400, StudyDescription="y" * 1000, PatientSex="MALE" * 8
        )
        bases.append(make_instance("1.2.3", "1.2.3.1", "1.2.3.1.1", **long_values))
    out = []
    for _ in range(count):
        data = bytearray(rnd.choice(bases))
        for _ in range(rnd.randint(1, 8)):
            data[rnd.randrange(128, min(len(data), 2000))] = rnd.randrange(256)
        out.append(bytes(data))
    return out


_QUERY_KEYS = (
    "PatientName", "PatientID", "StudyDate", "StudyTime", "StudyInstanceUID", "ModalitiesInStudy", "Modality",
    "SeriesNumber", "InstanceNumber", "SOPInstanceUID", "00100010", "0020000D", "InstitutionName", "limit",
    "offset", "includefield", "label", "labeldescription", "fuzzymatching", "Rows", "AccessionNumber",
    "SeriesInstanceUID", "StudyDescription", "bogus", "00000000", "FFFFFFFF", "7FE00010", "00020010",
)  # fmt: skip
_QUERY_CHARS = string.printable + "\x00éü漢%_*?\\,-.^="
_QUERY_VALUES = ("", ",", "\\", "-", "*", "?", "20200101-", "-2020", "9" * 20, "1e5", "٣", "²")


def random_queries(seed: int, count: int) -> list[dict[str, str]]:
    rnd = random.Random(seed)
    queries = []
    for _ in range(count):
        params = {}
        for _ in range(rnd.randint(0, 3)):
            value = "".join(rnd.choice(_QUERY_CHARS) for _ in range(rnd.randint(0, 12)))
            params[rnd.choice(_QUERY_KEYS)] = rnd.choice(_QUERY_VALUES) if rnd.random() < 0.3 else value
        queries.append(params)
    return queries
