"""Transfer syntaxes out of the archive: which stored syntaxes it can decode, and instances and
frames transcoded to an uncompressed syntax.

The one decision of what can be decoded is :func:`can_decode`: a native (uncompressed) little
endian or deflated syntax always, a compressed one when pydicom has an available decoder for it
(pylibjpeg with its libjpeg, openjpeg and RLE plugins, pyjpegls for JPEG-LS, Pillow). What the
archive transcodes to is :data:`UNCOMPRESSED_TARGETS`: Explicit VR Little Endian and Implicit VR
Little Endian. Explicit VR Big Endian (retired) is sent only when it is the stored syntax: byte
swapping every binary value is more than a viewer has ever asked for.

Transcoding keeps the SOP Instance UID (the same instance in another encoding, PS3.5 §10), and
colour stored as YCbCr by a JPEG process comes out as RGB with Photometric Interpretation
``RGB`` (PS3.5 §8.2.1 lets a decoder do so): frames transcoded alone are RGB too, so that an
instance and its frames agree. Lossy Image Compression stays as stored.

Everything here is CPU-bound and holds one instance decoded: callers run it in a worker thread,
one instance at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO
from typing import Final

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from ..errors import DicomCloudError, DicomFormatError, NotFoundError, NotSupportedError

EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"
IMPLICIT_LE: Final = "1.2.840.10008.1.2"
EXPLICIT_BE: Final = "1.2.840.10008.1.2.2"
DEFLATED_LE: Final = "1.2.840.10008.1.2.1.99"
#: What the archive can transcode to.
UNCOMPRESSED_TARGETS: Final = (EXPLICIT_LE, IMPLICIT_LE)
#: Native syntaxes whose pixel data reads as little endian bytes once parsed.
_NATIVE_LE: Final = frozenset({EXPLICIT_LE, IMPLICIT_LE, DEFLATED_LE})


def can_decode(transfer_syntax_uid: str) -> bool:
    """Whether the archive can turn pixel data stored in ``transfer_syntax_uid`` into native
    little endian pixels (the one place this is decided)."""
    if transfer_syntax_uid in _NATIVE_LE:
        return True
    uid = UID(transfer_syntax_uid)
    if not uid.is_transfer_syntax or not uid.is_compressed:
        return False  # unknown syntaxes, and Explicit VR Big Endian (see the module docs)
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:  # no decoder exists for it at all
        return False


def can_transcode(stored: str, target: str) -> bool:
    """Whether an instance stored in ``stored`` can be sent in ``target``."""
    return target == stored or (target in UNCOMPRESSED_TARGETS and can_decode(stored))


def frames_syntax(stored: str) -> str:
    """The syntax frames of an instance stored in ``stored`` are in as stored: native little
    endian data (implicit, explicit, deflated) is Explicit VR Little Endian once cut into frames."""
    return EXPLICIT_LE if stored in _NATIVE_LE else stored


def _dataset(data: bytes) -> Dataset:
    try:
        return dcmread(BytesIO(data))
    except Exception as exc:
        raise DicomFormatError("unreadable instance", detail=type(exc).__name__) from None


def _stored_syntax(ds: Dataset) -> str:
    return str(ds.file_meta.get("TransferSyntaxUID", EXPLICIT_LE))


def _check_target(stored: str, target: str) -> None:
    if not can_transcode(stored, target):
        raise NotSupportedError(
            f"cannot send an instance stored in {stored} as {target}",
            hint=f"ask for transfer-syntax=* (as stored) or one of {', '.join(UNCOMPRESSED_TARGETS)}"
            if can_decode(stored)
            else "ask for transfer-syntax=* (as stored)",
        )


def transcode_instance(data: bytes, target: str) -> bytes:
    """The Part 10 bytes of the instance ``data`` in transfer syntax ``target`` (the same bytes
    when it is stored so). NotSupportedError when the archive cannot decode it."""
    ds = _dataset(data)
    stored = _stored_syntax(ds)
    if stored == target:
        return data
    _check_target(stored, target)
    try:
        if UID(stored).is_compressed and "PixelData" in ds:
            # pydicom writes the native pixels, fixes the pixel module (photometric, planar
            # configuration) and sets Explicit VR Little Endian in the file meta.
            ds.decompress(generate_instance_uid=False, as_rgb=True)
        ds.file_meta.TransferSyntaxUID = UID(target)
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
    except DicomCloudError:
        raise
    except NotImplementedError as exc:
        raise NotSupportedError(f"cannot decode pixel data in transfer syntax {stored}") from exc
    except Exception as exc:
        raise DicomFormatError("undecodable pixel data", detail=type(exc).__name__) from None
    return out.getvalue()


def decode_frames(data: bytes, numbers: Sequence[int], target: str) -> list[bytes]:
    """Frames ``numbers`` (1-based) of the instance ``data`` as native little endian pixel bytes
    (the bytes Explicit and Implicit VR Little Endian frames share), decoding one frame at a time."""
    from pydicom.pixels.utils import pixel_array

    ds = _dataset(data)
    if "PixelData" not in ds:
        raise NotFoundError("the instance has no pixel data")
    stored = _stored_syntax(ds)
    _check_target(stored, target)
    if int(ds.get("BitsAllocated") or 8) == 1:
        raise NotSupportedError("decoded frames of 1-bit pixel data")
    count = max(int(ds.get("NumberOfFrames") or 1), 1)
    frames = []
    for n in numbers:
        if not 1 <= n <= count:
            from ..errors import UsageError

            raise UsageError(f"frame {n} does not exist: the instance has {count} frame(s)")
        try:
            pixels = pixel_array(ds, index=n - 1, as_rgb=True)
        except NotImplementedError as exc:
            raise NotSupportedError(f"cannot decode pixel data in transfer syntax {stored}") from exc
        except Exception as exc:
            raise DicomFormatError("undecodable pixel data", detail=type(exc).__name__) from None
        frames.append(np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes())
    return frames
