"""The index schema (SQLAlchemy 2 declarative models). Alembic migrations in ``migrations/`` create it.

Levels follow the DICOM information model: patient → study → series → instance, each row
carrying its tenant and unique per (tenant, identifying value). The values stored are the
attributes QIDO-RS matches and returns; everything else about an instance is in its sidecar.

Text attributes are stored as decoded Unicode (multi-valued ones joined by ``\\``); absent
values are NULL. Dates are ``YYYYMMDD``; times are normalised to ``HHMMSS[.ffffff]`` so that
string comparison orders them (range matching relies on it).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import JSON

#: Length of UI columns (64 characters per PS3.5, with slack for sloppy writers).
_UID = 128
#: Length of short text columns (LO is 64 characters; PN groups up to 3 x 64).
_LO = 256


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("tenant", "patient_id", name="uq_patients_tenant_patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    #: PatientID; "" when the instances had none (they then share one anonymous patient).
    patient_id: Mapped[str] = mapped_column(String(_LO))
    patient_name: Mapped[str | None] = mapped_column(String(_LO))
    patient_birth_date: Mapped[str | None] = mapped_column(String(16))
    patient_sex: Mapped[str | None] = mapped_column(String(16))


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (
        UniqueConstraint("tenant", "study_instance_uid", name="uq_studies_tenant_uid"),
        Index("ix_studies_tenant_date", "tenant", "study_date"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(_UID))
    study_date: Mapped[str | None] = mapped_column(String(16))
    study_time: Mapped[str | None] = mapped_column(String(32))
    accession_number: Mapped[str | None] = mapped_column(String(_LO))
    study_description: Mapped[str | None] = mapped_column(String(_LO))
    referring_physician_name: Mapped[str | None] = mapped_column(String(_LO))
    study_id: Mapped[str | None] = mapped_column(String(_LO))
    #: User label: free text (searchable with ``labeldescription``).
    label_description: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    patient: Mapped[Patient] = relationship()


class StudyLabel(Base):
    """User labels (tags) of a study, one row each."""

    __tablename__ = "study_labels"
    __table_args__ = (UniqueConstraint("study_pk", "label", name="uq_study_labels"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(_LO), index=True)


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (UniqueConstraint("tenant", "series_instance_uid", name="uq_series_tenant_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(_UID))
    modality: Mapped[str | None] = mapped_column(String(16), index=True)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(_LO))

    study: Mapped[Study] = relationship()


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("tenant", "sop_instance_uid", name="uq_instances_tenant_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(_UID))
    sop_class_uid: Mapped[str | None] = mapped_column(String(_UID))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(_UID))
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    bits_allocated: Mapped[int | None] = mapped_column(Integer)
    object_key: Mapped[str] = mapped_column(String(1024))
    sidecar_key: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    crc32c: Mapped[str] = mapped_column(String(8))
    encrypted: Mapped[bool] = mapped_column(Boolean)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    series: Mapped[Series] = relationship()


class ExtraAttribute(Base):
    """Values of the configured extra query tags, per instance (matched at every level above)."""

    __tablename__ = "extra_attributes"
    __table_args__ = (
        UniqueConstraint("instance_pk", "tag", name="uq_extra_attributes"),
        Index("ix_extra_attributes_tag_value", "tag", "value"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), index=True)
    #: The attribute's tag as 8 upper-case hex digits.
    tag: Mapped[str] = mapped_column(String(8))
    vr: Mapped[str] = mapped_column(String(2))
    value: Mapped[str] = mapped_column(String(1024))


class ApiTokenRow(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(_LO))
    #: SHA-256 of the token, hex. The token itself is never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    #: Space-separated scopes (read, write, admin).
    scopes: Mapped[str] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: When the token stops being accepted; None: valid until revoked.
    expires: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ShareLinkRow(Base):
    __tablename__ = "share_links"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(_UID))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class UploadSessionRow(Base):
    __tablename__ = "upload_sessions"

    #: A random id (32 hex digits): it appears in staging keys and URLs.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    #: The declared files: [{"name", "size", "crc32c"}].
    files: Mapped[list[dict[str, object]]] = mapped_column(JSON)
    staging_keys: Mapped[list[str]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    result: Mapped[dict[str, object] | None] = mapped_column(JSON)
