"""The PHI guard: which DICOM attributes must not end up in object names unless the user insists.

Object names are visible to anyone who can list a bucket, appear in access logs, billing exports
and URLs, and are never encrypted (client-side encryption covers the bytes, not the key). A name
built from ``PatientName`` or ``AccessionNumber`` therefore discloses PHI even when the object is
encrypted. This module says which attributes are dangerous; :mod:`dicom_cloud.dicom.layout`
refuses templates that use them unless ``allow_phi`` is set.

Where the list comes from
-------------------------
DICOM PS3.15 Annex E, Table E.1-1 "Application Level Confidentiality Profile Attributes", the
**Basic Profile** column (the baseline taken is the 2013 edition of the table), mapped to keywords
with pydicom's data dictionary:

* :data:`PHI_KEYWORDS`: every attribute whose Basic Profile action is D, Z, X or a combination
  (X/Z, X/D, X/Z/D, Z/D, X/Z/U*). This includes the quasi-identifiers the profile removes, so
  ``PatientSex`` (action Z), ``PatientAge``, ``StudyDate``/``StudyTime``, ``StudyDescription``,
  ``SeriesDescription``, ``InstitutionName``, ``StationName`` and ``DeviceSerialNumber`` are all
  PHI here: a name is a poor place for any of them, and the rule stays "what the profile removes".
  Two X-action UIDs (``AffectedSOPInstanceUID``, ``DigitalSignatureUID``) are here too, as the
  profile deletes rather than replaces them. A few attributes added to the table by later
  editions are included (:data:`_LATER_EDITIONS`).
* :data:`UID_KEYWORDS`: the attributes with action U (replace with a consistent UID), such as
  ``StudyInstanceUID``, ``SeriesInstanceUID`` and ``SOPInstanceUID``. They identify an instance
  and link it to records held elsewhere, but carry no patient data by themselves; the layout
  allows them in clear (and flags the layout with ``leaks_uids``), and recommends them hashed.

Attributes the profile keeps (``Modality``, ``SeriesNumber``, ``InstanceNumber``,
``SOPClassUID``, ...) are not PHI here. Private attributes have no keywords and cannot be used
in templates at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from dicom_cloud.errors import UsageError

__all__ = [
    "PHI_KEYWORDS",
    "UID_KEYWORDS",
    "check_tags_allowed",
    "is_identifying_uid",
    "is_phi",
    "phi_in_template",
    "template_keywords",
    "uids_in_template",
]

# fmt: off
#: Table E.1-1 attributes with a D, Z or X action (or a combination), 2013 edition.
_BASIC_PROFILE_DZX: frozenset[str] = frozenset({
    "AccessionNumber", "AcquisitionComments", "AcquisitionContextSequence", "AcquisitionDate",
    "AcquisitionDateTime", "AcquisitionDeviceProcessingDescription", "AcquisitionProtocolDescription",
    "AcquisitionTime", "ActualHumanPerformersSequence", "AdditionalPatientHistory", "AdmissionID",
    "AdmittingDate", "AdmittingDiagnosesCodeSequence", "AdmittingDiagnosesDescription", "AdmittingTime",
    "AffectedSOPInstanceUID", "Allergies", "Arbitrary", "AuthorObserverSequence", "BranchOfService",
    "CassetteID", "CommentsOnThePerformedProcedureStep",
    "ConfidentialityConstraintOnPatientDataDescription", "ContentCreatorIdentificationCodeSequence",
    "ContentCreatorName", "ContentDate", "ContentSequence", "ContentTime", "ContrastBolusAgent",
    "ContributionDescription", "CountryOfResidence", "CurrentPatientLocation", "CurveDate", "CurveTime",
    "CustodialOrganizationSequence", "DataSetTrailingPadding", "DerivationDescription", "DetectorID",
    "DeviceSerialNumber", "DigitalSignatureUID", "DigitalSignaturesSequence",
    "DischargeDiagnosisDescription", "DistributionAddress", "DistributionName", "EthnicGroup",
    "FillerOrderNumberImagingServiceRequest", "FrameComments", "GantryID", "GeneratorID",
    "GraphicAnnotationSequence", "HumanPerformerName", "HumanPerformerOrganization", "IconImageSequence",
    "IdentifyingComments", "ImageComments", "ImagePresentationComments", "ImagingServiceRequestComments",
    "Impressions", "InstitutionAddress", "InstitutionCodeSequence", "InstitutionName",
    "InstitutionalDepartmentName", "InsurancePlanIdentification",
    "IntendedRecipientsOfResultsIdentificationSequence", "InterpretationApproverSequence",
    "InterpretationAuthor", "InterpretationDiagnosisDescription", "InterpretationIDIssuer",
    "InterpretationRecorder", "InterpretationText", "InterpretationTranscriber", "IssuerOfAdmissionID",
    "IssuerOfPatientID", "IssuerOfServiceEpisodeID", "LastMenstrualDate", "MAC", "MedicalAlerts",
    "MedicalRecordLocator", "MilitaryRank", "ModifiedAttributesSequence", "ModifiedImageDescription",
    "ModifyingDeviceID", "ModifyingDeviceManufacturer", "NameOfPhysiciansReadingStudy",
    "NamesOfIntendedRecipientsOfResults", "Occupation", "OperatorIdentificationSequence", "OperatorsName",
    "OrderCallbackPhoneNumber", "OrderEnteredBy", "OrderEntererLocation", "OriginalAttributesSequence",
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "OverlayDate", "OverlayTime",
    "ParticipantSequence", "PatientAddress", "PatientAge", "PatientBirthDate", "PatientBirthName",
    "PatientBirthTime", "PatientComments", "PatientID", "PatientInstitutionResidence",
    "PatientInsurancePlanCodeSequence", "PatientMotherBirthName", "PatientName",
    "PatientPrimaryLanguageCodeSequence", "PatientPrimaryLanguageModifierCodeSequence",
    "PatientReligiousPreference", "PatientSex", "PatientSexNeutered", "PatientSize", "PatientState",
    "PatientTelephoneNumbers", "PatientTransportArrangements", "PatientWeight", "PerformedLocation",
    "PerformedProcedureStepDescription", "PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime",
    "PerformedProcedureStepID", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "PerformedStationAETitle", "PerformedStationGeographicLocationCodeSequence", "PerformedStationName",
    "PerformedStationNameCodeSequence", "PerformingPhysicianIdentificationSequence",
    "PerformingPhysicianName", "PersonAddress", "PersonIdentificationCodeSequence", "PersonName",
    "PersonTelephoneNumbers", "PhysicianApprovingInterpretation", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence",
    "PlacerOrderNumberImagingServiceRequest", "PlateID", "PreMedication", "PregnancyStatus",
    "ProtocolName", "ReasonForStudy", "ReasonForTheImagingServiceRequest",
    "ReferencedDigitalSignatureSequence", "ReferencedImageSequence", "ReferencedPatientAliasSequence",
    "ReferencedPatientSequence", "ReferencedPerformedProcedureStepSequence",
    "ReferencedSOPInstanceMACSequence", "ReferencedStudySequence", "ReferringPhysicianAddress",
    "ReferringPhysicianIdentificationSequence", "ReferringPhysicianName",
    "ReferringPhysicianTelephoneNumbers", "RegionOfResidence", "RequestAttributesSequence",
    "RequestedContrastAgent", "RequestedProcedureComments", "RequestedProcedureDescription",
    "RequestedProcedureID", "RequestedProcedureLocation", "RequestingPhysician", "RequestingService",
    "ResponsibleOrganization", "ResponsiblePerson", "ResultsComments", "ResultsDistributionListSequence",
    "ResultsIDIssuer", "ReviewerName", "ScheduledHumanPerformersSequence",
    "ScheduledPatientInstitutionResidence", "ScheduledPerformingPhysicianIdentificationSequence",
    "ScheduledPerformingPhysicianName", "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepEndDate", "ScheduledProcedureStepEndTime", "ScheduledProcedureStepLocation",
    "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime", "ScheduledStationAETitle",
    "ScheduledStationGeographicLocationCodeSequence", "ScheduledStationName",
    "ScheduledStationNameCodeSequence", "ScheduledStudyLocation", "ScheduledStudyLocationAETitle",
    "SeriesDate", "SeriesDescription", "SeriesTime", "ServiceEpisodeDescription", "ServiceEpisodeID",
    "SmokingStatus", "SourceImageSequence", "SpecialNeeds", "StationName", "StudyComments", "StudyDate",
    "StudyDescription", "StudyID", "StudyIDIssuer", "StudyTime", "TextComments", "TextString",
    "TimezoneOffsetFromUTC", "TopicAuthor", "TopicKeywords", "TopicSubject", "TopicTitle",
    "VerifyingObserverIdentificationCodeSequence", "VerifyingObserverName", "VerifyingObserverSequence",
    "VerifyingOrganization", "VisitComments",
})

#: Attributes that later editions of Table E.1-1 added with an X or Z action.
_LATER_EDITIONS: frozenset[str] = frozenset({
    "ConsultingPhysicianName", "ConsultingPhysicianIdentificationSequence", "InstanceCreationDate",
    "InstanceCreationTime", "IssuerOfPatientIDQualifiersSequence", "PatientAlternativeCalendar",
    "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar",
    "PatientTelecomInformation", "PersonTelecomInformation",
})

#: Keywords that are PHI or can carry it: refused in object names unless ``allow_phi``.
PHI_KEYWORDS: frozenset[str] = _BASIC_PROFILE_DZX | _LATER_EDITIONS

#: Table E.1-1 attributes with action U: identifying UIDs, allowed in names (hashed preferably).
UID_KEYWORDS: frozenset[str] = frozenset({
    "ConcatenationUID", "ContextGroupExtensionCreatorUID", "CreatorVersionUID", "DeviceUID",
    "DimensionOrganizationUID", "DoseReferenceUID", "FailedSOPInstanceUIDList", "FiducialUID",
    "FrameOfReferenceUID", "InstanceCreatorUID", "IrradiationEventUID", "LargePaletteColorLookupTableUID",
    "MediaStorageSOPInstanceUID", "PaletteColorLookupTableUID", "ReferencedFrameOfReferenceUID",
    "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID", "ReferencedSOPInstanceUID",
    "ReferencedSOPInstanceUIDInFile", "RelatedFrameOfReferenceUID", "RequestedSOPInstanceUID",
    "SeriesInstanceUID", "SOPInstanceUID", "StorageMediaFileSetUID", "StudyInstanceUID",
    "SynchronizationFrameOfReferenceUID", "TemplateExtensionCreatorUID", "TemplateExtensionOrganizationUID",
    "TransactionUID", "UID",
})
# fmt: on

# A template field: ``{Keyword}`` or ``{Keyword[a:b]}``; ``{{`` and ``}}`` are literal braces.
_FIELD = re.compile(r"\{([A-Za-z][A-Za-z0-9]*)(?:\[[^\]]*\])?\}")


def is_phi(keyword: str) -> bool:
    """Whether the attribute ``keyword`` is PHI or can carry it (see the module docstring)."""
    return keyword in PHI_KEYWORDS


def is_identifying_uid(keyword: str) -> bool:
    """Whether ``keyword`` is a UID the Basic Profile replaces: identifying, allowed only knowingly."""
    return keyword in UID_KEYWORDS


def template_keywords(template: str) -> list[str]:
    """The field names a layout template uses, in order of first use, without duplicates."""
    seen: dict[str, None] = {}
    for match in _FIELD.finditer(template.replace("{{", "").replace("}}", "")):
        seen.setdefault(match.group(1), None)
    return list(seen)


def phi_in_template(template: str) -> list[str]:
    """The PHI keywords a layout template uses, in order of first use."""
    return [keyword for keyword in template_keywords(template) if is_phi(keyword)]


def uids_in_template(template: str) -> list[str]:
    """The identifying UIDs a layout template puts in names in clear, in order of first use."""
    return [keyword for keyword in template_keywords(template) if is_identifying_uid(keyword)]


def check_tags_allowed(keywords: Iterable[str], allow_phi: bool, *, where: str = "object names") -> None:
    """Refuse PHI ``keywords`` unless ``allow_phi``; UIDs and non-PHI attributes always pass.

    Raises :class:`~dicom_cloud.errors.UsageError` naming every offending keyword and ``where``
    the values would have gone (object names, object metadata).
    """
    offending = sorted({keyword for keyword in keywords if is_phi(keyword)})
    if offending and not allow_phi:
        raise UsageError(
            f"{where} would contain PHI ({', '.join(offending)}); pass --allow-phi to store them anyway",
            hint=f"{where} are visible to anyone who can list the bucket and are never encrypted"
            + ("; prefer the 'hashed' layout" if where == "object names" else ""),
        )
