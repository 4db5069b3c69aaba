"""Which transfer syntaxes need the GPL decoder (the jpeg-gpl extra), and the refusal without it."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicom_cloud.archive import imaging
from dicom_cloud.errors import NotSupportedError


def _dataset(name: str):  # type: ignore[no-untyped-def]
    path = get_testdata_file(name)
    assert path is not None, name
    return dcmread(path)


@pytest.mark.parametrize(
    ("name", "needs_gpl"),
    [
        ("SC_rgb_jpeg_dcmtk.dcm", False),  # JPEG baseline, 8 bits: Pillow
        ("SC_rgb_jpeg_gdcm.dcm", True),  # JPEG lossless SV1 (.70)
        ("JPGExtended.dcm", True),  # JPEG extended, 12 bits (.51)
        ("MR_small_jpeg_ls_lossless.dcm", False),  # JPEG-LS: pyjpegls
        ("MR_small_jp2klossless.dcm", False),  # JPEG 2000: pylibjpeg-openjpeg
        ("MR_small_RLE.dcm", False),  # RLE: pylibjpeg-rle or pydicom itself
    ],
)
def test_only_jpeg_lossless_and_12_bit_extended_need_the_gpl_decoder(
    name: str, needs_gpl: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imaging, "_importable", lambda module: False)
    ds = _dataset(name)
    if needs_gpl:
        with pytest.raises(NotSupportedError) as info:
            imaging._frame_pixels(ds, 0)
        assert info.value.hint is not None and "dicom-cloud[jpeg-gpl]" in info.value.hint
    else:
        imaging._check_gpl_decoder(ds)  # no refusal


def test_with_the_gpl_decoder_installed_they_decode() -> None:
    assert imaging._importable("libjpeg")  # the test environment installs the jpeg-gpl extra
    assert imaging._frame_pixels(_dataset("SC_rgb_jpeg_gdcm.dcm"), 0).shape == (100, 100, 3)
