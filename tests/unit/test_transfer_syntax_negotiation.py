"""Transfer syntaxes out of the archive: what can be decoded, instances and frames transcoded, the
Accept negotiation of WADO answers, and the window/viewport of rendered pictures."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi import Request
from pydicom.data import get_testdata_file

from dicom_cloud.archive.imaging import Viewport, Window, render_frame
from dicom_cloud.archive.transcode import (
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    can_decode,
    can_transcode,
    decode_frames,
    frames_syntax,
    transcode_instance,
)
from dicom_cloud.errors import NotSupportedError, UsageError
from dicom_cloud.service.dicomjson import parse_accept
from dicom_cloud.service.http_errors import NotAcceptableError
from dicom_cloud.service.negotiation import FramePlan, frame_plan, instance_syntax

JPEG = "1.2.840.10008.1.2.4.50"
J2K = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"
JLS = "1.2.840.10008.1.2.4.80"
OCTET = "application/octet-stream"
MR = "multipart/related"


def read_testdata(name: str) -> bytes:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path).read_bytes()


def request(accept: str | None) -> Request:
    headers = [] if accept is None else [(b"accept", accept.encode())]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers, "query_string": b""})


# -- what can be decoded --------------------------------------------------------------------------


def test_the_decodable_syntaxes() -> None:
    for syntax in (EXPLICIT_LE, IMPLICIT_LE, "1.2.840.10008.1.2.1.99", JPEG, J2K, RLE, JLS):
        assert can_decode(syntax), syntax
    for syntax in (EXPLICIT_BE, "1.2.3.4", "1.2.840.10008.1.2.4.100"):  # big endian, unknown, MPEG-2
        assert not can_decode(syntax), syntax
    assert can_transcode(JPEG, JPEG) and can_transcode(JPEG, EXPLICIT_LE) and can_transcode(RLE, IMPLICIT_LE)
    assert not can_transcode(JPEG, J2K) and not can_transcode(JPEG, EXPLICIT_BE)
    assert can_transcode(EXPLICIT_BE, EXPLICIT_BE) and not can_transcode(EXPLICIT_BE, EXPLICIT_LE)
    assert frames_syntax(IMPLICIT_LE) == EXPLICIT_LE and frames_syntax(JPEG) == JPEG


@pytest.mark.parametrize(
    "name", ["SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm"]
)
def test_instances_and_frames_decode_to_pydicoms_pixels(name: str) -> None:
    data = read_testdata(name)
    original = pydicom.dcmread(io.BytesIO(data))
    for target in (EXPLICIT_LE, IMPLICIT_LE):
        out = pydicom.dcmread(io.BytesIO(transcode_instance(data, target)))
        assert out.file_meta.TransferSyntaxUID == target
        assert out.SOPInstanceUID == original.SOPInstanceUID
        assert np.array_equal(out.pixel_array, original.pixel_array)
    pixels = original.pixel_array
    frames = int(original.get("NumberOfFrames") or 1)
    last = pixels[-1] if frames > 1 else pixels
    [decoded] = decode_frames(data, [frames], EXPLICIT_LE)
    assert decoded == np.ascontiguousarray(last, dtype=last.dtype.newbyteorder("<")).tobytes()


def test_what_cannot_be_transcoded_is_refused() -> None:
    data = read_testdata("SC_rgb_jpeg_dcmtk.dcm")
    assert transcode_instance(data, JPEG) == data  # as stored: the same bytes
    with pytest.raises(NotSupportedError):
        transcode_instance(data, J2K)
    with pytest.raises(UsageError, match="frame 2 does not exist"):
        decode_frames(data, [2], EXPLICIT_LE)


# -- Accept negotiation ---------------------------------------------------------------------------


def test_accept_is_parsed_with_quotes_and_q_values() -> None:
    ranges = parse_accept(
        'multipart/related; type="application/dicom"; transfer-syntax="1.2,3"; q=0.5, '
        "image/jpeg;q=0, */*;q=0.1, multipart/related; type=application/octet-stream"
    )
    assert [(r.value, r.params) for r in ranges] == [
        ("multipart/related", {"type": "application/octet-stream"}),
        ("multipart/related", {"type": "application/dicom", "transfer-syntax": "1.2,3"}),
        ("*/*", {}),
    ]
    assert parse_accept("") == [] and parse_accept(" , ,") == []


def test_instance_syntax() -> None:
    dicom = 'multipart/related; type="application/dicom"'
    assert instance_syntax(request(None), {JPEG}) is None
    assert instance_syntax(request(f"{dicom}; transfer-syntax=*"), {JPEG}) is None
    assert instance_syntax(request(dicom), {JPEG}) is None  # no transfer-syntax: as stored
    assert instance_syntax(request(f"{dicom}; transfer-syntax={JPEG}"), {JPEG}) is None
    assert instance_syntax(request(f"{dicom}; transfer-syntax={EXPLICIT_LE}"), {JPEG, RLE}) == EXPLICIT_LE
    assert (
        instance_syntax(request(f"application/dicom; transfer-syntax={IMPLICIT_LE}"), {JPEG}) == IMPLICIT_LE
    )
    two = f"{dicom}; transfer-syntax={J2K}, {dicom}; transfer-syntax={EXPLICIT_LE}; q=0.5"
    assert instance_syntax(request(two), {JPEG}) == EXPLICIT_LE
    assert instance_syntax(request(two), {J2K}) is None
    for accept in (f"{dicom}; transfer-syntax={J2K}", 'multipart/related; type="image/jpeg"', "text/html"):
        with pytest.raises(NotAcceptableError):
            instance_syntax(request(accept), {JPEG})
    with pytest.raises(NotAcceptableError):  # every instance of the answer must be sendable
        instance_syntax(request(f"{dicom}; transfer-syntax={EXPLICIT_LE}"), {JPEG, EXPLICIT_BE})


@pytest.mark.parametrize(
    ("accept", "stored", "plan"),
    [
        (None, JPEG, FramePlan("image/jpeg", JPEG, False)),
        ("*/*", RLE, FramePlan("image/dicom-rle", RLE, False)),
        (f'multipart/related; type="{OCTET}"; transfer-syntax=*', JPEG, FramePlan(OCTET, JPEG, False)),
        (f'{MR}; type="{OCTET}"; transfer-syntax=*', EXPLICIT_LE, FramePlan(OCTET, EXPLICIT_LE, False)),
        (f'multipart/related; type="{OCTET}"', JPEG, FramePlan(OCTET, EXPLICIT_LE, True)),
        (f'multipart/related; type="{OCTET}"', IMPLICIT_LE, FramePlan(OCTET, EXPLICIT_LE, False)),
        (f"{OCTET}; transfer-syntax={IMPLICIT_LE}", JLS, FramePlan(OCTET, IMPLICIT_LE, True)),
        (f"{OCTET}; transfer-syntax={IMPLICIT_LE}", EXPLICIT_LE, FramePlan(OCTET, IMPLICIT_LE, False)),
        ('multipart/related; type="image/jpeg"', JPEG, FramePlan("image/jpeg", JPEG, False)),
        (f'{MR}; type="image/jp2"; transfer-syntax={J2K}', J2K, FramePlan("image/jp2", J2K, False)),
        (f'{MR}; type="image/*"; transfer-syntax=*', RLE, FramePlan("image/dicom-rle", RLE, False)),
        (f'multipart/related; type="image/jp2", multipart/related; type="{OCTET}"; q=0.2', RLE,
         FramePlan(OCTET, EXPLICIT_LE, True)),
        (f'multipart/related; type="{OCTET}"; q=0.2, multipart/related; type="image/jpeg"', JPEG,
         FramePlan("image/jpeg", JPEG, False)),
    ],
)  # fmt: skip
def test_frame_plans(accept: str | None, stored: str, plan: FramePlan) -> None:
    assert frame_plan(request(accept), stored) == plan


@pytest.mark.parametrize(
    ("accept", "stored"),
    [
        ('multipart/related; type="image/jpeg"', RLE),
        (f'multipart/related; type="image/jp2"; transfer-syntax={J2K}', JPEG),
        (f'multipart/related; type="{OCTET}"; transfer-syntax={EXPLICIT_BE}', RLE),
        (f'multipart/related; type="{OCTET}"', EXPLICIT_BE),  # big endian frames are not swapped
        ('multipart/related; type="application/dicom"; transfer-syntax=*', JPEG),
        ("image/png", JPEG),
    ],
)
def test_frames_that_cannot_be_sent_are_406(accept: str, stored: str) -> None:
    with pytest.raises(NotAcceptableError):
        frame_plan(request(accept), stored)


# -- rendered: window and viewport ------------------------------------------------------------------


def test_window_functions_follow_ps3_3() -> None:
    x = np.array([-1000.0, -160.0, 40.0, 240.0, 1000.0])
    assert list(Window(40, 400).apply(x)) == [0, 0, 128, 255, 255]
    assert list(Window(40, 400, "linear_exact").apply(x)) == [0, 0, 128, 255, 255]
    assert list(Window(40, 400, "sigmoid").apply(np.array([40.0]))) == [128]
    assert list(Window(0.5, 1).apply(np.array([0.0, 1.0]))) == [0, 255]
    assert Window.parse("40, 400 ,SIGMOID") == Window(40, 400, "sigmoid")
    for bad in ("40", "a,1", "40,0", "40,0.5,linear", "40,400,cubic", "nan,1", "1,2,3,4"):
        with pytest.raises(UsageError):
            Window.parse(bad)


def test_viewports() -> None:
    assert Viewport.parse("256,128") == Viewport(256, 128)
    assert Viewport.parse("64,64,10,20,-30,40") == Viewport(64, 64, (10, 20, -30, 40))
    for bad in ("256", "0,10", "10,10,1,1,0,5", "a,b", "5000,10", "1,2,3"):
        with pytest.raises(UsageError):
            Viewport.parse(bad)
    data = read_testdata("CT_small.dcm")
    _, width, height = render_frame(data, 1, "image/png", viewport=Viewport(100, 40))
    assert (width, height) == (40, 40)
    _, width, height = render_frame(data, 1, "image/png", viewport=Viewport(30, 30, (0, 0, 128, 64)))
    assert (width, height) == (30, 15)
    plain, _, _ = render_frame(data, 1, "image/png")
    windowed, _, _ = render_frame(data, 1, "image/png", window=Window(40, 400))
    assert plain != windowed
    with pytest.raises(UsageError, match="outside"):
        render_frame(data, 1, "image/png", viewport=Viewport(30, 30, (500, 500, 10, 10)))
