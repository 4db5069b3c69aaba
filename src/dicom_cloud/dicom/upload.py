"""What a DICOM-aware transfer does with each instance: read its identity, name it, validate it, tag it.

The transfer engine calls :meth:`DicomPolicy.identify` once per object (a read of the header only)
and then writes the object under :meth:`DicomPolicy.object_name` with :meth:`DicomPolicy.metadata`.
Patient data never reaches names or metadata unless ``allow_phi`` says so (the layout and the
tag list are checked when the policy is built, before any transfer starts).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import UsageError
from ..store import Store
from .header import DicomIdentity, Policy, read_identity_from_file, read_identity_from_store
from .layout import Layout, OrthancContentType, orthanc_object_name
from .phi import check_tags_allowed

#: DicomIdentity fields by DICOM keyword: what a layout or a metadata tag can name without an extra read.
_IDENTITY_FIELDS: Mapping[str, str] = {
    "StudyInstanceUID": "study_instance_uid",
    "SeriesInstanceUID": "series_instance_uid",
    "SOPInstanceUID": "sop_instance_uid",
    "SOPClassUID": "sop_class_uid",
    "Modality": "modality",
    "StudyDate": "study_date",
    "TransferSyntaxUID": "transfer_syntax_uid",
    "PatientID": "patient_id",
    "AccessionNumber": "accession_number",
    "SeriesNumber": "series_number",
    "InstanceNumber": "instance_number",
}

#: Namespace of the uuid5 names given by the Orthanc layouts (fixed: names must not change between versions).
_ORTHANC_NAMESPACE = uuid.UUID("7d4a3c1e-5b2f-4e8a-9c6d-0f1e2d3c4b5a")

#: Prefix of the metadata keys holding DICOM attributes (identifiers: Azure requires them).
METADATA_PREFIX = "dicom_"


@dataclass(frozen=True)
class DicomPolicy:
    """How uploads treat DICOM: object names from a layout, attributes as metadata, validation."""

    layout: Layout | None = None
    #: DICOM keywords written as object metadata (``dicom_<keyword>``), e.g. Modality, SeriesInstanceUID.
    metadata_tags: tuple[str, ...] = ()
    #: Skip files that are not DICOM (reported with the reason) instead of failing them.
    skip_invalid: bool = False
    #: Read headers strictly (Part 10 preamble and marker, all identity UIDs present and valid).
    strict: bool = False
    allow_phi: bool = False
    #: Name objects as Orthanc's object-storage plugins do ("flat" or "legacy"), instead of ``layout``.
    orthanc_structure: Literal["flat", "legacy"] | None = None
    #: With ``orthanc_structure``: the objects are client-side encrypted (Orthanc adds ``.enc``).
    encrypted: bool = False
    #: Keywords to read beyond the identity (derived).
    extra_tags: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        check_tags_allowed(self.metadata_tags, self.allow_phi, where="object metadata")
        if self.layout is not None and self.layout.phi_keywords and not self.allow_phi:
            raise UsageError(f"the layout names patient data ({', '.join(self.layout.phi_keywords)})")
        wanted = {*(self.layout.keywords if self.layout else ()), *self.metadata_tags}
        object.__setattr__(self, "extra_tags", tuple(sorted(wanted - set(_IDENTITY_FIELDS))))

    @property
    def names_objects(self) -> bool:
        """Whether object names come from the DICOM header (a layout, or Orthanc's names): then two
        files may map to one name."""
        return self.layout is not None or self.orthanc_structure is not None

    @property
    def policy(self) -> Policy:
        return "strict" if self.strict else "lenient"

    async def identify(
        self, store: Store, key: str, *, local: bool, size: int | None = None
    ) -> DicomIdentity:
        """The identity of one object or local file, from its header only."""
        if local:
            path = Path("/" + key)
            return await asyncio.to_thread(
                read_identity_from_file, path, extra_tags=self.extra_tags, policy=self.policy
            )
        return await read_identity_from_store(
            store, key, extra_tags=self.extra_tags, policy=self.policy, size=size
        )

    def values(self, identity: DicomIdentity) -> dict[str, str]:
        """Attribute values by keyword, as layouts and metadata use them."""
        values = {keyword: _text(getattr(identity, name)) for keyword, name in _IDENTITY_FIELDS.items()}
        values.update({k: _text(v) for k, v in identity.extra.items()})
        return values

    def object_name(self, identity: DicomIdentity, filename: str) -> str | None:
        """The name below the destination prefix, or None to keep the source's relative name."""
        if self.orthanc_structure is not None:
            # Orthanc names attachments by random uuids; a uuid5 of the SOP Instance UID has the
            # same form and stays the same across runs, so a re-run finds what it wrote.
            attachment = str(uuid.uuid5(_ORTHANC_NAMESPACE, identity.sop_instance_uid))
            return orthanc_object_name(
                attachment,
                OrthancContentType.DICOM,
                structure=self.orthanc_structure,
                encrypted=self.encrypted,
            )
        if self.layout is None:
            return None
        return self.layout.name(self.values(identity), filename=filename)

    def metadata(self, identity: DicomIdentity) -> dict[str, str]:
        values = self.values(identity)
        return {
            METADATA_PREFIX + keyword.lower(): values[keyword]
            for keyword in self.metadata_tags
            if values.get(keyword) and values[keyword].isascii()
        }


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()
