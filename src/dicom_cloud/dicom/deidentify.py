"""De-identifying one DICOM instance: PS3.15 Annex E, Basic Application Level Confidentiality Profile.

Bytes in, bytes out (:func:`deidentify`), with pydicom. Every attribute of Table E.1-1 gets one
of the profile's actions, applied wherever the attribute occurs, nested sequences included:

``X`` remove · ``Z`` replace with a zero-length value · ``D`` replace with a dummy of the right VR
· ``U`` replace a UID with a consistent new UID · ``K`` keep

Where the action table comes from
---------------------------------
The same source as :mod:`dicom_cloud.dicom.phi` (Table E.1-1, Basic Profile column, 2013 edition
plus a few later additions), so the two cannot drift: every keyword of
:data:`~dicom_cloud.dicom.phi.PHI_KEYWORDS` gets X, Z or D, every keyword of
:data:`~dicom_cloud.dicom.phi.UID_KEYWORDS` gets U. Only the Z and D entries are written out here
(:data:`_Z`, :data:`_D`); every other PHI keyword is X. Where the table gives a choice, the
choice is made without knowing the IOD, so that the output stays valid whatever the IOD:

* ``X/Z`` becomes Z (keeps a Type 2 attribute present, empty);
* ``X/D``, ``Z/D``, ``X/Z/D`` become D (keeps a Type 1 attribute present, with a dummy);
* ``X/Z/U*`` reference sequences (``ReferencedImageSequence``, ``SourceImageSequence``) and the
  D sequences become "D" meaning *kept, with each item de-identified recursively* (UIDs inside
  remapped, PHI inside removed). ``ReferencedStudySequence`` (``X/Z`` in the table) is treated
  the same way so that references to the study survive with remapped UIDs;
* D on a code sequence (``PersonIdentificationCodeSequence``) is one dummy code item.

``PatientName`` and ``PatientID`` (Z in the table) get a D action with a *consistent* dummy: the
pseudonym ``ANON-`` + 10 hex digits of HMAC-SHA256(secret, PatientID), so one patient keeps one
pseudonym across files and runs with the same secret.

Attributes the table does not name are kept (K), as the profile allows; ``BurnedInAnnotation``
is explicitly kept as it was. Also removed: every private attribute (the profile's default; the
*Retain Private Tags Option* is not implemented), the retired curve groups ``50xx``, and the
whole overlay groups ``60xx`` (the profile removes Overlay Data and Overlay Comments; the rest
of the overlay module is removed with them so that the module stays consistent), and the
file meta attributes naming application entities and private information.

UIDs
----
``new = "2.25." + str(int.from_bytes(HMAC-SHA256(secret, old)[:16], "big"))``: the same old UID
gives the same new UID in every file and every run with the same secret (so a study stays one
study), a different secret gives different UIDs, and nothing is random: the same input and
options give byte-identical output. ``MediaStorageSOPInstanceUID`` in the file meta is set to
the new ``SOPInstanceUID``. :func:`deidentify` returns the mapping old -> new; it links the
output to the original and is itself PHI-linking: keep it only on purpose.

Dates
-----
``keep_dates="remove"`` (default) is the Basic Profile: dates and times are removed, blanked or
replaced by dummies per the table. ``keep_dates="shift"`` implements the *Retain Longitudinal
Temporal Information with Modified Dates Option*: the DA and DT attributes of the table (except
``PatientBirthDate``, still blanked) are shifted by a whole number of days, times of day are
kept, so intervals between dates survive. The shift is ``date_shift_days`` or, when that is
``None``, derived per patient from HMAC(secret, PatientID) within +/-365 days (never 0).

Not covered
-----------
The pixel data is untouched: burned-in text is out of scope (``BurnedInAnnotation`` is kept so a
reader can tell). No other option of the profile (clean descriptors, retain device identity, ...)
is implemented, and attributes with PHI that the table does not name are kept.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from types import MappingProxyType
from typing import Any, Final, Literal

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from ..errors import DicomFormatError, UsageError
from .header import REASON_EMPTY, REASON_NO_DICM, REASON_UNREADABLE
from .phi import PHI_KEYWORDS, UID_KEYWORDS

__all__ = [
    "ACTIONS",
    "Action",
    "DeidentifyOptions",
    "UidMap",
    "deidentify",
    "new_uid",
    "patient_date_shift",
    "patient_pseudonym",
]

Action = Literal["X", "Z", "D", "U", "K"]
#: Old UID -> new UID, for every UID changed in one instance.
UidMap = dict[str, str]

# fmt: off
#: Table E.1-1 attributes given Z (zero-length): the Z entries, and X/Z resolved to Z.
_Z: Final = frozenset("""
    AccessionNumber AcquisitionDate AcquisitionTime ContentCreatorName
    FillerOrderNumberImagingServiceRequest InstitutionCodeSequence PatientBirthDate PatientSex
    PatientSexNeutered PlacerOrderNumberImagingServiceRequest ReferringPhysicianName
    RequestedProcedureDescription ReviewerName StudyDate StudyID StudyTime
    VerifyingObserverIdentificationCodeSequence
""".split())  # noqa: SIM905
#: Table E.1-1 attributes given D (dummy; for sequences, kept and cleaned item by item).
_D: Final = frozenset("""
    AcquisitionDateTime AcquisitionDeviceProcessingDescription ContentDate ContentTime
    ContrastBolusAgent DeviceSerialNumber GraphicAnnotationSequence InstanceCreationDate
    InstanceCreationTime InstitutionName PatientID PatientName PersonIdentificationCodeSequence
    PersonName ProtocolName ReferencedImageSequence ReferencedPerformedProcedureStepSequence
    ReferencedStudySequence SourceImageSequence StationName VerifyingObserverName
    VerifyingObserverSequence
""".split())  # noqa: SIM905
#: Attributes named and kept as they are.
_K: Final = frozenset({"BurnedInAnnotation"})
# fmt: on

#: The action for every attribute the profile names; any other public attribute is kept.
ACTIONS: Final[MappingProxyType[str, Action]] = MappingProxyType(
    {
        **{keyword: "X" for keyword in PHI_KEYWORDS - _Z - _D},
        **{keyword: "Z" for keyword in _Z},
        **{keyword: "D" for keyword in _D},
        **{keyword: "U" for keyword in UID_KEYWORDS},
        **{keyword: "K" for keyword in _K},
    }
)

#: Dates and times shifted (DA, DT) or kept (TM) under the modified dates option: those of the
#: table except the patient's birth, which stays blanked.
_SHIFTABLE: Final = PHI_KEYWORDS - {"PatientBirthDate", "PatientBirthTime"}
#: File meta attributes removed: application entity titles and private information.
_META_REMOVED: Final = (0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102)
_MEDIA_SOP_INSTANCE: Final = 0x00020003

_DUMMY_TEXT: Final = "ANONYMIZED"
_DUMMIES: Final[dict[str, Any]] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000D",
    "DS": "0",
    "IS": "0",
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "UL": 0,
    "US": 0,
    "SV": 0,
    "UV": 0,
}
_BINARY_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

_BASIC_PROFILE: Final = ("113100", "Basic Application Confidentiality Profile")
_MODIFIED_DATES: Final = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")

_MIN_SECRET: Final = 16


@dataclass(frozen=True)
class DeidentifyOptions:
    """How to de-identify: the secret behind UIDs and pseudonyms, and what happens to dates.

    ``secret`` (at least 16 bytes) is what makes the output consistent across files and runs and
    unlinkable without it: keep it like a key. ``keep_dates`` is ``"remove"`` (Basic Profile) or
    ``"shift"`` (modified dates option); ``date_shift_days`` fixes the shift, ``None`` derives it
    per patient from the secret.
    """

    secret: bytes
    keep_dates: Literal["remove", "shift"] = "remove"
    date_shift_days: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) < _MIN_SECRET:
            raise UsageError(
                f"the de-identification secret must be at least {_MIN_SECRET} bytes",
                hint="use a random secret, e.g. 32 bytes from os.urandom, and keep it",
            )
        if self.keep_dates not in ("remove", "shift"):
            raise UsageError(f"keep_dates must be 'remove' or 'shift', not {self.keep_dates!r}")
        if self.date_shift_days is not None and self.keep_dates != "shift":
            raise UsageError("date_shift_days needs keep_dates='shift'")


def new_uid(secret: bytes, old_uid: str) -> str:
    """The consistent replacement of ``old_uid``: ``2.25.`` + 128 bits of HMAC-SHA256."""
    digest = hmac.new(secret, old_uid.encode("ascii", "replace"), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def patient_pseudonym(secret: bytes, patient_id: str) -> str:
    """The consistent dummy for ``PatientName`` and ``PatientID``: ``ANON-`` + 10 hex digits."""
    digest = hmac.new(secret, b"patient-id\0" + patient_id.encode("utf-8"), hashlib.sha256)
    return "ANON-" + digest.hexdigest()[:10].upper()


def patient_date_shift(secret: bytes, patient_id: str) -> int:
    """The per-patient shift in days: within -365..365, never 0, fixed by the secret."""
    digest = hmac.new(secret, b"date-shift\0" + patient_id.encode("utf-8"), hashlib.sha256)
    days = int.from_bytes(digest.digest()[:4], "big") % 730 - 365
    return days if days < 0 else days + 1


def deidentify(data: bytes, options: DeidentifyOptions) -> tuple[bytes, UidMap]:
    """De-identify one DICOM instance; return the new bytes and the UIDs changed (old -> new).

    The encoding (transfer syntax, presence of a file meta) is kept and the pixel data is
    untouched: burned-in annotations are not removed. Raises
    :class:`~dicom_cloud.errors.DicomFormatError` when ``data`` is not DICOM.
    """
    ds = _read(data)
    top_patient_id = _text(ds, "PatientID")
    shift: int | None = None
    if options.keep_dates == "shift":
        shift = options.date_shift_days
        if shift is None:
            shift = patient_date_shift(options.secret, top_patient_id)
    job = _Job(options.secret, shift, top_patient_id)
    job.clean(ds)
    _clean_meta(ds, job)
    _mark(ds, shift is not None)

    out = BytesIO()
    try:
        for _ in ds.iterall():  # decode what is left raw: a mislabelled VR is written from its VR
            pass
        ds.save_as(out, enforce_file_format=False)
    except Exception as exc:  # pydicom raises many types on values it cannot encode
        raise DicomFormatError(REASON_UNREADABLE, detail=f"cannot write: {type(exc).__name__}") from exc
    return out.getvalue(), job.uids


# --- reading -------------------------------------------------------------------------------


def _read(data: bytes) -> Dataset:
    if not data:
        raise DicomFormatError(REASON_EMPTY)
    try:
        ds = dcmread(BytesIO(data))
    except InvalidDicomError:
        pass
    except Exception as exc:
        raise DicomFormatError(REASON_UNREADABLE, detail=type(exc).__name__) from exc
    else:
        if len(ds) == 0:
            raise DicomFormatError(REASON_UNREADABLE, detail="no data elements")
        return ds
    # No preamble: accept a bare dataset only when it reads and looks like one.
    try:
        ds = dcmread(BytesIO(data), force=True)
        looks_like_dicom = "SOPInstanceUID" in ds or "SOPClassUID" in ds
    except Exception as exc:
        raise DicomFormatError(REASON_NO_DICM) from exc
    if not looks_like_dicom:
        raise DicomFormatError(REASON_NO_DICM)
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    return "" if value is None else str(value).strip()


# --- the walk ------------------------------------------------------------------------------


class _Job:
    """The state of one de-identification: the secret, the date shift, the UIDs changed."""

    def __init__(self, secret: bytes, shift: int | None, top_patient_id: str) -> None:
        self.secret = secret
        self.shift = shift
        self.top_patient_id = top_patient_id
        self.uids: UidMap = {}

    def uid(self, old: str) -> str:
        old = old.strip("\0 ")
        if not old:
            return old
        new = self.uids.get(old)
        if new is None:
            new = self.uids[old] = new_uid(self.secret, old)
        return new

    def clean(self, ds: Dataset) -> None:
        """Apply the profile to every element of ``ds``, recursing into sequences."""
        patient_id = _text(ds, "PatientID") or self.top_patient_id
        for tag in [BaseTag(t) for t in list(ds.keys())]:  # keys: iterating converts values
            if tag.is_private or _is_curve_or_overlay(tag):
                del ds[tag]
                continue
            keyword = keyword_for_tag(tag)
            action = ACTIONS.get(keyword, "K")
            vr = _vr(ds, tag)
            if self.shift is not None and keyword in _SHIFTABLE and vr in ("DA", "DT", "TM"):
                self.shift_date(ds, tag, vr)
                continue
            if action == "X":
                del ds[tag]
            elif action == "Z":
                ds[tag] = DataElement(tag, vr, Sequence() if vr == "SQ" else empty_value_for_VR(vr))
            elif action == "D":
                self.dummy(ds, tag, keyword, vr, patient_id)
            elif action == "U":
                self.remap(ds, tag, vr)
            elif vr == "SQ":
                self.clean_items(ds, tag)

    def clean_items(self, ds: Dataset, tag: BaseTag) -> None:
        value = ds[tag].value
        if isinstance(value, Sequence):
            for item in value:
                self.clean(item)

    def dummy(self, ds: Dataset, tag: BaseTag, keyword: str, vr: str, patient_id: str) -> None:
        if keyword in ("PatientName", "PatientID"):
            ds[tag] = DataElement(tag, vr, patient_pseudonym(self.secret, patient_id))
        elif vr == "SQ" and keyword.endswith("CodeSequence"):
            item = Dataset()
            item.CodeValue = "0"
            item.CodingSchemeDesignator = "99DEID"
            item.CodeMeaning = _DUMMY_TEXT
            ds[tag] = DataElement(tag, vr, Sequence([item]))
        elif vr == "SQ":
            self.clean_items(ds, tag)
        elif vr in _BINARY_VRS:
            ds[tag] = DataElement(tag, vr, b"")
        elif vr == "UI":
            self.remap(ds, tag, vr)
        else:
            ds[tag] = DataElement(tag, vr, _DUMMIES.get(vr, _DUMMY_TEXT))

    def remap(self, ds: Dataset, tag: BaseTag, vr: str) -> None:
        value = _values(ds, tag)
        if value is None:
            del ds[tag]
            return
        new = [self.uid(v) for v in value]
        ds[tag] = DataElement(tag, vr, new[0] if len(new) == 1 else new)

    def shift_date(self, ds: Dataset, tag: BaseTag, vr: str) -> None:
        """Shift a DA or DT by whole days; keep a TM; blank what cannot be parsed."""
        if vr == "TM":
            return
        value = _values(ds, tag)
        if value is None:
            del ds[tag]
            return
        shift = self.shift or 0
        shifted = [_shift_one(v, shift) for v in value]
        if any(v is None for v in shifted):
            ds[tag] = DataElement(tag, vr, empty_value_for_VR(vr))
            return
        new = [v for v in shifted if v is not None]
        ds[tag] = DataElement(tag, vr, new[0] if len(new) == 1 else new)


def _is_curve_or_overlay(tag: BaseTag) -> bool:
    return tag.group & 0xFF00 in (0x5000, 0x6000) and tag.group % 2 == 0


def _vr(ds: Dataset, tag: BaseTag) -> str:
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    if not vr or " or " in vr or vr == "UN":
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = vr or "UN"
    return str(vr).split(" or ")[0]


def _values(ds: Dataset, tag: BaseTag) -> list[str] | None:
    """The string values of ``tag``, or ``None`` when pydicom cannot decode them."""
    try:
        value = ds[tag].value
    except Exception:
        return None
    if value is None or value == "":
        return [""]
    if isinstance(value, bytes):
        return [value.decode("ascii", "replace").strip("\0 ")]
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable):
        return [str(v) for v in value]
    return [str(value)]


def _shift_one(value: Any, days: int) -> str | None:
    """``YYYYMMDD[rest]`` (DA, or the date part of a DT) moved by ``days``; ``None`` if not a date."""
    text = str(value).strip()
    if not text:
        return ""
    if len(text) >= 10 and text[4] == "." and text[7] == ".":  # ACR-NEMA "YYYY.MM.DD"
        text = text[:4] + text[5:7] + text[8:]
    try:
        day = _dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None
    try:
        moved = day + _dt.timedelta(days=days)
    except OverflowError:
        return None
    return moved.strftime("%Y%m%d") + text[8:]


def _clean_meta(ds: Dataset, job: _Job) -> None:
    meta: FileMetaDataset | None = getattr(ds, "file_meta", None)
    if meta is None:
        return
    for tag in _META_REMOVED:
        if tag in meta:
            del meta[tag]
    if _MEDIA_SOP_INSTANCE in meta:
        sop = _values(ds, BaseTag(0x00080018)) if "SOPInstanceUID" in ds else None
        if sop:
            meta[_MEDIA_SOP_INSTANCE] = DataElement(_MEDIA_SOP_INSTANCE, "UI", sop[0])
        else:
            job.remap(meta, BaseTag(_MEDIA_SOP_INSTANCE), "UI")


def _mark(ds: Dataset, shifted: bool) -> None:
    """Record what was done: Patient Identity Removed, method, method codes, dates status."""
    codes = [_BASIC_PROFILE] + ([_MODIFIED_DATES] if shifted else [])
    ds.PatientIdentityRemoved = "YES"
    methods = ["PS3.15 Basic Profile"] + (["Modified Dates Option"] if shifted else [])
    ds.DeidentificationMethod = methods if len(methods) > 1 else methods[0]
    ds.DeidentificationMethodCodeSequence = Sequence([_code(value, meaning) for value, meaning in codes])
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if shifted else "REMOVED"


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item
