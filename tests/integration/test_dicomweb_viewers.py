"""DICOMweb as viewers use it, against the real service on loopback: transfer-syntax negotiation
(``transfer-syntax=*``, transcoding to uncompressed syntaxes, 406), WADO-URI, rendered
resources with window/viewport/quality, fuzzy person-name matching, and query keys ignored with
a Warning header. The instances are pydicom's test files: JPEG baseline, JPEG 2000, RLE,
JPEG-LS and a native CT.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid

from dicom_cloud.service.settings import load_settings
from live_service import LiveService, start_service

EVRLE = "1.2.840.10008.1.2.1"
IVRLE = "1.2.840.10008.1.2"
EVRBE = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG2000 = "1.2.840.10008.1.2.4.90"
OHIF_FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
OHIF_INSTANCE = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass(frozen=True)
class Stored:
    name: str
    data: bytes
    ds: pydicom.Dataset

    @property
    def path(self) -> str:
        d = self.ds
        return f"/studies/{d.StudyInstanceUID}/series/{d.SeriesInstanceUID}/instances/{d.SOPInstanceUID}"

    @property
    def syntax(self) -> str:
        return str(self.ds.file_meta.TransferSyntaxUID)

    @property
    def wado_uri(self) -> str:
        d = self.ds
        return (
            f"/wado?requestType=WADO&studyUID={d.StudyInstanceUID}&seriesUID={d.SeriesInstanceUID}"
            f"&objectUID={d.SOPInstanceUID}"
        )


def _load(name: str, *, new_uids: bool = False) -> Stored:
    path = get_testdata_file(name)
    assert path is not None, name
    if not new_uids:
        data = Path(path).read_bytes()
        return Stored(name, data, pydicom.dcmread(io.BytesIO(data)))
    # pydicom's MR_small_* files share their UIDs: this one gets its own series and instance
    # (its pixel data stays as encoded).
    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return Stored(name, out.getvalue(), pydicom.dcmread(io.BytesIO(out.getvalue())))


FILES = {
    "ct": ("CT_small.dcm", False),  # native, Explicit VR Little Endian
    "jpeg": ("SC_rgb_jpeg_dcmtk.dcm", False),  # JPEG baseline, YBR_FULL colour
    "j2k": ("JPEG2000.dcm", False),
    "rle": ("MR_small_RLE.dcm", False),
    "jls": ("MR_small_jpeg_ls_lossless.dcm", True),
    "sr": ("test-SR.dcm", False),  # no pixel data
}
COMPRESSED = ("jpeg", "j2k", "rle", "jls")


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveService, dict[str, Stored]]]:
    data_dir = tmp_path_factory.mktemp("viewers") / "data"
    live = start_service(load_settings({"data_dir": data_dir}, environ={}))
    files = {key: _load(name, new_uids=fresh) for key, (name, fresh) in FILES.items()}
    boundary = "viewers-boundary"
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f.data + b"\r\n"
        for f in files.values()
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    with client(live) as http:
        answer = http.post(
            "/studies",
            content=body,
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
        )
        assert answer.status_code == 200, answer.text
    yield live, files
    live.stop()


def client(live: LiveService, token: str | None = None, *, anonymous: bool = False) -> httpx.Client:
    """A client with ``token`` (the admin token by default), or none at all."""
    credential = token or live.admin_token
    headers = {} if anonymous else {"Authorization": f"Bearer {credential}"}
    return httpx.Client(base_url=live.url, headers=headers, timeout=60)


def parts(answer: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part of a multipart/related answer."""
    match = re.search(r'boundary="?([^";]+)"?', answer.headers["content-type"])
    assert match, answer.headers["content-type"]
    delimiter = b"--" + match.group(1).encode()
    out = []
    for chunk in answer.content.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, body = chunk[2:].partition(b"\r\n\r\n")
        content_type = next(
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-type:")
        )
        out.append((content_type, body[:-2]))  # the CRLF before the next delimiter
    return out


def native_bytes(pixels: np.ndarray) -> bytes:
    return np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()


def first_frame(ds: pydicom.Dataset) -> np.ndarray:
    pixels = ds.pixel_array
    return pixels[0] if int(ds.get("NumberOfFrames") or 1) > 1 else pixels


# -- frames and instances: transfer-syntax negotiation ------------------------------------------------


@pytest.mark.parametrize("key", COMPRESSED)
def test_ohif_frame_request_gets_the_stored_frame(
    stored: tuple[LiveService, dict[str, Stored]], key: str
) -> None:
    live, files = stored
    f = files[key]
    with client(live) as http:
        answer = http.get(f.path + "/frames/1", headers={"Accept": OHIF_FRAMES})
    assert answer.status_code == 200, answer.text
    assert 'type="application/octet-stream"' in answer.headers["content-type"]
    [(content_type, body)] = parts(answer)
    assert content_type == f"application/octet-stream; transfer-syntax={f.syntax}"
    count = int(f.ds.get("NumberOfFrames") or 1)
    assert body == next(iter(generate_frames(f.ds.PixelData, number_of_frames=count)))


@pytest.mark.parametrize("key", COMPRESSED)
def test_compressed_instances_are_transcoded_to_uncompressed_syntaxes(
    stored: tuple[LiveService, dict[str, Stored]], key: str
) -> None:
    live, files = stored
    f = files[key]
    with client(live) as http:
        for target in (EVRLE, IVRLE):
            answer = http.get(
                f.path,
                headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={target}'},
            )
            assert answer.status_code == 200, answer.text
            [(content_type, body)] = parts(answer)
            assert content_type == f"application/dicom; transfer-syntax={target}"
            ds = pydicom.dcmread(io.BytesIO(body))
            assert ds.file_meta.TransferSyntaxUID == target
            assert ds.SOPInstanceUID == f.ds.SOPInstanceUID
            assert np.array_equal(ds.pixel_array, f.ds.pixel_array)
        # transfer-syntax=* (OHIF's instance request): the stored bytes.
        [(content_type, body)] = parts(http.get(f.path, headers={"Accept": OHIF_INSTANCE}))
        assert content_type == f"application/dicom; transfer-syntax={f.syntax}"
        assert body[128:] == f.data[128:]  # the preamble is zeroed on ingest


@pytest.mark.parametrize("key", COMPRESSED)
def test_frames_are_decoded_to_native_pixels(stored: tuple[LiveService, dict[str, Stored]], key: str) -> None:
    live, files = stored
    f = files[key]
    expected = native_bytes(first_frame(f.ds))
    with client(live) as http:
        for accept, syntax in (
            (f'multipart/related; type="application/octet-stream"; transfer-syntax={EVRLE}', EVRLE),
            ('multipart/related; type="application/octet-stream"', EVRLE),  # the default syntax
            (f"application/octet-stream; transfer-syntax={IVRLE}", IVRLE),
        ):
            answer = http.get(f.path + "/frames/1", headers={"Accept": accept})
            assert answer.status_code == 200, (accept, answer.text)
            [(content_type, body)] = parts(answer)
            assert content_type == f"application/octet-stream; transfer-syntax={syntax}"
            assert body == expected


def test_native_frames_and_instances_need_no_decoding(stored: tuple[LiveService, dict[str, Stored]]) -> None:
    live, files = stored
    ct = files["ct"]
    with client(live) as http:
        for accept in (OHIF_FRAMES, 'multipart/related; type="application/octet-stream"'):
            [(content_type, body)] = parts(http.get(ct.path + "/frames/1", headers={"Accept": accept}))
            assert content_type == f"application/octet-stream; transfer-syntax={EVRLE}"
            assert body == native_bytes(ct.ds.pixel_array)
        answer = http.get(
            ct.path,
            headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={IVRLE}'},
        )
        ds = pydicom.dcmread(io.BytesIO(parts(answer)[0][1]))
        assert ds.file_meta.TransferSyntaxUID == IVRLE and np.array_equal(ds.pixel_array, ct.ds.pixel_array)
        # A cache buster on WADO-RS resources: ignored, and said so.
        for resource in ("", "/metadata", "/frames/1", "/rendered?viewport=32,32&", "/thumbnail?"):
            url = ct.path + resource + ("&" if "?" in resource else "?") + "_=123"
            answer = http.get(url.replace("&&", "&").replace("?&", "?"))
            assert answer.status_code == 200, (resource, answer.text)
            assert answer.headers["warning"].endswith("\"'_' is not a parameter of this resource: ignored\"")
        assert "warning" not in http.get(ct.path + "/rendered", params={"viewport": "32,32"}).headers


def test_what_cannot_be_produced_is_406(stored: tuple[LiveService, dict[str, Stored]]) -> None:
    live, files = stored
    jpeg, rle = files["jpeg"], files["rle"]
    with client(live) as http:
        for path, accept in (
            (jpeg.path, f'multipart/related; type="application/dicom"; transfer-syntax={JPEG2000}'),
            (jpeg.path, f'multipart/related; type="application/dicom"; transfer-syntax={EVRBE}'),
            (jpeg.path, 'multipart/related; type="application/dicom"; transfer-syntax=1.2.3.4'),
            (rle.path + "/frames/1", 'multipart/related; type="image/jpeg"'),
            (rle.path + "/frames/1", f'multipart/related; type="image/jp2"; transfer-syntax={JPEG2000}'),
            (
                rle.path + "/frames/1",
                f'multipart/related; type="application/octet-stream"; transfer-syntax={EVRBE}',
            ),
            (jpeg.path, "application/pdf"),
        ):
            answer = http.get(path, headers={"Accept": accept})
            assert answer.status_code == 406, (path, accept, answer.status_code)
            assert answer.json()["message"]
        # Never stored JPEG bytes under another label: what is asked for, or 406.
        answer = http.get(
            jpeg.path,
            headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={EVRLE}'},
        )
        assert parts(answer)[0][0].endswith(EVRLE)


def test_accept_with_several_ranges_and_q_values(stored: tuple[LiveService, dict[str, Stored]]) -> None:
    live, files = stored
    jpeg = files["jpeg"]
    with client(live) as http:
        # The first range cannot be satisfied; the second can.
        accept = (
            f'multipart/related; type="application/dicom"; transfer-syntax={JPEG2000}, '
            f'multipart/related; type="application/dicom"; transfer-syntax="{EVRLE}"'
        )
        assert parts(http.get(jpeg.path, headers={"Accept": accept}))[0][0].endswith(EVRLE)
        # Preference by q-value, whatever the order.
        accept = (
            f'multipart/related; type="application/dicom"; transfer-syntax={EVRLE}; q=0.4, '
            'multipart/related; type="application/dicom"; transfer-syntax=*; q=0.9'
        )
        [(content_type, body)] = parts(http.get(jpeg.path, headers={"Accept": accept}))
        assert content_type.endswith(JPEG_BASELINE) and body[128:] == jpeg.data[128:]
        # Frames: the stored JPEG under its own media type.
        accept = (
            'multipart/related; type="image/jpeg", multipart/related; type="application/octet-stream"; q=0.5'
        )
        answer = http.get(jpeg.path + "/frames/1", headers={"Accept": accept})
        assert parts(answer)[0][0] == f"image/jpeg; transfer-syntax={JPEG_BASELINE}"


# -- WADO-URI -----------------------------------------------------------------------------------------


def test_wado_uri(stored: tuple[LiveService, dict[str, Stored]]) -> None:
    live, files = stored
    jpeg, ct = files["jpeg"], files["ct"]
    with client(live, anonymous=True) as anonymous:
        assert anonymous.get(jpeg.wado_uri + "&contentType=application/dicom").status_code == 401
    with client(live) as http:
        # application/dicom: Explicit VR Little Endian by default (decoded), or as stored.
        answer = http.get(jpeg.wado_uri + "&contentType=application/dicom")
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom"
        ds = pydicom.dcmread(io.BytesIO(answer.content))
        assert ds.file_meta.TransferSyntaxUID == EVRLE and np.array_equal(ds.pixel_array, jpeg.ds.pixel_array)
        answer = http.get(jpeg.wado_uri + "&contentType=application/dicom&transferSyntax=*")
        assert answer.content[128:] == jpeg.data[128:]
        answer = http.get(jpeg.wado_uri + f"&contentType=application/dicom&transferSyntax={JPEG2000}")
        assert answer.status_code == 406
        # Images: JPEG by default, PNG when asked; rows/columns, window and quality honoured.
        plain = http.get(ct.wado_uri)
        assert plain.status_code == 200 and plain.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(plain.content)).size == (128, 128)
        png = http.get(ct.wado_uri + "&contentType=image/png&rows=64&columns=64")
        assert png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (64, 64)
        windowed = http.get(ct.wado_uri + "&windowCenter=40&windowWidth=400")
        assert windowed.status_code == 200 and windowed.content != plain.content
        low = http.get(ct.wado_uri + "&imageQuality=10")
        assert len(low.content) < len(plain.content)
        assert (
            http.get(ct.wado_uri + "&contentType=image/gif,image/png;q=0.5").headers["content-type"]
            == "image/png"
        )
        # Ignored parameters are named in a Warning header; bad values of known ones are 400.
        answer = http.get(ct.wado_uri + "&_=123&charset=UTF-8")
        assert answer.status_code == 200
        assert answer.headers["warning"].startswith("299 ") and "'_'" in answer.headers["warning"]
        for bad in ("&anonymize=yes", "&windowCenter=40", "&rows=0", "&frameNumber=x", "&imageQuality=101"):
            assert http.get(ct.wado_uri + bad).status_code == 400, bad
        assert http.get(ct.wado_uri.replace("requestType=WADO", "requestType=WADX")).status_code == 400
        assert http.get(ct.wado_uri.replace("&objectUID=", "&objectUID=1.2.")).status_code == 404
        assert http.get(ct.wado_uri + "&contentType=image/gif").status_code == 406
        # An instance without pixel data: application/dicom by default; an image of it is 406.
        sr = files["sr"]
        answer = http.get(sr.wado_uri)
        assert answer.headers["content-type"] == "application/dicom" and answer.content[128:] == sr.data[128:]
        assert http.get(sr.wado_uri + "&contentType=image/jpeg").status_code == 406
        # A share link reaches its own study only.
        share = http.post(f"/studies/{jpeg.ds.StudyInstanceUID}/shares", json={"expires_in_seconds": 600})
        assert share.status_code in (200, 201), share.text
        token = share.json()["token"]
    with client(live, token=token) as shared:
        assert shared.get(jpeg.wado_uri).status_code == 200
        assert shared.get(ct.wado_uri).status_code in (403, 404)


# -- rendered: window, viewport, quality --------------------------------------------------------------


def test_rendered_window_viewport_and_quality(stored: tuple[LiveService, dict[str, Stored]]) -> None:
    live, files = stored
    ct = files["ct"]
    with client(live) as http:
        plain = http.get(ct.path + "/rendered")
        assert plain.status_code == 200
        for window in ("40,400", "40,400,linear_exact", "40,400,SIGMOID"):
            answer = http.get(ct.path + "/rendered", params={"window": window})
            assert answer.status_code == 200 and answer.content != plain.content, window
        assert (
            http.get(ct.path + "/rendered", params={"window": "40,400,sigmoid"}).content
            != http.get(ct.path + "/rendered", params={"window": "40,400,linear"}).content
        )
        small = http.get(ct.path + "/rendered", params={"viewport": "64,64"})
        assert Image.open(io.BytesIO(small.content)).size == (64, 64)
        wide = http.get(ct.path + "/rendered", params={"viewport": "100,50"})
        assert Image.open(io.BytesIO(wide.content)).size == (50, 50)  # aspect ratio kept
        region = http.get(ct.path + "/frames/1/rendered", params={"viewport": "32,16,0,0,128,-64"})
        assert Image.open(io.BytesIO(region.content)).size == (32, 16)
        thumbnail = http.get(ct.path + "/thumbnail", params={"viewport": "48,48"})
        assert Image.open(io.BytesIO(thumbnail.content)).size == (48, 48)
        low = http.get(ct.path + "/rendered", params={"quality": "5"})
        assert len(low.content) < len(plain.content)
        bad_values = (
            {"window": "40"}, {"window": "40,0"}, {"window": "a,b"}, {"window": "40,400,cubic"},
            {"viewport": "0,10"}, {"viewport": "10"}, {"viewport": "10,10,500,500,10,10"},
        )  # fmt: skip
        for bad in bad_values:
            assert http.get(ct.path + "/rendered", params=bad).status_code == 400, bad
        # Colour images render too, with a viewport.
        jpeg = files["jpeg"]
        answer = http.get(
            jpeg.path + "/rendered", params={"viewport": "50,50"}, headers={"Accept": "image/png"}
        )
        assert answer.status_code == 200 and Image.open(io.BytesIO(answer.content)).size == (50, 50)


# -- QIDO: fuzzy matching, ignored keys -----------------------------------------------------------------


def test_fuzzy_names_and_ignored_query_keys(stored: tuple[LiveService, dict[str, Stored]]) -> None:
    live, files = stored
    ct_study = files["ct"].ds.StudyInstanceUID
    with client(live) as http:
        assert http.get("/studies", params={"PatientName": "ct1"}).json() == []
        found = http.get("/studies", params={"PatientName": "ct1", "fuzzymatching": "true"}).json()
        assert [s["0020000D"]["Value"][0] for s in found] == [ct_study]
        found = http.get("/studies", params={"PatientName": "compressed", "fuzzymatching": "true"}).json()
        assert len(found) == 3  # CT1, NM1, MR1
        # OHIF's study list request, with a cache buster.
        answer = http.get(
            "/studies",
            params={"limit": "101", "offset": "0", "fuzzymatching": "false", "_": "123",
                    "includefield": "00081030,00080060,00080090,00100030,00101010", "PatientWeight": "70"},
        )  # fmt: skip
        assert answer.status_code == 200 and len(answer.json()) == 5
        warning = answer.headers["warning"]
        assert warning.startswith("299 127.0.0.1:") and "'_'" in warning and "PatientWeight" in warning
        assert "includefield '00101010'" in warning
        assert "warning" not in http.get("/studies", params={"PatientID": "x"}).headers
        for bad in ({"StudyDate": "2020"}, {"limit": "-1"}, {"fuzzymatching": "maybe"}):
            assert http.get("/studies", params=bad).status_code == 400, bad
