"""The header-only identity reader, on the real files pydicom ships and on non-DICOM input.

Each corrupt input runs in both policies (the pydicom way): the expected identity or the
expected DicomFormatError reason for lenient and for strict.
"""

from __future__ import annotations

import asyncio
import random
import struct
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_cloud.backends import open_store
from dicom_cloud.dicom import header as h
from dicom_cloud.dicom.header import DicomFormatError, DicomIdentity, read_identity
from dicom_cloud.errors import DicomCloudError, NotFoundError, UsageError
from dicom_cloud.store import Store

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MR_SOP = "1.3.6.1.4.1.5962.1.1.4.1.1.20040826185059.5457"
MR_STUDY = "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457"
POLICIES: tuple[h.Policy, ...] = ("lenient", "strict")


def data(name: str) -> bytes:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path).read_bytes()


def outcome(raw: bytes, policy: h.Policy, **kw: Any) -> DicomIdentity | str:
    """The identity, or the reason of the DicomFormatError."""
    try:
        return read_identity(raw, policy=policy, **kw)
    except DicomFormatError as exc:
        return exc.reason


# --- a real CT, field by field --------------------------------------------------------------


def test_ct_small_identity_matches_a_full_pydicom_read() -> None:
    ds = pydicom.dcmread(BytesIO(data("CT_small.dcm")))
    for policy in POLICIES:
        ident = read_identity(data("CT_small.dcm"), policy=policy)
        assert ident == DicomIdentity(
            sop_instance_uid=ds.SOPInstanceUID,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=ds.StudyInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            modality="CT",
            study_date="20040119",
            patient_id="1CT1",
            accession_number=None,  # present but empty
            series_number=1,
            instance_number=1,
        )


# --- the shipped files, both policies -------------------------------------------------------

MR = ("MR", MR_SOP)
NM = ("NM", "1.3.6.1.4.1.5962.1.1.8.1.3.20040826185059.5457")
RTPLAN = ("RTPLAN", "1.2.333.4444.5.6.7.8")
# name -> (transfer syntax or None, (modality, sop) or None, lenient, strict);
# "ok" means the identity is read; otherwise the expected reason.
CASES: dict[str, tuple[str | None, tuple[str, str] | None, str, str]] = {
    "MR_small.dcm": ("1.2.840.10008.1.2.1", MR, "ok", "ok"),
    "MR_small_bigendian.dcm": ("1.2.840.10008.1.2.2", MR, "ok", "ok"),
    "MR_small_implicit.dcm": ("1.2.840.10008.1.2", MR, "ok", "ok"),
    "MR_small_padded.dcm": ("1.2.840.10008.1.2.1", MR, "ok", "ok"),
    # Truncated in the pixel data: the header is whole, so both policies read it.
    "MR_truncated.dcm": ("1.2.840.10008.1.2.1", MR, "ok", "ok"),
    "MR_small_RLE.dcm": ("1.2.840.10008.1.2.5", MR, "ok", "ok"),
    "MR_small_jpeg_ls_lossless.dcm": ("1.2.840.10008.1.2.4.80", MR, "ok", "ok"),
    "MR_small_jp2klossless.dcm": ("1.2.840.10008.1.2.4.90", MR, "ok", "ok"),
    "JPEG2000.dcm": ("1.2.840.10008.1.2.4.91", NM, "ok", "ok"),
    "JPEG-lossy.dcm": ("1.2.840.10008.1.2.4.51", None, "ok", "ok"),
    "SC_rgb_rle.dcm": ("1.2.840.10008.1.2.5", None, "ok", "ok"),
    "image_dfl.dcm": ("1.2.840.10008.1.2.1.99", None, "ok", "ok"),  # deflated: read whole
    "test-SR.dcm": ("1.2.840.10008.1.2.1", None, "ok", "ok"),  # no pixel data
    # No preamble, no file meta: lenient reads it (syntax inferred), strict refuses.
    "ExplVR_LitEndNoMeta.dcm": (
        "1.2.840.10008.1.2.1",
        ("RTPLAN", "1.2.333.4444.5.6.7.8"),
        "ok",
        h.REASON_NO_DICM,
    ),
    "ExplVR_BigEndNoMeta.dcm": (
        "1.2.840.10008.1.2.2",
        ("RTPLAN", "1.2.333.4444.5.6.7.8"),
        "ok",
        h.REASON_NO_DICM,
    ),
    # File meta but no preamble.
    "rtstruct.dcm": ("1.2.840.10008.1.2", None, "ok", h.REASON_NO_DICM),
    # A stray byte before the dataset and no meta: garbage either way.
    "no_meta.dcm": (None, None, h.REASON_NO_DICM, h.REASON_NO_DICM),
    # Bad VRs are read; their file meta names another SOP Instance UID than their dataset: read
    # under the dataset's UID, the mismatch reported (META_MISMATCH).
    "badVR.dcm": ("1.2.840.10008.1.2.1", None, "ok", "ok"),
    "rtplan.dcm": ("1.2.840.10008.1.2", ("RTPLAN", "1.2.777.777.77.7.7777.7777.20030903150023"), "ok", "ok"),
    "rtdose.dcm": ("1.2.840.10008.1.2", None, "ok", "ok"),
    # Valid Part 10 without a Study Instance UID.
    "JPEGLSNearLossless_08.dcm": ("1.2.840.10008.1.2.4.81", None, "ok", h.REASON_NO_STUDY),
    # Fragments: no SOP Instance UID in dataset or meta.
    "nested_priv_SQ.dcm": (None, None, h.REASON_NO_SOP_INSTANCE, h.REASON_NO_SOP_INSTANCE),
    "meta_missing_tsyntax.dcm": (None, None, h.REASON_NO_SOP_INSTANCE, h.REASON_NO_SOP_INSTANCE),
    # Ends inside group 0008: reported as a header cut short.
    "no_meta_group_length.dcm": (None, None, h.REASON_TRUNCATED, h.REASON_TRUNCATED),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("policy", ["lenient", "strict"])
def test_shipped_file(name: str, policy: h.Policy) -> None:
    syntax, expected_ids, lenient, strict = CASES[name]
    expected = lenient if policy == "lenient" else strict
    got = outcome(data(name), policy)
    if expected != "ok":
        assert got == expected
        return
    assert isinstance(got, DicomIdentity), got
    assert got.transfer_syntax_uid == syntax
    full = pydicom.dcmread(BytesIO(data(name)), force=True)
    assert got.sop_instance_uid == full.SOPInstanceUID
    assert got.study_instance_uid == (full.get("StudyInstanceUID") or None)
    assert got.modality == (full.get("Modality") or None)
    if expected_ids:
        assert (got.modality, got.sop_instance_uid) == expected_ids


def test_mr_variants_agree_whatever_the_encoding() -> None:
    names = [n for n, case in CASES.items() if case[1] is MR]
    idents = {replace(read_identity(data(n)), transfer_syntax_uid="") for n in names}
    assert len(idents) == 1
    (one,) = idents
    assert (one.study_instance_uid, one.patient_id, one.series_number) == (MR_STUDY, "4MR1", 1)


def test_every_shipped_file_gives_an_identity_or_a_format_error() -> None:
    """No other exception escapes, whatever pydicom's test corpus holds."""
    folder = Path(get_testdata_file("CT_small.dcm") or "").parent
    files = sorted(folder.glob("*.dcm"))
    assert len(files) > 50
    for path in files:
        for policy in POLICIES:
            outcome(path.read_bytes(), policy)


# --- not DICOM, truncated -------------------------------------------------------------------

NOT_DICOM = {
    "text": b"patient: Jane Doe\nthis is a text file, not an image\n" * 20,
    "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(300),
    "zeros": bytes(1000),
    "short": b"DICM",
    **{f"random{seed}": random.Random(seed).randbytes(4096) for seed in range(8)},
    # Looks like the start of a dataset (group 0008) and then garbage.
    "group8-garbage": b"\x08\x00\x05\x00CS\x0a\x00" + random.Random(99).randbytes(2000),
}


@pytest.mark.parametrize("name", sorted(NOT_DICOM))
@pytest.mark.parametrize("policy", ["lenient", "strict"])
def test_not_dicom(name: str, policy: h.Policy) -> None:
    assert outcome(NOT_DICOM[name], policy) == h.REASON_NO_DICM


@pytest.mark.parametrize("policy", ["lenient", "strict"])
def test_empty(policy: h.Policy) -> None:
    assert outcome(b"", policy) == h.REASON_EMPTY


def test_dicm_and_nothing_else_is_a_cut_header() -> None:
    raw = bytes(128) + b"DICM"
    assert outcome(raw, "lenient") == outcome(raw, "strict") == h.REASON_TRUNCATED


CT = data("CT_small.dcm")
SOP_AT = CT.find(b"1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322", 336)  # in the dataset


@pytest.mark.parametrize(
    ("cut", "lenient", "strict"),
    [
        (131, h.REASON_NO_DICM, h.REASON_NO_DICM),  # the marker itself is cut
        (140, h.REASON_TRUNCATED, h.REASON_TRUNCATED),  # in the file meta
        (300, h.REASON_TRUNCATED, h.REASON_TRUNCATED),
        (400, h.REASON_TRUNCATED, h.REASON_TRUNCATED),  # dataset begun, before the SOP UID
        (SOP_AT + 10, h.REASON_TRUNCATED, h.REASON_TRUNCATED),  # inside the SOP UID value
        (2000, h.REASON_TRUNCATED, h.REASON_TRUNCATED),  # before the Study UID
        (6000, "ok", "ok"),  # identity whole, pixel data missing
    ],
)
def test_truncated_header(cut: int, lenient: str, strict: str) -> None:
    for policy, expected in zip(POLICIES, (lenient, strict), strict=True):
        got = outcome(CT[:cut], policy)
        if expected == "ok":
            assert isinstance(got, DicomIdentity)
            assert got == read_identity(CT)
        else:
            assert got == expected, (cut, policy)


def test_cut_requested_element_is_dropped_when_lenient_refused_when_strict() -> None:
    ds = pydicom.dcmread(BytesIO(CT))
    ds.add_new(0x7FD90010, "LO", "ACME")
    ds.add_new(0x7FD91010, "LT", "x" * 5000)  # a requested extra, the last element
    del ds.PixelData
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()[:-1000]
    assert read_identity(raw, extra_tags=["7FD9,1010"], policy="lenient").extra == {}
    assert outcome(raw, "strict", extra_tags=["7FD9,1010"]) == h.REASON_TRUNCATED


def test_strict_refuses_invalid_uid_lenient_keeps_it() -> None:
    ds = pydicom.dcmread(BytesIO(CT))
    ds.StudyInstanceUID = "1.2.03.x"
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert read_identity(buf.getvalue()).study_instance_uid == "1.2.03.x"
    assert outcome(buf.getvalue(), "strict") == h.REASON_BAD_UID


def test_bad_instance_number() -> None:
    at = CT.find(b"\x20\x00\x13\x00IS\x02\x001 ")  # (0020,0013) IS "1 "
    raw = CT[: at + 8] + b"x " + CT[at + 10 :]
    assert read_identity(raw).instance_number is None
    assert outcome(raw, "strict") == h.REASON_BAD_NUMBER


# --- errors, extras, PHI --------------------------------------------------------------------


def test_error_maps_to_exit_code_and_status_and_hides_phi() -> None:
    with pytest.raises(DicomFormatError) as info:
        read_identity(data("badVR.dcm")[:400], policy="strict")  # cut inside its dataset
    err = info.value
    assert isinstance(err, DicomCloudError)
    assert (err.exit_code, err.http_status, err.retryable) == (12, 422, False)
    assert "1.9.999" not in str(err) and "id11111" not in str(err)
    assert err.__cause__ is None  # pydicom's messages may quote values: not chained


def test_extra_tags_by_keyword_and_hex() -> None:
    ident = read_identity(
        CT, extra_tags=["PatientName", "0018,0050", "(0028,0010)", "00280011", "ReasonForStudy"]
    )
    assert ident.extra == {
        "PatientName": "CompressedSamples^CT1",
        "0018,0050": "5.000000",
        "(0028,0010)": "128",
        "00280011": "128",
    }
    # Extra tags after the identity make the reader go further, up to the pixel data.
    assert "ReasonForStudy" not in ident.extra


def test_multivalued_extra() -> None:
    assert read_identity(CT, extra_tags=["ImageType"]).extra == {"ImageType": "ORIGINAL\\PRIMARY\\AXIAL"}


@pytest.mark.parametrize("bad", ["NoSuchKeyword", "0002,0010", "7FE0,0010", "ReferencedImageSequence"])
def test_bad_extra_tags(bad: str) -> None:
    with pytest.raises(UsageError):
        read_identity(CT, extra_tags=[bad])


def test_bad_arguments() -> None:
    with pytest.raises(UsageError):
        read_identity(CT, extra_tags="PatientName")
    with pytest.raises(UsageError):
        read_identity(CT, policy="loose")  # type: ignore[arg-type]


def test_repr_hides_phi() -> None:
    ident = read_identity(CT, extra_tags=["PatientName"])
    text = repr(ident)
    assert "1CT1" not in text and "CompressedSamples" not in text
    assert "patient_id=<hidden>" in text and "PatientName" in text
    assert ident.sop_instance_uid in text
    with pytest.raises(AttributeError):
        ident.patient_id = "x"  # type: ignore[misc]


# --- stores and files: only the head is read ------------------------------------------------


def big_header(private_group: int, *, private_size: int, pixels: int, after: str | None = None) -> bytes:
    """CT_small with a long private element before PixelData, and a large PixelData."""
    ds = pydicom.dcmread(BytesIO(CT))
    ds.add_new((private_group << 16) | 0x0010, "LO", "ACME")
    ds.add_new((private_group << 16) | 0x1000, "OB", b"\x01" * private_size)
    if after:
        ds.RequestedProcedureDescription = after
    ds.PixelData = b"\x00" * pixels
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class CountingStore:
    """Records the ranged reads made through a store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reads: list[tuple[int, int]] = []
        original = store.get_range

        async def get_range(key: str, start: int, end: int) -> bytes | memoryview:
            self.reads.append((start, end))
            return await original(key, start, end)

        store.get_range = get_range  # type: ignore[method-assign]


def read_from_store(raw: bytes | None, **kw: Any) -> tuple[DicomIdentity | str, list[tuple[int, int]]]:
    async def main() -> tuple[DicomIdentity | str, list[tuple[int, int]]]:
        store = open_store("memory://hdr-test")
        if raw is not None:
            await store.put("a/b.dcm", raw)
        counting = CountingStore(store)
        try:
            return await h.read_identity_from_store(store, "a/b.dcm", **kw), counting.reads
        except DicomFormatError as exc:
            return exc.reason, counting.reads
        finally:
            await store.delete(["a/b.dcm"])

    return asyncio.run(main())


def test_store_small_object_is_read_whole_in_one_request() -> None:
    ident, reads = read_from_store(CT)
    assert ident == read_identity(CT)
    assert reads == [(0, len(CT))]


def test_store_reads_only_the_head() -> None:
    raw = big_header(0x0029, private_size=100_000, pixels=2_000_000)
    ident, reads = read_from_store(raw)
    assert isinstance(ident, DicomIdentity) and ident.sop_instance_uid == read_identity(CT).sop_instance_uid
    # The private block comes after every identity element: one read of 64 KiB suffices.
    assert reads == [(0, 64 * 1024)]


def test_store_grows_while_the_header_is_longer_than_read() -> None:
    # Private group 0009 sits between the SOP UID (0008) and the Patient ID (0010).
    raw = big_header(0x0009, private_size=200_000, pixels=4_000_000)
    ident, reads = read_from_store(raw)
    assert ident == read_identity(raw)
    assert reads == [(0, 65536), (0, 131072), (0, 262144)]
    assert max(end for _, end in reads) < len(raw) / 10


def test_store_grows_for_extra_tags_past_a_long_private_block() -> None:
    raw = big_header(0x0029, private_size=100_000, pixels=1_000_000, after="CHEST")
    ident, reads = read_from_store(raw, extra_tags=["RequestedProcedureDescription"])
    assert isinstance(ident, DicomIdentity) and ident.extra == {"RequestedProcedureDescription": "CHEST"}
    assert reads == [(0, 65536), (0, 131072)]


def test_store_gives_up_at_max_read() -> None:
    raw = big_header(0x0009, private_size=200_000, pixels=1_000_000)
    got, reads = read_from_store(raw, max_read=128 * 1024)
    assert got == h.REASON_TOO_LONG
    assert reads == [(0, 65536), (0, 131072)]


def test_store_not_dicom_stops_at_the_first_read() -> None:
    raw = NOT_DICOM["text"] * 500
    got, reads = read_from_store(raw, policy="strict")
    assert got == h.REASON_NO_DICM and reads == [(0, 65536)]
    got, reads = read_from_store(raw, policy="lenient")
    assert got == h.REASON_NO_DICM and reads == [(0, 65536)]


def test_store_missing_key_and_known_size() -> None:
    with pytest.raises(NotFoundError):
        read_from_store(None)
    ident, reads = read_from_store(CT, size=len(CT), first_read=4096)
    assert isinstance(ident, DicomIdentity)
    assert reads == [(0, 4096)]


def test_file_variant(tmp_path: Path) -> None:
    raw = big_header(0x0009, private_size=200_000, pixels=1_000_000)
    path = tmp_path / "x.dcm"
    path.write_bytes(raw)
    assert h.read_identity_from_file(path) == read_identity(raw)
    with pytest.raises(DicomFormatError) as info:
        h.read_identity_from_file(path, max_read=100_000)
    assert info.value.reason == h.REASON_TOO_LONG
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(DicomFormatError):
        h.read_identity_from_file(tmp_path / "t.txt", policy="strict")
    with pytest.raises(NotFoundError):
        h.read_identity_from_file(tmp_path / "missing.dcm")
    with pytest.raises(UsageError):
        h.read_identity_from_file(path, first_read=10)


# --- pydicom's warnings -----------------------------------------------------------------------


def test_pydicom_warnings_become_debug_messages_naming_the_file() -> None:
    """pydicom's UserWarning lines used to reach stderr whatever the logging level."""
    import subprocess
    import sys

    path = get_testdata_file("SC_rgb_jpeg.dcm")  # implicit VR where explicit is declared: warns
    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=int(sys.argv[1]), format='%(name)s: %(message)s')\n"
        "from dicom_cloud.dicom.header import read_identity_from_file\n"
        "read_identity_from_file(sys.argv[2])\n"
    )
    quiet = subprocess.run(
        [sys.executable, "-c", script, "30", str(path)], capture_output=True, text=True, check=True
    )
    assert quiet.stderr == ""
    verbose = subprocess.run(
        [sys.executable, "-c", script, "10", str(path)], capture_output=True, text=True, check=True
    )
    assert f"dicom_cloud.dicom.header: {path}: pydicom: Expected explicit VR" in verbose.stderr
    assert "UserWarning" not in verbose.stderr


def test_pydicom_reports_never_carry_values(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="dicom_cloud.dicom.header")
    with h._reporting_as("s3://b/x\n.dcm"):
        pydicom.config.logger.warning("Invalid value for VR PN: 'DOE^JOHN' (\"1970\")")
    messages = [r.getMessage() for r in caplog.records if r.name == "dicom_cloud.dicom.header"]
    assert messages == ["s3://b/x\\n.dcm: pydicom: Invalid value for VR PN: '...' ('...')"]
    # Outside a header read, pydicom's records are left alone.
    caplog.clear()
    pydicom.config.logger.warning("elsewhere")
    assert [r.name for r in caplog.records] == ["pydicom"]


@pytest.mark.parametrize("policy", ["lenient", "strict"])
def test_file_meta_naming_another_instance_is_reported_not_refused(policy: h.Policy) -> None:
    """rtplan.dcm's file meta names another SOP Instance UID than its dataset: the dataset's UID
    is the identity, the mismatch is reported; agreeing files report none."""
    for name in ("rtplan.dcm", "rtdose.dcm"):
        raw = data(name)
        full = pydicom.dcmread(BytesIO(raw))
        assert full.file_meta.MediaStorageSOPInstanceUID != full.SOPInstanceUID
        got = read_identity(raw, policy=policy)
        assert got.sop_instance_uid == full.SOPInstanceUID
        assert got.meta_mismatch
    assert not read_identity(data("CT_small.dcm"), policy=policy).meta_mismatch


# --- bounded cost on junk --------------------------------------------------------------------

ZEROS = bytes(4 * 1024 * 1024)


@pytest.mark.parametrize("policy", ["lenient", "strict"])
def test_zero_bytes_after_dicm_are_refused_at_the_first_elements(policy: h.Policy) -> None:
    """A run of zeros parses as one 8-byte command element (0000,0000) after another: pydicom
    would walk all of them. Out of order, they are refused where the dataset begins."""
    calls: list[int] = []
    original = h._parse_header

    def counting(buf: bytes, **kw: Any) -> DicomIdentity:
        calls.append(len(buf))
        return original(buf, **kw)

    h._parse_header = counting  # type: ignore[assignment]
    try:
        assert outcome(bytes(128) + b"DICM" + ZEROS, policy) == h.REASON_UNREADABLE
        assert outcome(ZEROS, policy) == h.REASON_NO_DICM
    finally:
        h._parse_header = original  # type: ignore[assignment]
    # One parse of the first prefix only: nothing asked for more of the data.
    assert all(n <= 64 * 1024 for n in calls)


@pytest.mark.parametrize("policy", ["lenient", "strict"])
def test_repeated_dataset_elements_end_the_header(policy: h.Policy) -> None:
    """Junk that looks like one dataset element repeated is not read element after element."""
    junk = bytes(128) + b"DICM" + b"\x08\x00\x01\x00" + bytes(4) + b"\x08\x00\x01\x00" * (1 << 20)
    assert outcome(junk, policy) == h.REASON_NO_SOP_INSTANCE


def test_a_header_read_never_parses_more_than_max_read() -> None:
    """A dataset of well-formed, ordered elements longer than ``max_read`` before the identity:
    refused as too long, not parsed to its end."""
    elements = b"".join(struct.pack("<HHL", 0x0009, e, 0) for e in range(1, 40_000))
    raw = bytes(128) + b"DICM" + elements + b"\x08\x00\x18\x00" + struct.pack("<L", 4) + b"1.2 "
    assert outcome(raw, "lenient", max_read=128 * 1024) == h.REASON_TOO_LONG


def test_junk_after_a_valid_header_is_refused_before_any_parser_walks_it() -> None:
    ct = data("CT_small.dcm")
    header = ct[: ct.index(b"\xe0\x7f\x10\x00")]
    h.check_element_order(ct)  # a real instance passes
    with pytest.raises(DicomFormatError) as caught:
        h.check_element_order(header + ZEROS)
    assert caught.value.reason == h.REASON_UNREADABLE
    h.check_element_order(b"not DICOM at all" * 100)  # left to the parser


def test_every_pydicom_test_file_the_archive_reads_passes_the_order_check() -> None:
    from dicom_cloud.archive.parsing import parse_instance

    folder = Path(get_testdata_file("CT_small.dcm") or "").parent
    for path in sorted(folder.glob("*.dcm")):
        raw = path.read_bytes()
        try:
            parse_instance(raw)
        except DicomCloudError:
            continue
        h.check_element_order(raw)
