"""The archive's own header reader gives what pydicom's path gives, or leaves the instance to it.

Every pydicom test file, thousands of randomly damaged ones and instances with values of every
shape the reader handles are parsed both ways: where the plain reader answers, the identity, the
index values and the sidecar's bytes must equal those of the pydicom path (which must accept it).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from archive_helpers import all_test_files, make_instance, mutated_instances, read_test_file
from dicom_cloud.archive.parsing import (
    ParsedInstance,
    _parse_plain,
    parse_instance,
    parse_instance_with_pydicom,
    sanitise_preamble,
)
from dicom_cloud.archive.plainread import read_plain
from dicom_cloud.dicom.header import check_element_order
from dicom_cloud.errors import DicomCloudError

#: Index extras of several VRs: text ones are read by the plain reader, others send it to pydicom.
EXTRA_TAGS = (0x00080080, 0x00181030, 0x00080005, 0x00200032, 0x00280030, 0x00280010)
TEXT_EXTRA_TAGS = EXTRA_TAGS[:3]


def _prepared(data: bytes) -> bytes | None:
    """``data`` as the archive hands it to the parser, or None when refused before parsing."""
    try:
        sanitised, _ = sanitise_preamble(data)
        check_element_order(sanitised)
    except DicomCloudError:
        return None
    return sanitised


def _compare(data: bytes, extra_tags: Sequence[int] = ()) -> bool:
    """Whether the plain reader answered; when it did, that it answered as the pydicom path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = _parse_plain(data, extra_tags)
        if plain is None:
            return False
        reference = parse_instance_with_pydicom(data, extra_tags)  # raises if pydicom refuses it
    assert plain.identity == reference.identity
    assert plain.attributes == reference.attributes
    assert plain.sidecar_bytes() == reference.sidecar_bytes()
    return True


def test_every_pydicom_test_file_reads_the_same_both_ways() -> None:
    answered = 0
    for path in all_test_files():
        data = _prepared(path.read_bytes())
        if data is not None:
            answered += _compare(data) + _compare(data, TEXT_EXTRA_TAGS) + _compare(data, EXTRA_TAGS)
    assert answered >= 10  # the plain reader is not idle on real files (CT_small.dcm and others)


def _outcome(
    parse: Callable[[bytes, Sequence[int]], ParsedInstance], data: bytes, extra_tags: Sequence[int]
) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            parsed = parse(data, extra_tags)
        except DicomCloudError as error:
            return (type(error).__name__, str(error))
    return (parsed.identity, parsed.attributes, parsed.sidecar_bytes())


@pytest.mark.parametrize("seed", range(2))
def test_damaged_instances_have_the_same_outcome_both_ways(seed: int) -> None:
    """Stored alike or refused for the same reason, whichever reader ran."""
    rnd = random.Random(seed)
    plain = _instance(
        {
            "PatientName": "Doe^Jane",
            "SeriesNumber": "2",
            "InstitutionName": "General",
            "ReferencedImageSequence": "sequence",
        }
    )
    answered = 0
    for damaged in [*mutated_instances(seed, 120), *_damaged(plain, rnd, 400)]:
        data = _prepared(damaged)
        if data is not None:
            for extra_tags in (TEXT_EXTRA_TAGS, EXTRA_TAGS):
                expected = _outcome(parse_instance_with_pydicom, data, extra_tags)
                assert _outcome(parse_instance, data, extra_tags) == expected
            answered += _compare(data, TEXT_EXTRA_TAGS)
    assert answered > 50


def _damaged(data: bytes, rnd: random.Random, count: int) -> Iterator[bytes]:
    """``data`` with one to three random bytes changed after the preamble."""
    for _ in range(count):
        damaged = bytearray(data)
        for _ in range(rnd.randint(1, 3)):
            damaged[rnd.randrange(132, len(damaged))] = rnd.randrange(256)
        yield bytes(damaged)


def _values() -> Iterator[dict[str, object]]:
    """Attribute values of the shapes the plain reader handles, and of some it leaves alone."""
    yield {}
    yield {"PatientName": "Doe^Jane", "PatientID": "  P1 ", "PatientSex": "F", "PatientBirthDate": "19700101"}
    yield {"PatientName": "Doe^Jane\\Roe^Ann", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}
    yield {"PatientName": "Doe^Jane=Ideo^Graphic", "InstitutionName": "Caf\u00e9"}
    yield {"SpecificCharacterSet": "ISO_IR 100", "InstitutionName": "General"}
    yield {"SpecificCharacterSet": "ISO_IR 192", "InstitutionName": "Caf\u00e9"}
    yield {"SpecificCharacterSet": "ISO 2022 IR 87", "InstitutionName": "Plain"}
    yield {"SeriesNumber": "  7 ", "InstanceNumber": "+3", "NumberOfFrames": "1"}
    yield {"SeriesNumber": "99999999999"}
    yield {"PixelSpacing": ["0.5", "0.50"], "SliceThickness": " 1.25"}
    yield {"ImagePositionPatient": ["-1e2", "0", ".5"]}
    yield {"SliceThickness": "1e999"}
    yield {"SliceThickness": "1.00000000000000001"}
    yield {"StudyDescription": "x" * 65}
    yield {"StudyDescription": "back\\slash", "ImageComments": "free\\text  "}
    yield {"ImageComments": "y" * 2000}
    yield {"StudyDate": "2020.01.02", "StudyTime": "10:11:12", "AccessionNumber": "A\x00"}
    yield {"ReferencedSOPInstanceUID": "1.2.03"}
    yield {"RetrieveAETitle": " AE1 \\AE2"}
    yield {"WindowCenter": ["40", "400"], "RescaleIntercept": "-1024", "RescaleSlope": "1"}
    yield {"LargestImagePixelValue": 4095, "SmallestImagePixelValue": 0}
    yield {"ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"], "ReferringPhysicianName": ""}
    yield {"Modality": "CT\\MR", "AccessionNumber": ""}
    yield {"PatientWeight": "70.5", "PatientSize": "1.8", "PatientAge": "040Y"}
    yield {"FrameTime": "33.3", "RecommendedDisplayFrameRate": 30}
    yield {"RedPaletteColorLookupTableData": bytes(range(256)) * 4, "IconImageSequence": None}
    yield {"ReferencedImageSequence": "sequence"}
    yield {"ContentDate": "20200101", "AcquisitionDateTime": "20200101101112.5+0100"}


def _instance(values: dict[str, object]) -> bytes:
    uid = generate_uid()
    attributes = {key: value for key, value in values.items() if value is not None}
    if attributes.get("ReferencedImageSequence") == "sequence":
        item = Dataset()
        item.ReferencedSOPInstanceUID = generate_uid()
        attributes["ReferencedImageSequence"] = DicomSequence([item])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_instance(generate_uid(), generate_uid(), uid, **attributes)


@pytest.mark.parametrize("values", list(_values()), ids=lambda values: ",".join(values) or "plain")
def test_instances_of_each_value_shape_read_the_same_both_ways(values: dict[str, object]) -> None:
    data = _prepared(_instance(values))
    assert data is not None
    _compare(data)
    _compare(data, TEXT_EXTRA_TAGS)
    _compare(data, EXTRA_TAGS)


def test_common_instances_are_read_by_the_plain_reader() -> None:
    """CT and MR instances, compressed ones and instances with sequences do not go to pydicom;
    text outside ASCII does."""
    typical = _instance({"PatientName": "Doe^Jane", "SeriesNumber": "2"})
    with_sequence = _instance({"ReferencedImageSequence": "sequence"})
    files = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "SC_rgb_dcmtk_+eb+cr.dcm")
    for data in (*map(read_test_file, files), typical, with_sequence):
        prepared = _prepared(data)
        assert prepared is not None and _compare(prepared)
    assert (
        read_plain(_instance({"SpecificCharacterSet": "ISO_IR 192", "InstitutionName": "Caf\u00e9"})) is None
    )


@pytest.mark.parametrize(
    ("tag", "vr", "value"),
    [
        (0x00100020, "IS", "012"),  # PatientID
        (0x00100020, "DS", "1.50"),
        (0x00200011, "DS", "2.0"),  # SeriesNumber
        (0x00200011, "US", 3),
        (0x00280010, "SS", -8),  # Rows
        (0x00100010, "LO", "Doe^Jane"),  # PatientName
        (0x00080080, "UN", b"General"),  # InstitutionName
        (0x00091010, "LO", "private"),
        (0x00290010, "LO", "CREATOR"),
        (0x00291001, "FD", 1.5),
        (0x00291002, "OB", b"\x01\x02"),
    ],
)
def test_elements_of_unexpected_vrs_read_the_same_both_ways(tag: int, vr: str, value: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(BytesIO(_instance({})))
        if tag in ds:
            del ds[tag]
        ds.add_new(tag, vr, value)
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
    data = _prepared(out.getvalue())
    assert data is not None
    for extra_tags in ((), TEXT_EXTRA_TAGS, (tag,)):
        assert _outcome(parse_instance, data, extra_tags) == _outcome(
            parse_instance_with_pydicom, data, extra_tags
        )
        _compare(data, extra_tags)


def test_file_meta_of_another_shape_goes_to_pydicom() -> None:
    data = bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\x14\x00" + b"1.2.840.10008.1.2.1\x00"
    assert read_plain(data) is None  # no group length first
