"""The PHI guard: which keywords are PHI, which are identifying UIDs, and the refusal message."""

from __future__ import annotations

import pytest
from pydicom.datadict import tag_for_keyword

from dicom_cloud.dicom import phi
from dicom_cloud.errors import UsageError


@pytest.mark.parametrize(
    "keyword",
    [
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientSex",
        "PatientAge",
        "OtherPatientIDs",
        "OtherPatientNames",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "AccessionNumber",
        "InstitutionName",
        "InstitutionAddress",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "StudyID",
        "StudyDate",
        "StudyDescription",
        "SeriesDescription",
        "StationName",
        "DeviceSerialNumber",
    ],
)
def test_basic_profile_attributes_are_phi(keyword: str) -> None:
    assert phi.is_phi(keyword)
    assert not phi.is_identifying_uid(keyword)


@pytest.mark.parametrize(
    "keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"]
)
def test_uids_are_identifying_but_not_phi(keyword: str) -> None:
    assert phi.is_identifying_uid(keyword)
    assert not phi.is_phi(keyword)


@pytest.mark.parametrize("keyword", ["Modality", "SeriesNumber", "InstanceNumber", "SOPClassUID", "hash"])
def test_kept_attributes_are_neither(keyword: str) -> None:
    assert not phi.is_phi(keyword)
    assert not phi.is_identifying_uid(keyword)


def test_every_listed_keyword_is_in_the_dicom_dictionary() -> None:
    for keyword in phi.PHI_KEYWORDS | phi.UID_KEYWORDS:
        assert tag_for_keyword(keyword) is not None, keyword
    assert not phi.PHI_KEYWORDS & phi.UID_KEYWORDS


def test_phi_in_template_in_order_without_duplicates() -> None:
    template = "{PatientID}/{Modality}/{PatientName[0:3]}/{PatientID}/{SOPInstanceUID}.dcm"
    assert phi.phi_in_template(template) == ["PatientID", "PatientName"]
    assert phi.uids_in_template(template) == ["SOPInstanceUID"]
    assert phi.template_keywords(template) == ["PatientID", "Modality", "PatientName", "SOPInstanceUID"]


def test_literal_braces_are_not_fields() -> None:
    assert phi.phi_in_template("{{PatientName}}/{hash}") == []


def test_check_tags_allowed_names_the_offenders_and_the_flag() -> None:
    with pytest.raises(UsageError) as caught:
        phi.check_tags_allowed(["Modality", "PatientName", "AccessionNumber", "StudyInstanceUID"], False)
    message = str(caught.value)
    assert "AccessionNumber, PatientName" in message
    assert "Modality" not in message and "StudyInstanceUID" not in message
    assert "pass --allow-phi to store them anyway" in message
    assert caught.value.exit_code == 2


def test_check_tags_allowed_passes_with_allow_phi_or_without_phi() -> None:
    phi.check_tags_allowed(["PatientName"], True)
    phi.check_tags_allowed(["Modality", "SOPInstanceUID"], False)
    phi.check_tags_allowed([], False)
