"""Names that cannot be written faithfully: keys past the providers' length limit or holding control
characters, and Unicode spellings that two file systems, or the NFC rule of uploads, would fold into one name.

Uploads name objects by the NFC form of local names (macOS writes NFD, Linux keeps what it is
given), so the same study uploaded from either lands on the same keys. Two local files whose names
differ only in normalisation would then be one object, the second overwriting the first: the one not
spelled in NFC is refused instead, and the NFC-spelled one (if any) is uploaded. Downloads write
keys byte for byte; on a file system that folds normalisation (APFS, HFS+), a key that would
replace a file already there under another spelling is refused. The rules in full: docs/reliability.md.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from .errors import UnsafeNameError

#: The longest object name S3, GCS and Azure accept, in UTF-8 bytes.
MAX_KEY_BYTES = 1024


#: Control characters (C0 and DEL) by their usual escapes; the others are shown as \\xNN.
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(name: str) -> str:
    """``name`` with its control characters escaped (``\\n``, ``\\x1b``): one line, nothing a
    terminal would act on."""
    if name.isprintable():
        return name
    return "".join(
        _ESCAPES.get(char, f"\\x{ord(char):02x}") if char < " " or char == "\x7f" else char for char in name
    )


def check_object_key(key: str, where: str) -> None:
    """Refuse a key that no object store would accept faithfully, before any request is made."""
    controls = sorted({char for char in key if char < " " or char == "\x7f"})
    if controls:
        # GCS refuses CR and LF, S3's XML listings and the S3/Azure client cannot carry them, and
        # in a listing, a log or a terminal they would forge lines.
        shown = ", ".join(printable(char) for char in controls)
        raise UnsafeNameError(
            f"{printable(where)}: object name contains a control character ({shown})",
            hint="rename the file: object names cannot hold line breaks or other control characters",
        )
    size = len(key.encode("utf-8", "surrogateescape"))
    if size > MAX_KEY_BYTES:
        raise UnsafeNameError(
            f"{printable(where)}: object name is {size} bytes long; "
            f"object stores accept at most {MAX_KEY_BYTES}",
            hint="shorten the directory names of the source, or upload from deeper in the tree",
        )


def nfc_twin(root: str, relative: str) -> str | None:
    """For an upload of ``root/relative``: another local name that has the same NFC form, if any.

    Only names not already in NFC are examined (one directory listing per such segment), so the
    usual case costs a normalisation check and nothing else.
    """
    if unicodedata.is_normalized("NFC", relative):
        return None
    directory = Path(root)
    for segment in relative.split("/"):
        if not unicodedata.is_normalized("NFC", segment):
            twin = _same_once_folded(directory, segment)
            if twin is not None:
                return str(twin)
        directory = directory / segment
    return None


def other_spelling_on_disk(path: str) -> str | None:
    """For a download to ``path``: the name of an existing file the file system considers the same
    as ``path`` although spelled differently (normalisation-insensitive file systems), if any."""
    target = Path(path)
    name = target.name
    if unicodedata.is_normalized("NFC", name) and unicodedata.is_normalized("NFD", name):
        return None  # nothing to fold (ASCII names, most of them)
    if not (target.exists() or target.is_symlink()):
        return None
    if (target.parent / name).exists() and name in {entry.name for entry in target.parent.iterdir()}:
        return None  # this very spelling is there: an ordinary overwrite
    twin = _same_once_folded(target.parent, name)
    return str(twin) if twin is not None else None


def _same_once_folded(directory: Path, name: str) -> Path | None:
    """An entry of ``directory`` spelled otherwise than ``name`` but equal to it in NFC."""
    folded = unicodedata.normalize("NFC", name)
    try:
        entries = [entry.name for entry in directory.iterdir()]
    except OSError:
        return None
    for entry in entries:
        if entry != name and unicodedata.normalize("NFC", entry) == folded:
            return directory / entry
    return None
