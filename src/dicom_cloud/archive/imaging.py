"""Pixel data out of an instance: raw frames (WADO-RS ``/frames``) and consumer pictures
(``/rendered``, ``/thumbnail``: JPEG or PNG).

Decoding goes through pydicom's pixel handlers and the decoders of the service extra: Pillow (8-bit
JPEG baseline and extended), pylibjpeg-openjpeg (JPEG 2000, HTJ2K), pyjpegls (JPEG-LS),
pylibjpeg-rle (RLE). JPEG lossless and 12-bit JPEG extended need the GPL decoder of the jpeg-gpl
extra (pylibjpeg-libjpeg); without it they are refused as not supported, naming the extra.

Rendering applies, in order: the modality LUT
(rescale slope/intercept), the window asked for (:class:`Window`, PS3.18 §8.3.5.1.2: the VOI
LUT functions LINEAR, LINEAR_EXACT and SIGMOID of PS3.3 C.11.2.1.2 straight to 8 bits) or else
the first VOI window of the instance (or the frame's full range when it has none) and a min/max
stretch to 8 bits, and inversion of MONOCHROME1; colour images are converted to RGB (palette
colour through its LUT) and never windowed. Then the viewport (:class:`Viewport`, §8.3.5.1.3):
the source region cut out (flipped when its width or height is negative) and scaled to fit the
viewport, keeping its aspect ratio. These are CPU-bound: callers run them in a worker thread.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import wraps
from io import BytesIO
from typing import Any, Final, Literal, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID

from ..errors import DicomCloudError, DicomFormatError, NotFoundError, NotSupportedError, UsageError

MediaType = Literal["image/jpeg", "image/png"]
MEDIA_TYPES: Final[tuple[MediaType, ...]] = ("image/jpeg", "image/png")
_EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"
WindowFunction = Literal["linear", "linear_exact", "sigmoid"]
_WINDOW_FUNCTIONS: Final[tuple[WindowFunction, ...]] = ("linear", "linear_exact", "sigmoid")
#: The largest viewport side rendered (a bound on the memory of one picture).
MAX_VIEWPORT: Final = 4096


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{what} must be a number") from None
    if not math.isfinite(value):
        raise UsageError(f"{what} must be a finite number")
    return value


@dataclass(frozen=True)
class Window:
    """A VOI window asked for by the client: centre, width and function (PS3.3 C.11.2.1.2)."""

    center: float
    width: float
    function: WindowFunction = "linear"

    def __post_init__(self) -> None:
        if self.function not in _WINDOW_FUNCTIONS:
            raise UsageError("the window function is one of linear, linear_exact, sigmoid")
        if self.width < (1 if self.function == "linear" else 0) or self.width == 0:
            raise UsageError(
                "the window width must be at least 1 (linear) or above 0 (linear_exact, sigmoid)"
            )

    @classmethod
    def parse(cls, text: str) -> Window:
        """``center,width[,function]`` (PS3.18 §8.3.5.1.2; the function is case-insensitive)."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) not in (2, 3):
            raise UsageError("window is center,width[,function]", hint="e.g. window=40,400,linear")
        function = parts[2].lower() if len(parts) == 3 else "linear"
        if function not in _WINDOW_FUNCTIONS:
            raise UsageError("the window function is one of linear, linear_exact, sigmoid")
        return cls(_number(parts[0], "the window center"), _number(parts[1], "the window width"), function)  # type: ignore[arg-type]

    def apply(self, values: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        """Values (after the modality LUT) -> 0..255."""
        x = values.astype(np.float64)
        c, w = self.center, self.width
        if self.function == "sigmoid":
            y = 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
        elif self.function == "linear_exact":
            y = ((x - c) / w + 0.5) * 255.0
        elif w == 1:
            y = np.where(x > c - 0.5, 255.0, 0.0)
        else:
            y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
        return np.clip(np.round(y), 0, 255).astype(np.uint8)

    @property
    def label(self) -> str:
        return f"w{self.center!r}_{self.width!r}_{self.function}"  # repr: exact, no two share a name


@dataclass(frozen=True)
class Viewport:
    """The rendered picture's size and the source region shown in it (PS3.18 §8.3.5.1.3)."""

    width: int
    height: int
    #: (sx, sy, sw, sh): top-left corner and size of the region in the frame's pixels; a
    #: negative sw or sh flips the picture; None: the whole frame.
    region: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if not (1 <= self.width <= MAX_VIEWPORT and 1 <= self.height <= MAX_VIEWPORT):
            raise UsageError(f"the viewport sides are 1 to {MAX_VIEWPORT} pixels")
        if self.region is not None and (self.region[2] == 0 or self.region[3] == 0):
            raise UsageError("the viewport's source region is empty")

    @classmethod
    def parse(cls, text: str) -> Viewport:
        """``vw,vh`` or ``vw,vh,sx,sy,sw,sh`` (integers)."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) not in (2, 6) or not all(
            p.lstrip("+-").isascii() and p.lstrip("+-").isdigit() and len(p) <= 9 for p in parts
        ):
            raise UsageError(
                "viewport is vw,vh or vw,vh,sx,sy,sw,sh (integers)", hint="e.g. viewport=256,256"
            )
        numbers = [int(p) for p in parts]
        region = (numbers[2], numbers[3], numbers[4], numbers[5]) if len(numbers) == 6 else None
        return cls(numbers[0], numbers[1], region)

    @property
    def label(self) -> str:
        region = "" if self.region is None else "_" + "_".join(str(n) for n in self.region)
        return f"v{self.width}x{self.height}{region}"


P = ParamSpec("P")
R = TypeVar("R")


def _typed_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Whatever pydicom, numpy or Pillow raise on a malformed instance becomes DicomFormatError
    (the type name only: messages may quote values)."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except DicomCloudError:
            raise
        except Exception as exc:
            raise DicomFormatError("unreadable pixel data", detail=type(exc).__name__) from None

    return wrapper


def _dataset(data: bytes) -> Dataset:
    try:
        return dcmread(BytesIO(data))
    except Exception as exc:
        raise DicomFormatError("unreadable instance", detail=type(exc).__name__) from None


def frame_count(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def _check_numbers(numbers: Sequence[int], count: int) -> None:
    if not numbers:
        raise UsageError("no frame number given")
    for n in numbers:
        if not 1 <= n <= count:
            raise UsageError(f"frame {n} does not exist: the instance has {count} frame(s)")


@_typed_errors
def extract_frames(data: bytes, numbers: Sequence[int]) -> tuple[str, list[bytes], bool]:
    """(transfer syntax, frames, encapsulated) for the 1-based frame ``numbers`` of an instance."""
    ds = _dataset(data)
    if "PixelData" not in ds:
        raise NotFoundError("the instance has no pixel data")
    count = frame_count(ds)
    _check_numbers(numbers, count)
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", _EXPLICIT_LE)))
    pixel_data: bytes = ds.PixelData
    if syntax.is_encapsulated:
        frames = list(generate_frames(pixel_data, number_of_frames=count))
        return str(syntax), [frames[n - 1] for n in numbers], True
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.BitsAllocated)
    if (rows * columns * samples * bits) % 8:
        raise NotSupportedError("frames of bit-packed pixel data that are not byte aligned")
    length = rows * columns * samples * bits // 8
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        length = length * 2 // 3  # two chroma samples shared by each pair of pixels
    frames = [pixel_data[(n - 1) * length : n * length] for n in numbers]
    if any(len(f) != length for f in frames):
        raise DicomFormatError("truncated in the pixel data")
    # Native data of a little-endian (or deflated) syntax reads as Explicit VR Little Endian.
    out_syntax = str(syntax) if syntax == "1.2.840.10008.1.2.2" else _EXPLICIT_LE
    return out_syntax, frames, False


@_typed_errors
def element_bytes(data: bytes, tag: int) -> bytes | None:
    """The raw value of a top-level element of an instance (bulk data retrieval); None if absent."""
    ds = _dataset(data)
    if tag not in ds:
        return None
    value = ds[tag].value
    if isinstance(value, bytes):
        return value
    raise UsageError("the element is not bulk data (its value is in the metadata)")


def _to_uint8(arr: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    arr = arr.astype(np.float64)
    low, high = float(arr.min()), float(arr.max())
    if high <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    return ((arr - low) * (255.0 / (high - low))).round().clip(0, 255).astype(np.uint8)


#: JPEG lossless (processes 14 and 14 SV1): only libjpeg (GPL-3.0) or GDCM decode them.
_LOSSLESS_JPEG: Final = frozenset({"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"})
_JPEG_EXTENDED: Final = "1.2.840.10008.1.2.4.51"


def _check_gpl_decoder(ds: Dataset) -> None:
    """JPEG lossless, and JPEG extended of more than 8 bits (Pillow decodes only 8), need libjpeg."""
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    needs = syntax in _LOSSLESS_JPEG or (syntax == _JPEG_EXTENDED and int(ds.get("BitsStored", 8) or 8) > 8)
    if needs and not (_importable("libjpeg") or _importable("gdcm")):
        raise NotSupportedError(
            f"decoding pixel data in transfer syntax {syntax} needs the 'jpeg-gpl' extra (GPL-3.0), "
            "which is not installed",
            hint="pip install 'dicom-cloud[jpeg-gpl]' (docs/packaging.md)",
        )


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _frame_pixels(ds: Dataset, index: int, window: Window | None = None) -> npt.NDArray[np.uint8]:
    from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
    from pydicom.pixels.utils import pixel_array

    _check_gpl_decoder(ds)
    try:
        arr = pixel_array(ds, index=index)
    except NotImplementedError as exc:
        raise NotSupportedError(
            f"cannot decode pixel data in transfer syntax {ds.file_meta.get('TransferSyntaxUID')}"
        ) from exc
    except Exception as exc:
        raise DicomFormatError("undecodable pixel data", detail=type(exc).__name__) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        return _to_uint8(apply_color_lut(arr, ds))
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour, already RGB (pydicom converts YBR)
        return arr[..., :3].astype(np.uint8) if arr.dtype == np.uint8 else _to_uint8(arr[..., :3])
    if arr.ndim != 2:
        raise NotSupportedError(f"cannot render pixel data of shape {arr.shape}")
    values = apply_modality_lut(arr, ds)
    if window is not None:
        out = window.apply(values)
        return 255 - out if photometric == "MONOCHROME1" else out
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        with suppress(Exception):  # a malformed window: fall back to the full range
            values = apply_voi_lut(values, ds, index=0)
    out = _to_uint8(values)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


@_typed_errors
def render_frame(
    data: bytes,
    frame: int,
    media_type: str,
    *,
    max_size: int | None = None,
    quality: int = 90,
    window: Window | None = None,
    viewport: Viewport | None = None,
) -> tuple[bytes, int, int]:
    """(picture bytes, width, height) of frame ``frame`` (1-based); ``max_size`` bounds the
    longer side (thumbnails) unless a ``viewport`` is given."""
    from PIL import Image

    if media_type not in MEDIA_TYPES:
        raise NotSupportedError(f"cannot render as '{media_type}'", hint="ask for image/jpeg or image/png")
    if not 1 <= quality <= 100:
        raise UsageError("quality must be between 1 and 100")
    ds = _dataset(data)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise NotFoundError("the instance has no pixel data")
    _check_numbers([frame], frame_count(ds))
    pixels = _frame_pixels(ds, frame - 1, window)
    image = Image.fromarray(pixels, mode="RGB" if pixels.ndim == 3 else "L")
    if viewport is not None:
        image = _fit(image, viewport)
    elif max_size is not None:
        image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    out = BytesIO()
    if media_type == "image/jpeg":
        image.save(out, format="JPEG", quality=quality)
    else:
        image.save(out, format="PNG", optimize=False)
    return out.getvalue(), image.width, image.height


def _fit(image: Any, viewport: Viewport) -> Any:
    """The viewport's source region of ``image``, flipped as asked, scaled to fit the viewport
    with its aspect ratio kept (a PIL image)."""
    from PIL import Image, ImageOps

    if viewport.region is not None:
        sx, sy, sw, sh = viewport.region
        box = (max(sx, 0), max(sy, 0), min(sx + abs(sw), image.width), min(sy + abs(sh), image.height))
        if box[2] <= box[0] or box[3] <= box[1]:
            raise UsageError("the viewport's source region lies outside the frame")
        image = image.crop(box)
        if sw < 0:
            image = ImageOps.mirror(image)
        if sh < 0:
            image = ImageOps.flip(image)
    scale = min(viewport.width / image.width, viewport.height / image.height)
    size = (max(1, min(viewport.width, round(image.width * scale))),
            max(1, min(viewport.height, round(image.height * scale))))  # fmt: skip
    return image.resize(size, Image.Resampling.LANCZOS) if size != image.size else image
