"""Object names from DICOM identities (layouts) and Orthanc's attachment names."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from dicom_cloud.dicom.layout import (
    DEFAULT_PRESET,
    MAX_NAME_BYTES,
    MAX_SEGMENT_BYTES,
    ORTHANC_PRESETS,
    PRESETS,
    Layout,
    OrthancContentType,
    orthanc_object_name,
    uid_hash,
)
from dicom_cloud.errors import UnsafeNameError, UsageError
from dicom_cloud.transfer import check_local_name

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.1.2"
SOP = "1.2.840.10008.1.2"
VALUES = {"StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES, "SOPInstanceUID": SOP, "Modality": "CT"}
KEY = b"0123456789abcdef"
UUID = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"


def checked(name: str) -> str:
    """``name`` after asserting it is safe under a local directory and within the limits."""
    check_local_name(name)
    assert len(name.encode("utf-8")) <= MAX_NAME_BYTES
    assert all(len(segment.encode("utf-8")) <= MAX_SEGMENT_BYTES for segment in name.split("/"))
    return name


# -- the hash ----------------------------------------------------------------------------


def test_uid_hash_test_vectors() -> None:
    # The spec in the module docstring: SHA-256 or HMAC-SHA-256 of the UID, 32 hex digits.
    assert uid_hash(SOP) == "7670866148e0b82a91380d6053ef7a14"
    assert uid_hash(SOP, KEY) == "de570354d7ec5a49bcb35150892cf6fa"
    assert uid_hash(SOP) == hashlib.sha256(SOP.encode()).hexdigest()[:32]
    assert uid_hash(SOP, KEY) == hmac.new(KEY, SOP.encode(), "sha256").hexdigest()[:32]


def test_uid_hash_ignores_dicom_padding() -> None:
    assert uid_hash(SOP + "\x00") == uid_hash(SOP) == uid_hash(f" {SOP} ")


# -- presets -----------------------------------------------------------------------------


def test_hashed_preset_is_the_default_and_leaks_nothing() -> None:
    assert DEFAULT_PRESET == "hashed"
    layout = Layout.preset("hashed")
    digest = uid_hash(SOP)
    assert checked(layout.name(VALUES)) == f"{digest[:2]}/{digest[2:4]}/{digest}.dcm"
    assert layout.keywords == ("SOPInstanceUID",)
    assert not layout.leaks_uids
    assert not layout.keyed
    assert layout.identifies_instance
    assert layout.phi_keywords == ()


def test_hashed_is_deterministic_and_depends_on_the_key() -> None:
    plain = Layout.preset("hashed")
    assert plain.name(VALUES) == plain.name(dict(VALUES)) == Layout.preset("hashed").name(VALUES)
    keyed = Layout.preset("hashed", key=KEY)
    other = Layout.preset("hashed", key=b"another key of 16+ bytes")
    assert keyed.keyed
    assert keyed.name(VALUES) == Layout.preset("hashed", key=KEY).name(VALUES)
    names = {plain.name(VALUES), keyed.name(VALUES), other.name(VALUES)}
    assert len(names) == 3
    assert uid_hash(SOP, KEY) in keyed.name(VALUES)
    assert plain.name(VALUES) != plain.name({**VALUES, "SOPInstanceUID": SOP + ".1"})


def test_hashed_needs_a_sop_instance_uid() -> None:
    with pytest.raises(UsageError, match="no SOP Instance UID"):
        Layout.preset("hashed").name({"Modality": "CT"}, filename="a.dcm")
    with pytest.raises(UsageError):
        Layout.preset("hashed").name({"SOPInstanceUID": " \x00"})


def test_short_keys_are_refused() -> None:
    with pytest.raises(UsageError, match="at least 16 bytes"):
        Layout.preset("hashed", key=b"short")


def test_uid_preset() -> None:
    layout = Layout.preset("uid")
    assert checked(layout.name(VALUES)) == f"{STUDY}/{SERIES}/{SOP}.dcm"
    assert layout.keywords == ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    assert layout.leaks_uids
    assert layout.identifies_instance


def test_uid_preset_strips_dicom_padding_and_needs_the_sop_uid() -> None:
    padded = {k: v + "\x00" for k, v in VALUES.items()}
    assert Layout.preset("uid").name(padded) == f"{STUDY}/{SERIES}/{SOP}.dcm"
    with pytest.raises(UsageError, match="no SOP Instance UID"):
        Layout.preset("uid").name({"StudyInstanceUID": STUDY})
    # Other missing values become "unknown".
    assert Layout.preset("uid").name({"SOPInstanceUID": SOP}) == f"unknown/unknown/{SOP}.dcm"


def test_presets_table_and_unknown_preset() -> None:
    assert set(PRESETS) == {"hashed", "uid"}
    with pytest.raises(UsageError, match="unknown layout 'nope'") as caught:
        Layout.preset("nope")
    assert "orthanc-flat" in str(caught.value)


@pytest.mark.parametrize("name", ORTHANC_PRESETS)
def test_orthanc_presets_point_to_orthanc_object_name(name: str) -> None:
    with pytest.raises(UsageError, match="uuid"):
        Layout.preset(name)
    with pytest.raises(UsageError):
        Layout.from_spec(name)


def test_from_spec_takes_a_preset_or_a_template() -> None:
    assert Layout.from_spec("uid").template == PRESETS["uid"]
    assert Layout.from_spec("{Modality}/{hash}.dcm").name(VALUES) == f"CT/{uid_hash(SOP)}.dcm"
    with pytest.raises(UsageError):
        Layout.from_spec("{PatientName}/{hash}")
    assert Layout.from_spec("{PatientName}/{hash}", allow_phi=True).phi_keywords == ("PatientName",)


# -- templates -----------------------------------------------------------------------------


def test_template_fields_filename_ext_and_slices() -> None:
    layout = Layout("{Modality}/{SeriesNumber}/{hash[0:8]}/{filename}")
    assert layout.keywords == ("Modality", "SeriesNumber", "SOPInstanceUID")
    name = layout.name({**VALUES, "SeriesNumber": "3"}, filename="/data/in/IM0001.DCM")
    assert checked(name) == f"CT/3/{uid_hash(SOP)[:8]}/IM0001.DCM"
    assert Layout("{SOPInstanceUID}{ext}").name(VALUES, filename="x/y.dcm") == f"{SOP}.dcm"
    assert Layout("{SOPInstanceUID}{ext}").name(VALUES, filename="IM0001") == SOP
    assert Layout("{SOPInstanceUID}{ext}").name(VALUES, filename=".hidden") == SOP
    assert Layout("{SOPInstanceUID}{ext}").name(VALUES, filename="a.b/c") == SOP
    assert Layout("{SOPInstanceUID}{ext}").name(VALUES, filename="a.x y") == SOP
    assert Layout("{Modality[0:1]}/{hash[-4:]}").name(VALUES) == f"C/{uid_hash(SOP)[-4:]}"
    assert Layout("{Modality}/{filename}").name(VALUES) == "CT/unknown"
    assert Layout("{Modality}/{filename}").name(VALUES, filename="C:\\dicom\\IM1") == "CT/IM1"


def test_literal_braces() -> None:
    assert Layout("{{x}}/{hash}").name(VALUES) == "{x}/" + uid_hash(SOP)
    assert Layout("{{x}}/{hash}").keywords == ("SOPInstanceUID",)


def test_identifies_instance() -> None:
    assert not Layout("{StudyInstanceUID}/{filename}").identifies_instance
    assert not Layout("{hash[0:8]}").identifies_instance
    assert Layout("{Modality}/{SOPInstanceUID}").identifies_instance


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("{PatientNam}/{hash}", "PatientNam"),
        ("{Foo}/{Bar}/{hash}", "Foo, Bar"),
        ("{sopinstanceuid}", "sopinstanceuid"),
    ],
)
def test_unknown_keywords_are_named(template: str, fragment: str) -> None:
    with pytest.raises(UsageError, match="unknown keyword") as caught:
        Layout(template)
    assert fragment in str(caught.value)


def test_unknown_keyword_suggests_the_close_one() -> None:
    with pytest.raises(UsageError) as caught:
        Layout("{SOPInstanceUid}")
    assert caught.value.hint is not None and "SOPInstanceUID" in caught.value.hint


@pytest.mark.parametrize(
    "template",
    [
        "",
        "{",
        "a/{hash",
        "a}b",
        "{hash[1]}",
        "{hash[a:b]}",
        "{1abc}",
        "{hash[40:]}",
        "{ext[0:1]}",
        "{ReferencedImageSequence}/{hash}",
        "/{hash}",
        "{hash}/",
        "a//{hash}",
        "../{hash}",
        "./{hash}",
        "{hash}/..",
        "a\\b/{hash}",
        "a\x00/{hash}",
        "a\nb/{hash}",
        "{ext}/{hash}",
        "x" * 256 + "/{hash}",
        "/".join(["x" * 200] * 6) + "/{hash}",
    ],
)
def test_bad_templates_are_refused_at_construction(template: str) -> None:
    with pytest.raises(UsageError):
        Layout(template)


# -- PHI -------------------------------------------------------------------------------------


def test_phi_is_refused_unless_allowed() -> None:
    with pytest.raises(UsageError) as caught:
        Layout("{PatientID}/{AccessionNumber}/{hash}.dcm")
    assert "AccessionNumber, PatientID" in str(caught.value)
    assert "pass --allow-phi to store them anyway" in str(caught.value)
    layout = Layout("{PatientID}/{AccessionNumber}/{hash}.dcm", allow_phi=True)
    assert layout.phi_keywords == ("PatientID", "AccessionNumber")
    assert not layout.leaks_uids
    name = layout.name({**VALUES, "PatientID": "P1", "AccessionNumber": "A/2"})
    assert checked(name) == f"P1/A_2/{uid_hash(SOP)}.dcm"


def test_phi_is_refused_even_sliced() -> None:
    with pytest.raises(UsageError, match="PatientName"):
        Layout("{PatientName[0:1]}/{hash}")


def test_uids_are_allowed_but_flagged() -> None:
    layout = Layout("{StudyInstanceUID}/{hash}.dcm")
    assert layout.leaks_uids
    assert layout.phi_keywords == ()


# -- sanitisation -------------------------------------------------------------------------------

HOSTILE = [
    "../",
    "..",
    ".",
    "../../etc/passwd",
    "/etc/passwd",
    "a\x00b",
    "a\\..\\b",
    "\x00",
    "   ",
    "",
    "tab\there\nnewline\r\x7f\x1b[31m",
    "\u202egnp.exe",
    "\ud800lone surrogate",
    "a/./b",
    "....",
    "x" * 5000,
    "é" * 2000,
    "日本語" * 400,
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_make_safe_names(value: str) -> None:
    layout = Layout("{Modality}/{SeriesNumber}/{SOPInstanceUID}{ext}")
    values = {"Modality": value, "SeriesNumber": value, "SOPInstanceUID": SOP + value}
    name = checked(layout.name(values, filename=value))
    assert name.count("/") == 2
    assert ".." not in name and "\\" not in name and "\x00" not in name
    assert all(segment not in ("", ".", "..") for segment in name.split("/"))
    checked(Layout("{Modality}/{filename}").name({"Modality": value}, filename=value))


def test_sanitised_values() -> None:
    layout = Layout("{Modality}/{hash}")
    digest = uid_hash(SOP)
    assert layout.name({**VALUES, "Modality": "../"}) == f"___/{digest}"
    assert layout.name({**VALUES, "Modality": "/etc/passwd"}) == f"_etc_passwd/{digest}"
    assert layout.name({**VALUES, "Modality": "a\x00b"}) == f"a_b/{digest}"
    assert layout.name({**VALUES, "Modality": "."}) == f"_/{digest}"
    assert layout.name({**VALUES, "Modality": ""}) == f"unknown/{digest}"
    assert layout.name({**VALUES, "Modality": " CT \x00"}) == f"CT/{digest}"
    assert layout.name({**VALUES, "Modality": "MR\\CT"}) == f"MR_CT/{digest}"
    assert layout.name({**VALUES, "Modality": "a\u202eb"}) == f"a_b/{digest}"
    assert layout.name({**VALUES, "Modality": "1.2"}) == f"1.2/{digest}"
    assert layout.name({**VALUES, "Modality": "e\u0301"}) == f"\u00e9/{digest}"  # NFC


def test_long_values_are_cut_with_a_hash_to_stay_distinct() -> None:
    layout = Layout("{Modality}/{hash}.dcm")
    first = checked(layout.name({**VALUES, "Modality": "x" * 300 + "a"}))
    second = checked(layout.name({**VALUES, "Modality": "x" * 300 + "b"}))
    assert first != second
    segment = first.split("/")[0]
    assert len(segment.encode()) == MAX_SEGMENT_BYTES
    assert segment.startswith("x" * 200)
    assert segment[-9] == "~"
    assert first.endswith(f"/{uid_hash(SOP)}.dcm")  # fixed parts are never cut


def test_multibyte_values_are_cut_on_character_boundaries() -> None:
    name = checked(Layout("{Modality}.dcm").name({"Modality": "é" * 300}))
    assert name.endswith(".dcm")
    assert len(name.encode()) <= MAX_SEGMENT_BYTES
    name.encode("utf-8")  # no broken characters


def test_whole_names_are_kept_under_1024_bytes() -> None:
    layout = Layout("{Modality}/{SeriesNumber}/{InstanceNumber}/{BodyPartExamined}/{Manufacturer}/{hash}")
    values = {k: k[0] * 1000 for k in ("Modality", "SeriesNumber", "InstanceNumber", "BodyPartExamined")}
    values |= {"Manufacturer": "m" * 1000, "SOPInstanceUID": SOP}
    name = checked(layout.name(values))
    assert len(name.encode()) <= MAX_NAME_BYTES
    assert name.endswith("/" + uid_hash(SOP))
    assert name.count("/") == 5


# -- Orthanc -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (1, f"{UUID}.dcm"),
        (2, f"{UUID}.json"),
        (3, f"{UUID}.dcm.head"),
        (0, f"{UUID}.unk"),
        (4, f"{UUID}.unk"),
        (OrthancContentType.DICOM, f"{UUID}.dcm"),
    ],
)
def test_orthanc_flat_names(content_type: int, expected: str) -> None:
    assert checked(orthanc_object_name(UUID, content_type, structure="flat")) == expected
    assert orthanc_object_name(UUID, content_type) == expected  # flat is the default
    assert orthanc_object_name(UUID, content_type, encrypted=True) == expected + ".enc"


def test_orthanc_flat_alternate_name_of_headers() -> None:
    assert orthanc_object_name(UUID, 3, alternate=True) == f"{UUID}.unk"
    assert orthanc_object_name(UUID, 3, alternate=True, encrypted=True) == f"{UUID}.unk.enc"
    assert orthanc_object_name(UUID, 1, alternate=True) == f"{UUID}.dcm"


@pytest.mark.parametrize("content_type", [0, 1, 2, 3])
def test_orthanc_legacy_names_have_no_extension_and_no_enc(content_type: int) -> None:
    expected = f"0a/1b/{UUID}"
    assert checked(orthanc_object_name(UUID, content_type, structure="legacy")) == expected
    assert orthanc_object_name(UUID, content_type, structure="legacy", encrypted=True) == expected


@pytest.mark.parametrize(
    ("root_path", "prefix"),
    [("", ""), ("orthanc", "orthanc/"), ("orthanc/", "orthanc/"), ("a/b", "a/b/"), ("a/b/", "a/b/")],
)
def test_orthanc_root_path(root_path: str, prefix: str) -> None:
    flat = orthanc_object_name(UUID, 1, root_path=root_path, encrypted=True)
    assert checked(flat) == f"{prefix}{UUID}.dcm.enc"
    legacy = orthanc_object_name(UUID, 2, structure="legacy", root_path=root_path)
    assert checked(legacy) == f"{prefix}0a/1b/{UUID}"


@pytest.mark.parametrize("root_path", ["/orthanc", "/", "a//b", "../x", "a/./b", "a\\b", "a\x00"])
def test_orthanc_bad_root_paths(root_path: str) -> None:
    with pytest.raises(UsageError):
        orthanc_object_name(UUID, 1, root_path=root_path)


def test_orthanc_leading_slash_message() -> None:
    with pytest.raises(UsageError, match="must not start with '/'"):
        orthanc_object_name(UUID, 1, root_path="/data")


@pytest.mark.parametrize("uuid", ["", "abc", "../../etc/passwd", "a/b-c-d", "x\x00yyyy", ".abcd", "-abc"])
def test_orthanc_bad_uuids(uuid: str) -> None:
    with pytest.raises(UnsafeNameError):
        orthanc_object_name(uuid, 1)


def test_orthanc_unknown_structure() -> None:
    with pytest.raises(UsageError, match="StorageStructure"):
        orthanc_object_name(UUID, 1, structure="nested")  # type: ignore[arg-type]
