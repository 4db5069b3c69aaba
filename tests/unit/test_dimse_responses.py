"""C-FIND pending responses encoded from index results: the same bytes as pydicom's encoding of the
response Dataset (through pynetdicom), in both little-endian transfer syntaxes."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from dicom_cloud.dimse.find import Query, response
from dicom_cloud.dimse.responses import NotEncodable, PendingSender, identifier_bytes


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


class _Recorder:
    """Stands in for pynetdicom's DUL: records the P-DATA primitives queued for sending."""

    def __init__(self) -> None:
        self.sent: list[list[tuple[int, bytes]]] = []

    def send_pdu(self, primitive: Any) -> None:
        self.sent.append(list(primitive.presentation_data_value_list))


def _sender(max_pdu: int) -> tuple[PendingSender, _Recorder]:
    dul = _Recorder()
    sender = PendingSender.__new__(PendingSender)
    sender.implicit = True
    sender._dul = dul
    sender._context_id = 5
    sender._max_pdu = max_pdu
    sender._command = bytes(range(80))
    return sender, dul


@pytest.mark.parametrize("max_pdu", [0, 16384])
def test_command_and_identifier_in_one_pdu_when_they_fit(max_pdu: int) -> None:
    sender, dul = _sender(max_pdu)
    sender.send(b"identifier")
    assert dul.sent == [[(5, b"\x03" + bytes(range(80))), (5, b"\x02identifier")]]


def test_fragments_within_a_small_maximum_pdu() -> None:
    sender, dul = _sender(32)
    identifier = bytes(100)
    sender.send(identifier)
    items = [item for pdu in dul.sent for item in pdu]
    assert all(len(pdu) == 1 for pdu in dul.sent)
    assert all(4 + 1 + len(data) <= 32 for _, data in items)  # item length, context ID, header + fragment
    headers = [data[0] for _, data in items]
    command = [data[1:] for _, data in items if data[0] in (0x01, 0x03)]
    dataset = [data[1:] for _, data in items if data[0] in (0x00, 0x02)]
    assert b"".join(command) == bytes(range(80)) and b"".join(dataset) == identifier
    assert headers == [1, 1, 1, 3, 0, 0, 0, 2]  # last fragments marked; command first
