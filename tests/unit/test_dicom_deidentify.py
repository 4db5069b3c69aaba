"""De-identification (PS3.15 Basic Profile) on every file pydicom ships, plus targeted cases."""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from collections.abc import Iterator
from datetime import date
from io import BytesIO
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_cloud.dicom import deidentify as deid
from dicom_cloud.dicom.deidentify import DeidentifyOptions, deidentify, new_uid
from dicom_cloud.dicom.phi import PHI_KEYWORDS, UID_KEYWORDS
from dicom_cloud.errors import DicomFormatError, UsageError

SECRET = b"0123456789abcdef-test-secret"
OPTIONS = DeidentifyOptions(secret=SECRET)
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
ALL_FILES = sorted(TEST_FILES.glob("*.dcm"))
#: Files pydicom ships that are refused as not DICOM, and why.
REFUSED = {"no_meta.dcm": "no preamble/meta; even force=True yields one stray element"}
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _read(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(BytesIO(data), force=True)


def _to_bytes(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def _walk(ds: Dataset) -> Iterator[DataElement]:
    """Every element, nested ones included."""
    for tag in list(ds.keys()):
        elem = ds[tag]
        yield elem
        if elem.VR == "SQ" and elem.value is not None:
            for item in elem.value:
                yield from _walk(item)


def _strings(elem: DataElement) -> set[str]:
    value = elem.value
    if value is None or value == "" or value == b"":
        return set()
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        return {str(v).strip("\0 ") for v in value if str(v).strip("\0 ")}
    text = str(value).strip("\0 ")
    return {text} if text else set()


def _values_by_keyword(ds: Dataset, keywords: frozenset[str]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for elem in _walk(ds):
        if elem.keyword in keywords and elem.VR != "SQ":
            found[elem.keyword] |= _strings(elem)
    return found


def _ct_small() -> Dataset:
    return _read((TEST_FILES / "CT_small.dcm").read_bytes())


# --- the action table ---------------------------------------------------------------------


def test_every_phi_keyword_is_removed_blanked_or_dummied() -> None:
    assert {kw for kw in PHI_KEYWORDS if deid.ACTIONS[kw] not in ("X", "Z", "D")} == set()


def test_every_identifying_uid_is_replaced() -> None:
    assert {kw for kw in UID_KEYWORDS if deid.ACTIONS[kw] != "U"} == set()


def test_action_table_names_real_keywords_only() -> None:
    assert deid._Z | deid._D <= PHI_KEYWORDS
    assert not deid._Z & deid._D
    assert [kw for kw in deid.ACTIONS if tag_for_keyword(kw) is None] == []


# --- every pydicom test file --------------------------------------------------------------


@pytest.mark.parametrize("path", ALL_FILES, ids=[p.name for p in ALL_FILES])
def test_pydicom_test_file(path: Path) -> None:
    data = path.read_bytes()
    if path.name in REFUSED:
        with pytest.raises(DicomFormatError):
            deidentify(data, OPTIONS)
        return
    try:
        original = _read(data)
    except Exception:
        pytest.skip("pydicom itself cannot read it")
    out, uid_map = deidentify(data, OPTIONS)
    result = _read(out)  # re-reads
    list(_walk(result))

    before = _values_by_keyword(original, PHI_KEYWORDS)
    after = _values_by_keyword(result, PHI_KEYWORDS)
    leaked = {kw: after[kw] & before[kw] for kw in after if after[kw] & before[kw]}
    assert leaked == {}

    assert [e.tag for e in _walk(result) if e.tag.is_private] == []
    assert [e.tag for e in _walk(result) if e.tag.group & 0xFF00 in (0x5000, 0x6000)] == []

    uids_before = _values_by_keyword(original, UID_KEYWORDS)
    uids_after = _values_by_keyword(result, UID_KEYWORDS)
    for keyword, values in uids_before.items():  # changed, or gone with a removed sequence
        assert not uids_after[keyword] & values, keyword
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if original.get(keyword):
            assert result.get(keyword) and result.get(keyword) != original.get(keyword)
    for keyword, values in uids_after.items():
        for value in values:
            assert len(value) <= 64 and _UID.fullmatch(value), (keyword, value)
    assert set(uid_map.values()) >= set().union(*uids_after.values())

    assert result.PatientIdentityRemoved == "YES"
    assert result.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    if "SOPInstanceUID" in result and "MediaStorageSOPInstanceUID" in result.file_meta:
        assert result.file_meta.MediaStorageSOPInstanceUID == result.SOPInstanceUID


# --- consistency --------------------------------------------------------------------------


def test_two_files_of_one_study_keep_one_study() -> None:
    first, second = _ct_small(), _ct_small()
    second.SOPInstanceUID = first.SOPInstanceUID + ".2"
    second.file_meta.MediaStorageSOPInstanceUID = second.SOPInstanceUID
    out1, map1 = deidentify(_to_bytes(first), OPTIONS)
    out2, _ = deidentify(_to_bytes(second), OPTIONS)
    a, b = _read(out1), _read(out2)
    assert a.StudyInstanceUID == b.StudyInstanceUID == map1[first.StudyInstanceUID]
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.FrameOfReferenceUID == b.FrameOfReferenceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert a.PatientID == b.PatientID == a.PatientName
    assert str(a.PatientID).startswith("ANON-") and len(str(a.PatientID)) == 15
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    assert a.SOPClassUID == first.SOPClassUID  # not an identifying UID: kept


def test_deterministic_and_secret_dependent() -> None:
    data = (TEST_FILES / "CT_small.dcm").read_bytes()
    assert deidentify(data, OPTIONS) == deidentify(data, DeidentifyOptions(secret=SECRET))
    other, _ = deidentify(data, DeidentifyOptions(secret=b"another secret, 16+ bytes"))
    assert _read(other).StudyInstanceUID != _read(deidentify(data, OPTIONS)[0]).StudyInstanceUID


def test_uid_formula() -> None:
    import hashlib
    import hmac

    digest = hmac.new(SECRET, b"1.2.3", hashlib.sha256).digest()
    assert new_uid(SECRET, "1.2.3") == "2.25." + str(int.from_bytes(digest[:16], "big"))


def test_pixel_data_and_burned_in_annotation_untouched() -> None:
    ds = _ct_small()
    ds.BurnedInAnnotation = "YES"
    result = _read(deidentify(_to_bytes(ds), OPTIONS)[0])
    assert result.PixelData == ds.PixelData
    assert result.BurnedInAnnotation == "YES"


# --- nested sequences, private tags, overlays ---------------------------------------------


def test_nested_sequences_private_tags_curves_overlays() -> None:
    ds = _ct_small()
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref.ReferencedSOPInstanceUID = ds.StudyInstanceUID
    ref.add_new(0x00091001, "LO", "private in an item")
    ds.ReferencedStudySequence = Sequence([ref])
    request = Dataset()
    request.RequestedProcedureID = "RP-1"
    ds.RequestAttributesSequence = Sequence([request])
    ds.add_new(0x50000010, "US", 1)
    ds.add_new(0x60000010, "US", 4)
    ds.add_new(0x60003000, "OW", b"\0" * 8)
    ds.add_new(0x60004000, "LT", "overlay comment")
    result = _read(deidentify(_to_bytes(ds), OPTIONS)[0])
    item = result.ReferencedStudySequence[0]
    assert item.ReferencedSOPInstanceUID == result.StudyInstanceUID  # same old UID, same new UID
    assert item.ReferencedSOPClassUID == "1.2.840.10008.3.1.2.3.1"
    assert 0x00091001 not in item
    assert "RequestAttributesSequence" not in result
    assert not [tag for tag in list(result.keys()) if tag >> 16 in (0x5000, 0x6000)]


def test_phi_in_nested_items_is_cleaned() -> None:
    ds = _ct_small()
    observer = Dataset()
    observer.VerifyingObserverName = "Doe^Jane"
    observer.VerifyingOrganization = "Hospital"
    ds.VerifyingObserverSequence = Sequence([observer])
    result = _read(deidentify(_to_bytes(ds), OPTIONS)[0])
    item = result.VerifyingObserverSequence[0]
    assert str(item.VerifyingObserverName) == "ANONYMIZED"
    assert "VerifyingOrganization" not in item


# --- dates --------------------------------------------------------------------------------


def _dated() -> Dataset:
    ds = _ct_small()
    ds.StudyDate = "20200110"
    ds.ContentDate = "20200301"
    ds.AcquisitionDateTime = "20200301123000.5+0100"
    ds.PatientBirthDate = "19700101"
    return ds


def _days(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:8]))


def test_dates_removed_by_default() -> None:
    result = _read(deidentify(_to_bytes(_dated()), OPTIONS)[0])
    assert result.StudyDate == "" and result.PatientBirthDate == ""
    assert result.ContentDate == "19000101"
    assert result.LongitudinalTemporalInformationModified == "REMOVED"


def test_date_shift_keeps_intervals() -> None:
    ds = _dated()
    options = DeidentifyOptions(secret=SECRET, keep_dates="shift", date_shift_days=-40)
    result = _read(deidentify(_to_bytes(ds), options)[0])
    assert (_days(result.StudyDate) - _days(ds.StudyDate)).days == -40
    assert (_days(result.ContentDate) - _days(result.StudyDate)).days == 51
    assert result.AcquisitionDateTime == "20200121123000.5+0100"
    assert result.StudyTime == ds.StudyTime  # times of day are kept
    assert result.PatientBirthDate == ""
    assert result.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = [item.CodeValue for item in result.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107"]


def test_per_patient_shift_is_consistent() -> None:
    options = DeidentifyOptions(secret=SECRET, keep_dates="shift")
    first = _read(deidentify(_to_bytes(_dated()), options)[0])
    second = _read(deidentify(_to_bytes(_dated()), options)[0])
    shift = (_days(first.StudyDate) - date(2020, 1, 10)).days
    assert 0 < abs(shift) <= 365
    assert first.StudyDate == second.StudyDate
    other = _dated()
    other.PatientID = "someone else"
    assert (
        deid.patient_date_shift(SECRET, "someone else")
        == (_days(_read(deidentify(_to_bytes(other), options)[0]).StudyDate) - date(2020, 1, 10)).days
    )


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"hello world" * 20, b"\0" * 128 + b"DICM" + b"\xff" * 40])
def test_not_dicom_is_refused(data: bytes) -> None:
    with pytest.raises(DicomFormatError):
        deidentify(data, OPTIONS)


def test_options_are_checked() -> None:
    with pytest.raises(UsageError):
        DeidentifyOptions(secret=b"short")
    with pytest.raises(UsageError):
        DeidentifyOptions(secret=SECRET, date_shift_days=3)


def test_keyword_helper_sanity() -> None:
    assert keyword_for_tag(0x00100010) == "PatientName"
