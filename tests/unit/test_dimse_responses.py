"""C-FIND pending responses encoded from index results: the same bytes as pydicom's encoding of the
response Dataset (through pynetdicom), in both little-endian transfer syntaxes."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from dicom_cloud.dimse.find import Query, response
from dicom_cloud.dimse.responses import NotEncodable, identifier_bytes


def _identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


STUDY_RESULT: dict[str, Any] = {
    "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Bench^000007"}]},
    "00100020": {"vr": "LO", "Value": ["P000007"]},
    "00080020": {"vr": "DA", "Value": ["20200308"]},
    "0020000D": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.8.498.123"]},  # odd length
    "00201208": {"vr": "IS", "Value": [50]},
    "00080061": {"vr": "CS", "Value": ["CT", "MR"]},
    "00081030": {"vr": "LO", "Value": ["Tête, thorax"]},  # UTF-8, odd byte count
    "00080050": {"vr": "SH"},  # empty in the index
}

CASES = {
    "study keys": (
        _identifier(
            "STUDY",
            PatientName="",
            PatientID="P000007",
            StudyDate="",
            StudyInstanceUID="",
            NumberOfStudyRelatedInstances="",
            ModalitiesInStudy="",
            StudyDescription="",
            AccessionNumber="",
            RetrieveAETitle="",
            ReferringPhysicianName="",  # not in the result: returned empty
        ),
        STUDY_RESULT,
    ),
    "person name groups": (
        _identifier("PATIENT", PatientName="*", PatientID=""),
        {
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎"}]},
            "00100020": {"vr": "LO", "Value": ["X"]},
        },
    ),
    "image integers": (
        _identifier(
            "IMAGE", SOPInstanceUID="", Rows=None, Columns=None, InstanceNumber="", NumberOfFrames=""
        ),
        {
            "00080018": {"vr": "UI", "Value": ["1.2.3.44"]},
            "00280010": {"vr": "US", "Value": [512]},
            "00280011": {"vr": "US"},
            "00200013": {"vr": "IS", "Value": [7]},
        },
    ),
}


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_bytes_as_pydicom(case: str, implicit: bool) -> None:
    identifier, result = CASES[case]
    level = str(identifier.QueryRetrieveLevel)
    query = Query({"PATIENT": "patient", "STUDY": "study", "IMAGE": "instance"}[level], level)  # type: ignore[arg-type]
    expected = encode(response(identifier, result, query, "DICOMCLOUD"), implicit, True)
    assert expected
    assert identifier_bytes(identifier, result, level, "DICOMCLOUD", implicit=implicit) == expected


def test_uncovered_keys_are_left_to_pydicom() -> None:
    with_sequence = _identifier("STUDY", StudyInstanceUID="")
    with_sequence.ReferencedStudySequence = []
    with pytest.raises(NotEncodable):
        identifier_bytes(with_sequence, STUDY_RESULT, "STUDY", "AE", implicit=True)
    floats = _identifier("STUDY", StudyInstanceUID="")
    with pytest.raises(NotEncodable):
        identifier_bytes(floats, {"0020000D": {"vr": "FD", "Value": [1.5]}}, "STUDY", "AE", implicit=False)
