"""Object names for DICOM instances: layout templates, and the names Orthanc's plugins give attachments.

A :class:`Layout` turns the identity of one DICOM instance (the tag values a header reader
returns, plus the source file's name) into a relative object name, safe to use as a key in any
store and as a path under a local directory.

Templates
---------
A template is literal text with fields in braces, ``/`` separating the name's segments::

    {StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm

Fields:

``{Keyword}``
    The value of any attribute of the DICOM data dictionary, by keyword (``Modality``,
    ``SeriesNumber``, ...), taken from the mapping given to :meth:`Layout.name`. Sequences
    cannot be used. PHI keywords (:mod:`dicom_cloud.dicom.phi`) are refused unless
    ``allow_phi=True``.
``{hash}``
    :func:`uid_hash` of the SOP Instance UID: 32 lower-case hex digits.
``{filename}``
    The last segment of the source file's name (extension included).
``{ext}``
    The source file's extension with its dot (``.dcm``), or nothing when the file has none
    (or one that is not 1-16 letters and digits).

Any field but ``{ext}`` may be sliced as in Python: ``{hash[0:2]}``, ``{Modality[0:2]}``.
``{{`` and ``}}`` are literal braces. Unknown keywords, malformed fields and templates whose
literal text is itself unsafe are :class:`~dicom_cloud.errors.UsageError` at construction.

Values are made safe before they are placed: DICOM padding (spaces, NUL) is stripped, the text is
NFC-normalised, ``/``, ``\\``, NUL and control, format and separator characters become ``_``, a run
of two or more dots becomes as many ``_``, a lone ``.`` becomes ``_``, and an empty value becomes
``unknown``. So a value can never add a segment or climb out of the destination. An instance
without a SOP Instance UID cannot be named by ``{hash}`` or ``{SOPInstanceUID}``:
:meth:`Layout.name` raises rather than give every such file the same name. When a segment would
exceed 255 bytes (UTF-8) or the name 1024 bytes, the longest values are cut and end with ``~`` and
the first 8 hex digits of the SHA-256 of the whole value, so that different long values still give
different names.

Presets
-------
``hashed`` (the default for DICOM-aware uploads)
    ``{hash[0:2]}/{hash[2:4]}/{hash}.dcm``. Names leak no UID and spread evenly over 65,536
    prefixes (stores partition and throttle by prefix).
``uid``
    ``{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm``. Readable, groups a study
    under one prefix, but puts identifying UIDs in clear (:attr:`Layout.leaks_uids`).
``orthanc-flat`` / ``orthanc-legacy``
    Orthanc's names come from its attachment uuids, not from DICOM tags: see
    :func:`orthanc_object_name`.

The hash, keyed or not
----------------------
``uid_hash(uid)`` is ``SHA-256(uid)`` and ``uid_hash(uid, key)`` is ``HMAC-SHA-256(key, uid)``,
hex, cut to 32 digits (128 bits: no collision is expected below 2**64 instances), over the UID's
ASCII bytes after stripping DICOM padding. Test vectors are in ``tests/unit/test_dicom_layout.py``.

* Without a key (the default) any tool can find an instance's object from its UID alone, and
  re-uploading the same instance always lands on the same name. But the name is no secret:
  anyone who knows or can guess a UID (UIDs are structured: an organisation root plus counters or
  timestamps) can tell whether that instance is in a bucket they can list.
* With a key (a user-held secret of at least 16 bytes, kept apart from encryption master keys)
  names cannot be linked to UIDs without the key; losing the key means objects can then be
  found only by listing or from an index, not from their UIDs.

The key is a choice made once per bucket: changing it renames every object.
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType
from typing import Final, Literal

from dicom_cloud.dicom import phi
from dicom_cloud.errors import UnsafeNameError, UsageError
from dicom_cloud.localio import check_local_name

__all__ = [
    "DEFAULT_PRESET",
    "HASH_LENGTH",
    "MAX_NAME_BYTES",
    "MAX_SEGMENT_BYTES",
    "ORTHANC_PRESETS",
    "PRESETS",
    "Layout",
    "OrthancContentType",
    "orthanc_object_name",
    "uid_hash",
]

#: Hex digits of :func:`uid_hash` (128 bits).
HASH_LENGTH: Final = 32
#: The longest segment (between slashes) a name may have, in UTF-8 bytes (common file systems' limit).
MAX_SEGMENT_BYTES: Final = 255
#: The longest whole name, in UTF-8 bytes (the S3, GCS and Azure key limit).
MAX_NAME_BYTES: Final = 1024
#: The shortest a value is ever cut to (it then still carries its 8-digit hash suffix).
_MIN_CUT_BYTES: Final = 16
#: The least a key for :func:`uid_hash` may have.
_MIN_KEY_BYTES: Final = 16

#: Layout presets built from DICOM identities.
PRESETS: Mapping[str, str] = MappingProxyType(
    {
        "hashed": "{hash[0:2]}/{hash[2:4]}/{hash}.dcm",
        "uid": "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm",
    }
)
DEFAULT_PRESET: Final = "hashed"
#: Presets named after Orthanc's storage structures; they name attachments (:func:`orthanc_object_name`).
ORTHANC_PRESETS: Final = ("orthanc-flat", "orthanc-legacy")

_SPECIAL = frozenset({"hash", "filename", "ext"})
_UNKNOWN_VALUE = "unknown"
_EXT = re.compile(r"\.[A-Za-z0-9]{1,16}")
_FIELD_BODY = re.compile(r"([A-Za-z][A-Za-z0-9]*)(?:\[(-?\d*):(-?\d*)\])?")
_DOTS = re.compile(r"\.{2,}")
# Unicode categories replaced in values: control, format (bidi overrides...), surrogates,
# private use, unassigned, line and paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def uid_hash(uid: str, key: bytes | None = None) -> str:
    """The 32-hex-digit hash of a UID that the ``hashed`` layout names objects by (module docstring)."""
    data = uid.strip("\x00 ").encode("utf-8")
    if key is None:
        digest = hashlib.sha256(data).hexdigest()
    else:
        digest = hmac.new(key, data, hashlib.sha256).hexdigest()
    return digest[:HASH_LENGTH]


@dataclass(frozen=True)
class _Field:
    name: str
    start: int | None = None
    stop: int | None = None
    sliced: bool = False

    def cut(self, value: str) -> str:
        return value[self.start : self.stop] if self.sliced else value


_Segment = tuple[str | _Field, ...]


@dataclass
class _Piece:
    """One rendered part of a name; ``whole`` is set when the text may be cut to fit."""

    text: str
    whole: str | None = None


class Layout:
    """How instances are named: a template (see the module docstring), checked when built.

    ``key`` makes ``{hash}`` an HMAC (see :func:`uid_hash`); ``allow_phi`` lets the template use
    PHI keywords. Raises :class:`~dicom_cloud.errors.UsageError` for a bad template.
    """

    def __init__(self, template: str, *, key: bytes | None = None, allow_phi: bool = False) -> None:
        if key is not None and len(key) < _MIN_KEY_BYTES:
            raise UsageError(f"the layout key must have at least {_MIN_KEY_BYTES} bytes, not {len(key)}")
        self._template = template
        self._key = key
        self._segments = _parse(template)
        fields = [part for segment in self._segments for part in segment if isinstance(part, _Field)]
        self._fields = list(dict.fromkeys(field.name for field in fields))
        _check_keywords(self._fields)
        phi.check_tags_allowed(self._fields, allow_phi)
        _check_literals(template, self._segments)
        keywords = [name for name in self._fields if name not in _SPECIAL]
        if "hash" in self._fields and "SOPInstanceUID" not in keywords:
            keywords.append("SOPInstanceUID")
        self._keywords = tuple(keywords)

    @classmethod
    def preset(cls, name: str, *, key: bytes | None = None) -> Layout:
        """The layout of preset ``name`` (``hashed`` or ``uid``)."""
        if name in ORTHANC_PRESETS:
            raise UsageError(
                f"the {name!r} layout names Orthanc attachments by uuid, not DICOM files by their tags",
                hint="use it through the Orthanc plugin (orthanc_object_name)",
            )
        try:
            template = PRESETS[name]
        except KeyError:
            known = ", ".join([*PRESETS, *ORTHANC_PRESETS])
            raise UsageError(f"unknown layout {name!r} (known: {known})") from None
        return cls(template, key=key)

    @classmethod
    def from_spec(cls, spec: str, *, key: bytes | None = None, allow_phi: bool = False) -> Layout:
        """A preset by name, or a template when ``spec`` contains a ``{`` (as ``--layout`` takes)."""
        if "{" in spec:
            return cls(spec, key=key, allow_phi=allow_phi)
        return cls.preset(spec, key=key)

    def __repr__(self) -> str:
        return f"Layout({self._template!r}, keyed={self.keyed})"

    @property
    def template(self) -> str:
        return self._template

    @property
    def keywords(self) -> tuple[str, ...]:
        """The DICOM keywords whose values :meth:`name` needs (tell the header reader to read these)."""
        return self._keywords

    @property
    def keyed(self) -> bool:
        """Whether ``{hash}`` is keyed (HMAC) rather than a plain SHA-256."""
        return self._key is not None

    @property
    def leaks_uids(self) -> bool:
        """Whether names carry identifying UIDs in clear (the CLI should warn)."""
        return any(phi.is_identifying_uid(name) for name in self._fields)

    @property
    def phi_keywords(self) -> tuple[str, ...]:
        """The PHI keywords names carry (only possible with ``allow_phi``; the CLI should warn)."""
        return tuple(name for name in self._fields if phi.is_phi(name))

    @property
    def identifies_instance(self) -> bool:
        """Whether two instances always get two names (the SOP Instance UID, or all of its hash, is used).

        A layout without this (say ``{StudyInstanceUID}/{filename}``) can give two files one name,
        and the second upload then replaces or is refused in favour of the first.
        """
        for segment in self._segments:
            for part in segment:
                if not isinstance(part, _Field) or part.sliced:
                    continue
                if part.name in ("hash", "SOPInstanceUID", "MediaStorageSOPInstanceUID"):
                    return True
        return False

    def name(self, values: Mapping[str, str], *, filename: str = "") -> str:
        """The object name of the instance with tag ``values`` read from the file ``filename``.

        Raises :class:`~dicom_cloud.errors.UsageError` when the layout needs the SOP Instance UID
        and ``values`` has none.
        """
        segments = [[self._render(part, values, filename) for part in segment] for segment in self._segments]
        _fit(segments)
        name = "/".join("".join(piece.text for piece in segment) for segment in segments)
        _check_name(name)
        return name

    def _render(self, part: str | _Field, values: Mapping[str, str], filename: str) -> _Piece:
        if isinstance(part, str):
            return _Piece(part)
        if part.name in ("hash", "SOPInstanceUID"):
            uid = values.get("SOPInstanceUID", "").strip("\x00 ")
            if not uid:
                source = f" {filename!r}" if filename else ""
                raise UsageError(
                    f"cannot name the file{source}: it has no SOP Instance UID, which the layout needs",
                    hint="check that it is a DICOM instance, or use a layout that does not need its UID",
                )
            if part.name == "hash":
                return _Piece(part.cut(uid_hash(uid, self._key)))
        if part.name == "ext":
            base = _last_segment(filename)
            ext = base[base.rfind(".") :] if base.rfind(".") > 0 else ""
            return _Piece(ext if _EXT.fullmatch(ext) else "")
        raw = _last_segment(filename) if part.name == "filename" else values.get(part.name, "")
        text = _sanitise(part.cut(raw.strip("\x00 ")))
        return _Piece(text, whole=text)


def _last_segment(filename: str) -> str:
    return filename.replace("\\", "/").rsplit("/", 1)[-1]


def _sanitise(value: str) -> str:
    """``value`` made safe to be part of one segment (module docstring)."""
    value = unicodedata.normalize("NFC", value).strip()
    chars = ["_" if ch in "/\\" or unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch for ch in value]
    value = _DOTS.sub(lambda match: "_" * len(match.group(0)), "".join(chars))
    if value == ".":
        return "_"
    return value or _UNKNOWN_VALUE


def _parse(template: str) -> list[_Segment]:
    """The segments of ``template``, each a run of literal strings and fields."""
    if not template:
        raise UsageError("the layout template is empty")
    segments: list[_Segment] = []
    parts: list[str | _Field] = []
    literal: list[str] = []
    i = 0
    while i < len(template):
        ch = template[i]
        if ch in "{}" and template[i : i + 2] in ("{{", "}}"):
            literal.append(ch)
            i += 2
        elif ch == "{":
            end = template.find("}", i)
            body = template[i + 1 : end] if end >= 0 else ""
            match = _FIELD_BODY.fullmatch(body)
            if end < 0 or match is None:
                shown = template[i : end + 1] if end >= 0 else template[i:]
                raise UsageError(
                    f"bad field {shown!r} in layout template {template!r}",
                    hint="fields are {Keyword} or {Keyword[start:stop]}; write {{ and }} for literal braces",
                )
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_field(match, template))
            i = end + 1
        elif ch == "}":
            raise UsageError(
                f"unmatched '}}' in layout template {template!r}", hint="write }} for a literal brace"
            )
        elif ch == "/":
            if literal:
                parts.append("".join(literal))
                literal = []
            segments.append(tuple(parts))
            parts = []
            i += 1
        else:
            literal.append(ch)
            i += 1
    if literal:
        parts.append("".join(literal))
    segments.append(tuple(parts))
    return segments


def _field(match: re.Match[str], template: str) -> _Field:
    name, start, stop = match.group(1), match.group(2), match.group(3)
    if start is None:
        return _Field(name)
    field = _Field(name, int(start) if start else None, int(stop) if stop else None, sliced=True)
    if name == "ext":
        raise UsageError(f"{{ext}} cannot be sliced (layout template {template!r})")
    if name == "hash" and not field.cut("0" * HASH_LENGTH):
        raise UsageError(f"{match.group(0)!r} selects no digit of the {HASH_LENGTH}-digit hash")
    return field


def _check_keywords(names: list[str]) -> None:
    # pydicom (and numpy with it) loads only when a template is checked, not for every import.
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    unknown = [name for name in names if name not in _SPECIAL and tag_for_keyword(name) is None]
    if unknown:
        known = [*_SPECIAL, *phi.PHI_KEYWORDS, *phi.UID_KEYWORDS, *_COMMON_KEYWORDS]
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            if close:
                hints.append(f"{name} -> {close[0]}?")
        raise UsageError(
            f"unknown keyword{'s' if len(unknown) > 1 else ''} in layout template: {', '.join(unknown)}",
            hint=(("did you mean " + "; ".join(hints) + " ") if hints else "")
            + "(fields are DICOM keywords such as SOPInstanceUID, or hash, filename, ext)",
        )
    sequences = [name for name in names if name not in _SPECIAL and dictionary_VR(name) == "SQ"]
    if sequences:
        raise UsageError(f"sequences cannot name objects: {', '.join(sequences)}")


# Keywords suggested when a template misspells one (beyond the PHI and UID lists).
_COMMON_KEYWORDS = (
    "Modality",
    "SeriesNumber",
    "InstanceNumber",
    "AcquisitionNumber",
    "SOPClassUID",
    "BodyPartExamined",
    "Manufacturer",
)


def _check_literals(template: str, segments: list[_Segment]) -> None:
    """Refuse templates whose fixed text alone makes unsafe or over-long names."""
    rendered = []
    segment_bytes = []
    for segment in segments:
        text = "".join(_placeholder(part) for part in segment)
        rendered.append(text)
        least = 0
        for part in segment:
            if isinstance(part, str):
                least += len(part.encode("utf-8"))
            elif part.name == "hash":
                least += len(part.cut("0" * HASH_LENGTH))
            elif part.name == "ext":
                least += 17
            else:
                least += _MIN_CUT_BYTES
        segment_bytes.append(least)
    try:
        _check_name("/".join(rendered))
    except UnsafeNameError as exc:
        raise UsageError(
            f"layout template {template!r} would make unsafe names ({exc.message})",
            hint="names are relative, '/'-separated, with no empty, '.' or '..' segment",
        ) from None
    if max(segment_bytes) > MAX_SEGMENT_BYTES or sum(segment_bytes) + len(segments) - 1 > MAX_NAME_BYTES:
        raise UsageError(
            f"layout template {template!r} is too long: segments are limited to {MAX_SEGMENT_BYTES} "
            f"bytes and names to {MAX_NAME_BYTES}"
        )


def _placeholder(part: str | _Field) -> str:
    if isinstance(part, str):
        return part
    return "" if part.name == "ext" else "x"


def _fit(segments: list[list[_Piece]]) -> None:
    """Cut the longest cuttable values until every segment and the whole name are within limits."""
    for segment in segments:
        _shrink(segment, _size(segment) - MAX_SEGMENT_BYTES)
    flat = [piece for segment in segments for piece in segment]
    _shrink(flat, _size(flat) + len(segments) - 1 - MAX_NAME_BYTES)


def _shrink(pieces: list[_Piece], excess: int) -> None:
    while excess > 0:
        cuttable = [p for p in pieces if p.whole is not None and len(p.text.encode("utf-8")) > _MIN_CUT_BYTES]
        if not cuttable:  # cannot happen: _check_literals left room for every value at its shortest
            return
        piece = max(cuttable, key=lambda p: len(p.text.encode("utf-8")))
        before = len(piece.text.encode("utf-8"))
        assert piece.whole is not None
        piece.text = _cut(piece.whole, max(_MIN_CUT_BYTES, before - excess))
        excess -= before - len(piece.text.encode("utf-8"))


def _cut(value: str, limit: int) -> str:
    """``value`` cut to at most ``limit`` UTF-8 bytes, ending with ``~`` and 8 digits of its hash."""
    suffix = "~" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:8]
    head = value.encode("utf-8")[: limit - len(suffix)].decode("utf-8", errors="ignore")
    return head + suffix


def _size(pieces: list[_Piece]) -> int:
    return sum(len(piece.text.encode("utf-8")) for piece in pieces)


def _check_name(name: str) -> None:
    """The rules every downloaded name must pass (:func:`~dicom_cloud.localio.check_local_name`),
    plus control characters and length limits."""
    if not name:
        raise UnsafeNameError("object name is empty")
    check_local_name(name)
    for ch in name:
        if unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            raise UnsafeNameError(f"object name contains {ch!r}: {name!r}")
    for segment in name.split("/"):
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise UnsafeNameError(f"object name has a segment over {MAX_SEGMENT_BYTES} bytes: {name!r}")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise UnsafeNameError(f"object name is over {MAX_NAME_BYTES} bytes: {name[:64]!r}...")


# -- Orthanc ---------------------------------------------------------------------------


class OrthancContentType(IntEnum):
    """Orthanc's attachment content types (``OrthancPluginContentType``), as storage callbacks get them."""

    UNKNOWN = 0
    DICOM = 1
    DICOM_AS_JSON = 2
    DICOM_UNTIL_PIXEL_DATA = 3


_ORTHANC_EXTENSIONS: Mapping[int, str] = MappingProxyType(
    {
        OrthancContentType.DICOM: ".dcm",
        OrthancContentType.DICOM_AS_JSON: ".json",
        OrthancContentType.DICOM_UNTIL_PIXEL_DATA: ".dcm.head",
    }
)
_ORTHANC_UUID = re.compile(r"[0-9A-Za-z][0-9A-Za-z-]{3,127}")


def orthanc_object_name(
    uuid: str,
    content_type: int,
    *,
    structure: Literal["flat", "legacy"] = "flat",
    root_path: str = "",
    encrypted: bool = False,
    alternate: bool = False,
) -> str:
    """The object name Orthanc's object-storage plugins (v2.5.4) give an attachment.

    ``flat`` (``StorageStructure`` default): ``RootPath/`` + uuid + extension, where the extension is
    ``.dcm`` (content type 1), ``.json`` (2), ``.dcm.head`` (3) or ``.unk`` (anything else, and type 3
    when ``alternate``: the name older plugin versions used, tried second by
    ``EnableLegacyUnknownFiles``), then ``.enc`` when ``encrypted``. ``legacy``: ``RootPath/aa/bb/uuid``
    with no extension and no ``.enc``, as Orthanc's own file storage. ``RootPath`` is joined as boost
    joins paths: nothing when empty, no second ``/`` when it ends with one.

    Raises :class:`~dicom_cloud.errors.UsageError` for an unknown structure or a ``root_path`` that
    starts with ``/`` (both start-up errors in Orthanc) or has an empty, ``.`` or ``..`` segment (which
    Orthanc accepts but which could not be mirrored to a local directory), and
    :class:`~dicom_cloud.errors.UnsafeNameError` when ``uuid`` is not letters, digits and dashes
    (at least 4).
    """
    if structure not in ("flat", "legacy"):
        raise UsageError(f"unknown Orthanc StorageStructure {structure!r} (expected 'flat' or 'legacy')")
    if not _ORTHANC_UUID.fullmatch(uuid):
        raise UnsafeNameError(f"not an Orthanc attachment uuid: {uuid!r}")
    prefix = _orthanc_root(root_path)
    if structure == "legacy":
        return f"{prefix}{uuid[0:2]}/{uuid[2:4]}/{uuid}"
    if content_type == OrthancContentType.DICOM_UNTIL_PIXEL_DATA and alternate:
        extension = ".unk"
    else:
        extension = _ORTHANC_EXTENSIONS.get(content_type, ".unk")
    return f"{prefix}{uuid}{extension}{'.enc' if encrypted else ''}"


def _orthanc_root(root_path: str) -> str:
    """``root_path`` as a prefix ending with ``/``, or ``""``."""
    if not root_path:
        return ""
    if root_path.startswith("/"):
        raise UsageError(
            f"RootPath must not start with '/': {root_path!r}", hint="write it as a relative prefix"
        )
    root = root_path[:-1] if root_path.endswith("/") else root_path
    try:
        _check_name(root)
    except UnsafeNameError as exc:
        raise UsageError(f"RootPath {root_path!r} is not a safe prefix ({exc.message})") from None
    return root + "/"
