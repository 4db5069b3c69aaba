"""Which files or objects a transfer takes: name globs, a files-from list, DICOM predicates.

Two stages, so that nothing is read that is going to be left out anyway:

1. :meth:`Filter.accepts_name` looks only at the relative name (``/``-separated, as listed),
   before any byte is read.
2. :meth:`Filter.accepts_identity` looks at the :class:`~dicom_cloud.dicom.header.DicomIdentity`
   read from the header; callers skip the header read when :attr:`Filter.needs_header` is false.

Glob patterns (rclone semantics, compiled once into one regular expression per list):

``*``
    any run of characters except ``/``.
``**``
    any run of characters including ``/``; ``**/`` also matches no directory at all, so
    ``**/x.dcm`` matches ``x.dcm`` as well as ``a/b/x.dcm``.
``?``
    one character except ``/``.
``[abc]``, ``[a-z]``, ``[!abc]`` (or ``[^abc]``)
    one character from, or not from, the class; a negated class never matches ``/``.
``{a,b}``
    either alternative (alternatives may hold globs themselves).
``\\x``
    the character ``x`` literally (``\\*`` is a star). Every other character, including
    regular-expression metacharacters such as ``.``, ``+``, ``(``, ``$``, is literal.

A pattern starting with ``/`` is anchored at the root of the transfer; any other pattern
matches a complete trailing part of the name, at any depth (``*.dcm`` matches ``a/b/x.dcm``;
``sub/*`` matches ``sub/x`` and ``a/sub/x`` but not ``sub/a/x``). A pattern ending in ``/``
matches everything under such a directory. Names and patterns are compared in Unicode NFC,
so a name listed from macOS (NFD) matches a pattern typed in NFC; matching is case-sensitive
unless ``ignore_case`` is set.

Decision: a name passes when it matches an include pattern (or there are none), matches no
exclude pattern (excludes win), and is listed in ``files_from`` when that is given.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import NotFoundError, UsageError

if TYPE_CHECKING:
    from .dicom.header import DicomIdentity

__all__ = ["Filter", "glob_to_regex", "read_files_from"]


def _nfc(text: str) -> str:
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def glob_to_regex(pattern: str) -> str:
    """The regular expression (for ``re.fullmatch``) equivalent to one glob pattern.

    Raises :class:`UsageError` for an empty pattern or an unclosed ``[`` or ``{``.
    """
    if not pattern or pattern == "/":
        raise UsageError("empty filter pattern", hint="give a glob such as '*.dcm' or 'series1/**'")
    text = _nfc(pattern)
    anchored = text.startswith("/")
    if anchored:
        text = text[1:]
    if text.endswith("/"):
        text += "**"
    out: list[str] = []
    depth = 0  # of {...}
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 < n:
                i += 1
            out.append(re.escape(text[i]))
        elif c == "*":
            if i + 1 < n and text[i + 1] == "*":
                i += 1
                if i + 1 < n and text[i + 1] == "/" and (i == 1 or text[i - 2] in "/{,"):
                    i += 1
                    out.append("(?:.*/)?")
                else:
                    out.append(".*")
            else:
                out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            i = _char_class(text, i, out, pattern)
        elif c == "{":
            depth += 1
            out.append("(?:")
        elif c == "," and depth:
            out.append("|")
        elif c == "}" and depth:
            depth -= 1
            out.append(")")
        else:
            out.append(re.escape(c))
        i += 1
    if depth:
        raise UsageError(f"filter pattern '{pattern}' has an unclosed '{{'", hint="close it with '}'")
    body = "".join(out)
    return body if anchored else f"(?:.*/)?{body}"


def _char_class(text: str, start: int, out: list[str], pattern: str) -> int:
    """Translate the class starting at ``text[start] == '['``; return the index of its ``]``."""
    j = start + 1
    negate = j < len(text) and text[j] in "!^"
    if negate:
        j += 1
    members: list[str] = []
    first = True
    while j < len(text) and (text[j] != "]" or first):
        c = text[j]
        if c == "\\" and j + 1 < len(text):
            j += 1
            members.append(re.escape(text[j]))
        else:
            members.append("-" if c == "-" else re.escape(c))
        first = False
        j += 1
    if j >= len(text):
        raise UsageError(
            f"filter pattern '{pattern}' has an unclosed '['", hint="close it with ']' or write '\\[' for '['"
        )
    body = "".join(members)
    out.append(f"[^/{body}]" if negate else f"(?!/)[{body}]")
    return j


def _compile(patterns: Iterable[str], ignore_case: bool) -> re.Pattern[str] | None:
    parts = [glob_to_regex(p) for p in patterns]
    if not parts:
        return None
    flags = re.IGNORECASE if ignore_case else 0
    try:
        return re.compile("|".join(f"(?:{p})" for p in parts), flags | re.DOTALL)
    except re.error as exc:  # e.g. a reversed range [z-a]
        raise UsageError(
            f"invalid filter pattern: {exc}", hint="check character ranges such as [a-z]"
        ) from exc


def read_files_from(path: Path) -> frozenset[str]:
    """The relative names listed in a files-from file.

    One name a line (UTF-8, an optional BOM, ``\\n`` or ``\\r\\n``); blank lines and lines
    whose first non-blank character is ``#`` are ignored; surrounding whitespace and a
    leading ``/`` or ``./`` are removed, so names may contain inner spaces.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise NotFoundError(f"files-from list {path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"files-from list {path} is not UTF-8 text") from exc
    names: set[str] = set()
    for line in text.splitlines():
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name.startswith("./"):
            name = name[2:]
        names.add(_nfc(name.lstrip("/")))
    return frozenset(names)


def _upper_set(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v.strip().upper() for v in values)


def _strip_set(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v.strip() for v in values)


class Filter:
    """Which names and which DICOM instances a transfer takes. Immutable once built.

    Each DICOM predicate is a set of accepted values (empty: no condition); an instance whose
    header lacks the element is rejected by a predicate on it. ``modality`` is compared
    case-insensitively, UIDs exactly (surrounding spaces ignored).
    """

    __slots__ = (
        "_exclude",
        "_files",
        "_include",
        "_modality",
        "_series",
        "_sop_class",
        "_study",
    )

    def __init__(
        self,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
        *,
        files_from: Path | None = None,
        modality: Iterable[str] = (),
        study_uid: Iterable[str] = (),
        series_uid: Iterable[str] = (),
        sop_class: Iterable[str] = (),
        ignore_case: bool = False,
    ) -> None:
        self._include = _compile(include, ignore_case)
        self._exclude = _compile(exclude, ignore_case)
        self._files = read_files_from(files_from) if files_from is not None else None
        self._modality = _upper_set(modality)
        self._study = _strip_set(study_uid)
        self._series = _strip_set(series_uid)
        self._sop_class = _strip_set(sop_class)

    @property
    def needs_header(self) -> bool:
        """Whether :meth:`accepts_identity` can reject anything, i.e. the header must be read."""
        return bool(self._modality or self._study or self._series or self._sop_class)

    def accepts_name(self, relative: str) -> bool:
        """Whether the relative name (``/``-separated) passes the globs and the files-from list."""
        name = _nfc(relative)
        if self._files is not None and name.lstrip("/") not in self._files:
            return False
        if self._include is not None and self._include.fullmatch(name) is None:
            return False
        return self._exclude is None or self._exclude.fullmatch(name) is None

    def accepts_identity(self, identity: DicomIdentity) -> bool:
        """Whether the instance read from a header passes every DICOM predicate."""
        return (
            _passes(self._modality, identity.modality, upper=True)
            and _passes(self._study, identity.study_instance_uid)
            and _passes(self._series, identity.series_instance_uid)
            and _passes(self._sop_class, identity.sop_class_uid)
        )


def _passes(accepted: frozenset[str], value: str | None, *, upper: bool = False) -> bool:
    if not accepted:
        return True
    if value is None:
        return False
    value = value.strip()
    return (value.upper() if upper else value) in accepted
