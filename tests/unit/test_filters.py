"""Name globs, files-from lists and DICOM predicates of :class:`dicom_cloud.filters.Filter`."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from dicom_cloud.dicom.header import DicomIdentity
from dicom_cloud.errors import NotFoundError, UsageError
from dicom_cloud.filters import Filter, glob_to_regex, read_files_from

# pattern, name, matches
GLOBS: list[tuple[str, str, bool]] = [
    ("*.dcm", "x.dcm", True),
    ("*.dcm", "a/b/x.dcm", True),  # unanchored: matches at any depth
    ("*.dcm", "x.dcmx", False),
    ("*.dcm", "x.DCM", False),  # case-sensitive by default
    ("/*.dcm", "x.dcm", True),
    ("/*.dcm", "a/x.dcm", False),  # anchored at the root
    ("sub/*", "sub/x", True),
    ("sub/*", "a/sub/x", True),
    ("sub/*", "sub/a/x", False),  # * does not cross /
    ("sub/*", "xsub/x", False),  # a complete path element only
    ("/sub/*", "a/sub/x", False),
    ("sub/**", "sub/a/b/x", True),
    ("sub/", "sub/a/b/x", True),  # trailing / = everything under it
    ("**/x.dcm", "x.dcm", True),  # **/ also matches no directory
    ("**/x.dcm", "a/b/x.dcm", True),
    ("/**/x.dcm", "x.dcm", True),
    ("a/**/x.dcm", "a/x.dcm", True),
    ("a/**/x.dcm", "a/b/c/x.dcm", True),
    ("a/**/x.dcm", "ab/x.dcm", False),
    ("a**", "ab/c", True),  # ** not after / is any run, / included
    ("?.dcm", "1.dcm", True),
    ("?.dcm", "12.dcm", False),
    ("a?b", "a/b", False),
    ("IM[0-9][0-9]", "IM07", True),
    ("IM[0-9][0-9]", "IM7a", False),
    ("IM[!0-9]", "IMa", True),
    ("IM[!0-9]", "IM5", False),
    ("IM[^0-9]", "IMa", True),
    ("a[!x]b", "a/b", False),  # negated class never matches /
    ("a[]]b", "a]b", True),
    ("a[-x]b", "a-b", True),
    ("*.{dcm,DCM}", "s/x.DCM", True),
    ("*.{dcm,DCM}", "s/x.ima", False),
    ("{CT,MR}_*/*", "MR_1/x", True),
    ("{CT,MR}_*/*", "US_1/x", False),
    # regex metacharacters in names are literal
    ("a.b", "axb", False),
    ("a.b", "a.b", True),
    ("f(1)+[[]x].dcm", "f(1)+[x].dcm", True),
    ("$^|.dcm", "$^|.dcm", True),
    ("c++/*", "c++/x", True),
    ("a\\*b", "a*b", True),
    ("a\\*b", "axb", False),
    ("a\\{b,c}", "a{b,c}", True),
    ("no}brace,", "no}brace,", True),
    # Unicode
    ("Ünïcode/*.dcm", "Ünïcode/x.dcm", True),
    ("患者/*", "患者/画像.dcm", True),
    ("*/画像.dcm", "患者/画像.dcm", True),
    ("?.dcm", "é.dcm", True),
    ("café/*", unicodedata.normalize("NFD", "café/x"), True),  # macOS NFD names
    ("name with spaces/*", "name with spaces/a b.dcm", True),
]


@pytest.mark.parametrize(("pattern", "name", "expected"), GLOBS)
def test_glob_table(pattern: str, name: str, expected: bool) -> None:
    assert Filter(include=[pattern]).accepts_name(name) is expected, glob_to_regex(pattern)


def test_ignore_case() -> None:
    assert Filter(include=["*.dcm"], ignore_case=True).accepts_name("a/X.DCM")


def test_globs_compiled_once() -> None:
    f = Filter(include=["*.dcm", "*.ima"], exclude=["tmp/**"])
    assert isinstance(f._include, re.Pattern) and isinstance(f._exclude, re.Pattern)


@pytest.mark.parametrize("bad", ["", "/", "a[bc", "{a,b", "[z-a]"])
def test_bad_patterns(bad: str) -> None:
    with pytest.raises(UsageError):
        Filter(include=[bad])


def test_no_include_takes_everything() -> None:
    f = Filter()
    assert f.accepts_name("anything/at/all") and not f.needs_header


def test_exclude_wins_over_include() -> None:
    f = Filter(include=["*.dcm", "keep/**"], exclude=["*_tmp.dcm", "keep/private/**"])
    assert f.accepts_name("a/x.dcm")
    assert f.accepts_name("keep/notes.txt")
    assert not f.accepts_name("a/x_tmp.dcm")
    assert not f.accepts_name("keep/private/x.dcm")
    assert not f.accepts_name("a/readme.txt")
    assert not Filter(include=["*"], exclude=["*"]).accepts_name("x")


def test_exclude_only() -> None:
    f = Filter(exclude=["*.txt", ".*"])
    assert f.accepts_name("a/b.dcm")
    assert not f.accepts_name("a/b.txt")
    assert not f.accepts_name("a/.DS_Store")


def test_files_from(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_bytes(
        "\ufeff# chosen files\r\n"
        "a/one.dcm\r\n"
        "\r\n"
        "   \n"
        "  # indented comment\n"
        "dir with spaces/two three.dcm  \r\n"
        "/rooted.dcm\n"
        "./dotted.dcm\n"
        "患者/画像.dcm".encode()
    )
    names = read_files_from(listing)
    assert names == {
        "a/one.dcm",
        "dir with spaces/two three.dcm",
        "rooted.dcm",
        "dotted.dcm",
        "患者/画像.dcm",
    }
    f = Filter(files_from=listing)
    assert f.accepts_name("a/one.dcm")
    assert f.accepts_name("dir with spaces/two three.dcm")
    assert f.accepts_name("rooted.dcm")
    assert not f.accepts_name("a/other.dcm")
    assert not f.accepts_name("# chosen files")
    # globs still apply on top of the list
    assert not Filter(exclude=["a/**"], files_from=listing).accepts_name("a/one.dcm")


def test_files_from_empty_takes_nothing(tmp_path: Path) -> None:
    listing = tmp_path / "empty.txt"
    listing.write_text("# nothing\n\n")
    assert not Filter(files_from=listing).accepts_name("x.dcm")


def test_files_from_missing(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        Filter(files_from=tmp_path / "nope.txt")


def ident(**kw: str | None) -> DicomIdentity:
    base: dict[str, str | None] = {
        "sop_instance_uid": "1.2.3.4",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.1",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "modality": "CT",
    }
    base.update(kw)
    return DicomIdentity(**base)  # type: ignore[arg-type]


def test_identity_predicates() -> None:
    assert Filter().accepts_identity(ident())
    f = Filter(modality=["ct", "Mr "])
    assert f.needs_header
    assert f.accepts_identity(ident(modality="CT"))
    assert f.accepts_identity(ident(modality="mr"))
    assert not f.accepts_identity(ident(modality="US"))
    assert not f.accepts_identity(ident(modality=None))

    assert Filter(study_uid=["1.2.3"]).accepts_identity(ident())
    assert not Filter(study_uid=["1.2.30"]).accepts_identity(ident())
    assert not Filter(study_uid=["1.2.3"]).accepts_identity(ident(study_instance_uid=None))
    assert Filter(series_uid=["9", "1.2.3.1"]).accepts_identity(ident())
    assert not Filter(series_uid=["9"]).accepts_identity(ident())
    assert Filter(sop_class=["1.2.840.10008.5.1.4.1.1.2"]).accepts_identity(ident())
    assert not Filter(sop_class=["1.2.840.10008.5.1.4.1.1.4"]).accepts_identity(ident())
    # UIDs are exact, not case-folded or prefix-matched
    assert not Filter(series_uid=["1.2.3"]).accepts_identity(ident())


def test_predicates_combine_with_and() -> None:
    f = Filter(modality=["CT"], study_uid=["1.2.3"])
    assert f.accepts_identity(ident())
    assert not f.accepts_identity(ident(modality="MR"))
    assert not f.accepts_identity(ident(study_instance_uid="9"))
