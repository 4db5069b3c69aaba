"""Index rows of instances: insert one (creating its patient, study and series rows), look them
up, delete them, and the user labels of studies. Functions of a session, run by ``Database.run``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Insert,
    Select,
    Table,
    bindparam,
    delete,
    exists,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from ..errors import ConflictError, NotFoundError, UsageError
from .models import ExtraAttribute, Instance, Patient, Series, Study, StudyLabel
from .parsing import IndexedAttributes
from .records import InstanceRecord, StudyLabels


def utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (SQLite hands back naive ones)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: The columns an InstanceRecord is made of, in its fields' order (instance joined to its series and study).
_RECORD_COLUMNS = (
    Instance.tenant,
    Study.study_instance_uid,
    Series.series_instance_uid,
    Instance.sop_instance_uid,
    Instance.sop_class_uid,
    Instance.transfer_syntax_uid,
    Instance.number_of_frames,
    Instance.rows,
    Instance.columns,
    Instance.object_key,
    Instance.sidecar_key,
    Instance.size,
    Instance.crc32c,
    Instance.encrypted,
    Instance.created,
)


# Plain columns, not ORM entities: no identity map or attribute instrumentation per row.
_RECORDS = (
    select(*_RECORD_COLUMNS)
    .join(Series, Series.id == Instance.series_pk)
    .join(Study, Study.id == Series.study_pk)
)


def _record(row: Sequence[Any]) -> InstanceRecord:
    (tenant, study, series, sop, sop_class, syntax, frames, rows, columns) = row[:9]
    object_key, sidecar_key, size, crc32c, encrypted, created = row[9:]
    return InstanceRecord(
        tenant=tenant,
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        transfer_syntax_uid=syntax,
        number_of_frames=frames,
        rows=rows,
        columns=columns,
        object_key=object_key,
        sidecar_key=sidecar_key,
        size=size,
        crc32c=crc32c,
        encrypted=encrypted,
        created=utc(created),
    )


_FIND_INSTANCE = _RECORDS.where(
    Instance.tenant == bindparam("tenant"), Instance.sop_instance_uid == bindparam("sop_instance_uid")
)


def find_instance(session: Session, tenant: str, sop_instance_uid: str) -> InstanceRecord | None:
    row = session.execute(_FIND_INSTANCE, {"tenant": tenant, "sop_instance_uid": sop_instance_uid}).first()
    return _record(row) if row else None


_FIND_INSTANCES = _RECORDS.where(
    Instance.tenant == bindparam("tenant"),
    Instance.sop_instance_uid.in_(bindparam("uids", expanding=True)),
)
#: UIDs bound per statement (SQLite's default limit is 32,766 parameters; older builds 999).
_UIDS_PER_QUERY = 500


def find_instances(
    session: Session, tenant: str, sop_instance_uids: Sequence[str]
) -> dict[str, InstanceRecord]:
    """The stored instances of ``tenant`` among ``sop_instance_uids``, by SOP Instance UID."""
    found: dict[str, InstanceRecord] = {}
    for start in range(0, len(sop_instance_uids), _UIDS_PER_QUERY):
        uids = list(sop_instance_uids[start : start + _UIDS_PER_QUERY])
        for row in session.execute(_FIND_INSTANCES, {"tenant": tenant, "uids": uids}):
            record = _record(row)
            found[record.sop_instance_uid] = record
    return found


_PATIENTS = cast(Table, Patient.__table__)
_STUDIES = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCES = cast(Table, Instance.__table__)
_EXTRA = cast(Table, ExtraAttribute.__table__)
#: Attributes of each level: patients take the latest instance's, studies and series keep the first.
_PATIENT_ATTRIBUTES = ("patient_name", "patient_birth_date", "patient_sex")
_STUDY_ATTRIBUTES = (
    "study_date",
    "study_time",
    "accession_number",
    "study_description",
    "referring_physician_name",
    "study_id",
)
_SERIES_ATTRIBUTES = ("modality", "series_number", "series_description")
# Statements built once (this runs for every instance stored): values are bound at execution.
_FIND_PATIENT = select(_PATIENTS.c.id, *(_PATIENTS.c[name] for name in _PATIENT_ATTRIBUTES)).where(
    _PATIENTS.c.tenant == bindparam("tenant"), _PATIENTS.c.patient_id == bindparam("key")
)
_FIND_STUDY = select(_STUDIES.c.id, *(_STUDIES.c[name] for name in _STUDY_ATTRIBUTES)).where(
    _STUDIES.c.tenant == bindparam("tenant"), _STUDIES.c.study_instance_uid == bindparam("key")
)
_FIND_SERIES = select(
    _SERIES.c.id, _SERIES.c.study_pk, *(_SERIES.c[name] for name in _SERIES_ATTRIBUTES)
).where(_SERIES.c.tenant == bindparam("tenant"), _SERIES.c.series_instance_uid == bindparam("key"))


def _given(attrs: IndexedAttributes, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(attrs, name) for name in names if getattr(attrs, name) is not None}


class LevelRows:
    """The patient, study and series rows one transaction has looked up or written, by key.

    The instances of one request mostly share them (a STOW-RS of a series: one patient, study
    and series for all), and each instance would otherwise look all three up again. Made for one
    transaction and dropped with it: a row seen in a transaction that rolled back may not exist."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str, str], dict[str, Any]] = {}

    def find(
        self, connection: Connection, query: Select[Any], table: Table, tenant: str, key: str
    ) -> dict[str, Any] | None:
        """The row of ``key`` (its columns by name), from this transaction's memory or ``query``."""
        known = self._rows.get((table.name, tenant, key))
        if known is not None:
            return known
        row = connection.execute(query, {"tenant": tenant, "key": key}).first()
        if row is None:
            return None
        values = dict(row._mapping)
        self._rows[(table.name, tenant, key)] = values
        return values

    def remember(self, table: Table, tenant: str, key: str, values: dict[str, Any]) -> None:
        self._rows[(table.name, tenant, key)] = values


def insert_instance(
    session: Session,
    tenant: str,
    attrs: IndexedAttributes,
    *,
    object_key: str,
    sidecar_key: str,
    size: int,
    crc32c: str,
    encrypted: bool,
    rows: LevelRows | None = None,
) -> InstanceRecord:
    """Insert the instance row and any missing patient, study and series rows above it.

    SQL expressions on the session's connection (no ORM unit of work: this runs for every
    instance stored), one statement per level, an UPDATE only when a value changes; with
    ``rows`` (one per transaction), a level already looked up or written in the transaction is
    not looked up again. A series already filed under another study is ConflictError (its UIDs
    are inconsistent). Races with another writer surface as sqlalchemy's IntegrityError: the
    caller retries.
    """
    connection = session.connection()
    now = datetime.now(UTC)
    rows = rows if rows is not None else LevelRows()

    patient_values = _given(attrs, _PATIENT_ATTRIBUTES)
    patient = rows.find(connection, _FIND_PATIENT, _PATIENTS, tenant, attrs.patient_id)
    if patient is None:
        patient_pk = _inserted(
            connection, _PATIENTS, {"tenant": tenant, "patient_id": attrs.patient_id, **patient_values}
        )
        rows.remember(
            _PATIENTS, tenant, attrs.patient_id, _row(patient_pk, _PATIENT_ATTRIBUTES, patient_values)
        )
    else:
        patient_pk = patient["id"]
        changed = {name: value for name, value in patient_values.items() if patient[name] != value}
        if changed:
            connection.execute(update(_PATIENTS).where(_PATIENTS.c.id == patient_pk).values(**changed))
            patient.update(changed)

    study_values = _given(attrs, _STUDY_ATTRIBUTES)
    study = rows.find(connection, _FIND_STUDY, _STUDIES, tenant, attrs.study_instance_uid)
    if study is None:
        study_pk = _inserted(
            connection,
            _STUDIES,
            {
                "tenant": tenant,
                "patient_pk": patient_pk,
                "study_instance_uid": attrs.study_instance_uid,
                "created": now,
                **study_values,
            },
        )
        rows.remember(
            _STUDIES, tenant, attrs.study_instance_uid, _row(study_pk, _STUDY_ATTRIBUTES, study_values)
        )
    else:
        study_pk = study["id"]
        _fill_missing(connection, _STUDIES, study_pk, study, study_values)

    series_values = _given(attrs, _SERIES_ATTRIBUTES)
    series = rows.find(connection, _FIND_SERIES, _SERIES, tenant, attrs.series_instance_uid)
    if series is None:
        series_pk = _inserted(
            connection,
            _SERIES,
            {
                "tenant": tenant,
                "study_pk": study_pk,
                "series_instance_uid": attrs.series_instance_uid,
                **series_values,
            },
        )
        row = _row(series_pk, _SERIES_ATTRIBUTES, series_values)
        rows.remember(_SERIES, tenant, attrs.series_instance_uid, {**row, "study_pk": study_pk})
    elif series["study_pk"] != study_pk:
        raise ConflictError("the series of this instance is already filed under another study")
    else:
        series_pk = series["id"]
        _fill_missing(connection, _SERIES, series_pk, series, series_values)

    instance_pk = _inserted(
        connection,
        _INSTANCES,
        {
            "tenant": tenant,
            "series_pk": series_pk,
            "sop_instance_uid": attrs.sop_instance_uid,
            "sop_class_uid": attrs.sop_class_uid,
            "instance_number": attrs.instance_number,
            "transfer_syntax_uid": attrs.transfer_syntax_uid,
            "number_of_frames": attrs.number_of_frames,
            "rows": attrs.rows,
            "columns": attrs.columns,
            "bits_allocated": attrs.bits_allocated,
            "object_key": object_key,
            "sidecar_key": sidecar_key,
            "size": size,
            "crc32c": crc32c,
            "encrypted": encrypted,
            "created": now,
        },
    )
    if attrs.extra:
        connection.execute(
            insert(_EXTRA),
            [
                {"instance_pk": instance_pk, "tag": tag, "vr": vr, "value": value}
                for tag, vr, value in attrs.extra
            ],
        )
    return InstanceRecord(
        tenant=tenant,
        study_instance_uid=attrs.study_instance_uid,
        series_instance_uid=attrs.series_instance_uid,
        sop_instance_uid=attrs.sop_instance_uid,
        sop_class_uid=attrs.sop_class_uid,
        transfer_syntax_uid=attrs.transfer_syntax_uid,
        number_of_frames=attrs.number_of_frames,
        rows=attrs.rows,
        columns=attrs.columns,
        object_key=object_key,
        sidecar_key=sidecar_key,
        size=size,
        crc32c=crc32c,
        encrypted=encrypted,
        created=now,
    )


_INSERT_INTO: dict[str, Insert] = {t.name: insert(t) for t in (_PATIENTS, _STUDIES, _SERIES, _INSTANCES)}


def _inserted(connection: Connection, table: Table, values: dict[str, Any]) -> int:
    """Insert one row into ``table``; its primary key."""
    key = connection.execute(_INSERT_INTO[table.name], values).inserted_primary_key
    assert key is not None
    return int(key[0])


def _row(pk: int, names: Sequence[str], values: Mapping[str, Any]) -> dict[str, Any]:
    """A level's row as just inserted: its key and every attribute (None where not given)."""
    return {"id": pk, **{name: values.get(name) for name in names}}


def _fill_missing(
    connection: Connection, table: Table, pk: int, stored: dict[str, Any], values: Mapping[str, Any]
) -> None:
    """Set the columns of row ``pk`` that are NULL and that ``values`` has (first seen wins);
    ``stored`` (the row as known) is updated alike."""
    missing = {name: value for name, value in values.items() if stored[name] is None}
    if missing:
        connection.execute(update(table).where(table.c.id == pk).values(**missing))
        stored.update(missing)


def instance_page(session: Session, after: int, size: int) -> list[tuple[int, str]]:
    """(row id, sidecar key) of up to ``size`` instances with ids above ``after``, every tenant."""
    query = (
        select(Instance.id, Instance.sidecar_key).where(Instance.id > after).order_by(Instance.id).limit(size)
    )
    return [(pk, key) for pk, key in session.execute(query)]


def replace_extra_attributes(
    session: Session, values: Sequence[tuple[int, Sequence[tuple[str, str, str]]]], tags: Sequence[str]
) -> None:
    """Set the configured extra attributes (``tags``) of instances to ``values`` (id, [(tag, vr, value)])."""
    pks = [pk for pk, _ in values]
    session.execute(
        delete(ExtraAttribute).where(ExtraAttribute.instance_pk.in_(pks), ExtraAttribute.tag.in_(tags))
    )
    for pk, attributes in values:
        for tag, vr, value in attributes:
            session.add(ExtraAttribute(instance_pk=pk, tag=tag, vr=vr, value=value))
    session.flush()


def referenced_object_keys(session: Session, tenant: str, keys: Sequence[str]) -> set[str]:
    """Which of ``keys`` are the object key of an instance row of ``tenant``."""
    query = select(Instance.object_key).where(Instance.tenant == tenant, Instance.object_key.in_(list(keys)))
    return set(session.scalars(query))


# One instance by its three UIDs (per-instance WADO-RS): a statement built once, values bound.
_FIND_ONE = _FIND_INSTANCE.where(
    Study.study_instance_uid == bindparam("study"), Series.series_instance_uid == bindparam("series")
)


# The same as a typed textual statement: SQLAlchemy computes the cache key of a Select at every
# execution, a walk of its joins and clauses that was half the lookup's cost (70 us of 140); a
# textual statement's key is its string. Rendered without a dialect: plain SQL with ``:name``
# parameters, which SQLite and PostgreSQL both take (tests/integration/test_archive_postgres.py).
_FIND_ONE_TEXT = text(str(_FIND_ONE)).columns(*_FIND_ONE.selected_columns)


def instance_at(
    connection: Connection, tenant: str, study: str, series: str, sop: str
) -> list[InstanceRecord]:
    """The instance of these three UIDs (none or one), in one statement."""
    values = {"tenant": tenant, "sop_instance_uid": sop, "study": study, "series": series}
    return [_record(row) for row in connection.execute(_FIND_ONE_TEXT, values)]


def list_instances(
    session: Session,
    tenant: str,
    study_instance_uid: str,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> list[InstanceRecord]:
    if series_instance_uid is not None and sop_instance_uid is not None:
        return instance_at(
            session.connection(), tenant, study_instance_uid, series_instance_uid, sop_instance_uid
        )
    query = _RECORDS.where(Instance.tenant == tenant, Study.study_instance_uid == study_instance_uid)
    if series_instance_uid is not None:
        query = query.where(Series.series_instance_uid == series_instance_uid)
    if sop_instance_uid is not None:
        query = query.where(Instance.sop_instance_uid == sop_instance_uid)
    query = query.order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
    return [_record(row) for row in session.execute(query)]


def _what(series_instance_uid: str | None, sop_instance_uid: str | None) -> str:
    return "instance" if sop_instance_uid else "series" if series_instance_uid else "study"


def require_instances(
    session: Session,
    tenant: str,
    study_instance_uid: str,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> list[InstanceRecord]:
    """As :func:`list_instances`; NotFoundError when there are none."""
    found = list_instances(session, tenant, study_instance_uid, series_instance_uid, sop_instance_uid)
    if not found:
        raise NotFoundError(f"no such {_what(series_instance_uid, sop_instance_uid)}")
    return found


def delete_instances(
    session: Session,
    tenant: str,
    study_instance_uid: str,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> tuple[list[InstanceRecord], int, int]:
    """Delete the rows of a study, series or instance, and the series, study and patient rows
    left empty. Returns the deleted instances and the counts of deleted series and studies."""
    records = require_instances(session, tenant, study_instance_uid, series_instance_uid, sop_instance_uid)
    uids = [r.sop_instance_uid for r in records]
    instance_pks = list(
        session.scalars(
            select(Instance.id).where(Instance.tenant == tenant, Instance.sop_instance_uid.in_(uids))
        )
    )
    series_pks = set(session.scalars(select(Instance.series_pk).where(Instance.id.in_(instance_pks))))
    session.execute(delete(ExtraAttribute).where(ExtraAttribute.instance_pk.in_(instance_pks)))
    session.execute(delete(Instance).where(Instance.id.in_(instance_pks)))
    empty_series = list(
        session.scalars(
            select(Series.id).where(
                Series.id.in_(series_pks), ~exists().where(Instance.series_pk == Series.id)
            )
        )
    )
    study_pks = set(session.scalars(select(Series.study_pk).where(Series.id.in_(series_pks))))
    session.execute(delete(Series).where(Series.id.in_(empty_series)))
    empty_studies = list(
        session.scalars(
            select(Study.id).where(Study.id.in_(study_pks), ~exists().where(Series.study_pk == Study.id))
        )
    )
    patient_pks = set(session.scalars(select(Study.patient_pk).where(Study.id.in_(empty_studies))))
    session.execute(delete(StudyLabel).where(StudyLabel.study_pk.in_(empty_studies)))
    session.execute(delete(Study).where(Study.id.in_(empty_studies)))
    session.execute(
        delete(Patient).where(Patient.id.in_(patient_pks), ~exists().where(Study.patient_pk == Patient.id))
    )
    return records, len(empty_series), len(empty_studies)


def _study(session: Session, tenant: str, study_instance_uid: str) -> Study:
    study = session.scalar(
        select(Study).where(Study.tenant == tenant, Study.study_instance_uid == study_instance_uid)
    )
    if study is None:
        raise NotFoundError("no such study")
    return study


def study_exists(session: Session, tenant: str, study_instance_uid: str) -> bool:
    return (
        session.scalar(
            select(func.count(Study.id)).where(
                Study.tenant == tenant, Study.study_instance_uid == study_instance_uid
            )
        )
        != 0
    )


def get_labels(session: Session, tenant: str, study_instance_uid: str) -> StudyLabels:
    study = _study(session, tenant, study_instance_uid)
    tags = session.scalars(
        select(StudyLabel.label).where(StudyLabel.study_pk == study.id).order_by(StudyLabel.label)
    )
    return StudyLabels(study_instance_uid, tuple(tags), study.label_description)


_MAX_LABELS = 100
_MAX_LABEL = 64
_MAX_DESCRIPTION = 10_000


def set_labels(
    session: Session,
    tenant: str,
    study_instance_uid: str,
    tags: Sequence[str] | None,
    description: str | None,
) -> StudyLabels:
    study = _study(session, tenant, study_instance_uid)
    if tags is not None:
        if isinstance(tags, str):
            raise UsageError("labels are a list of strings")
        cleaned = sorted({t.strip() for t in tags if t.strip()})
        if len(cleaned) > _MAX_LABELS:
            raise UsageError(f"a study has at most {_MAX_LABELS} labels")
        for tag in cleaned:
            if len(tag) > _MAX_LABEL or "," in tag or any(ord(c) < 32 for c in tag):
                raise UsageError(
                    f"a label has at most {_MAX_LABEL} characters, no comma, no control character"
                )
        session.execute(delete(StudyLabel).where(StudyLabel.study_pk == study.id))
        for tag in cleaned:
            session.add(StudyLabel(study_pk=study.id, label=tag))
    if description is not None:
        if len(description) > _MAX_DESCRIPTION:
            raise UsageError(f"a description has at most {_MAX_DESCRIPTION} characters")
        if any((ord(c) < 32 and c not in "\t\n\r") or c == "\x7f" for c in description):
            raise UsageError("a description cannot hold control characters other than tab and newline")
        study.label_description = description or None
    session.flush()
    return get_labels(session, tenant, study_instance_uid)
