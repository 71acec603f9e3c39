"""Reading and writing images for the runtime.

Reading (`read_image`): PNG, JPEG, WebP, TIFF and BMP through Pillow, with the EXIF orientation
applied. The result is a float32 array [H, W, C] in [0, 1] where C is 1 (grey), 2 (grey + alpha),
3 (RGB) or 4 (RGBA), plus an `ImageInfo`. 16-bit PNG and TIFF keep their 16 bits: Pillow decodes
16-bit grey natively, but has no 16-bit RGB mode, so

* 16-bit RGB/RGBA PNG is decoded twice by Pillow's own PNG decoder, once keeping the high byte of
  every sample and once the low byte (its "RGB;16B"/"RGB;16L" unpackers), and the two are joined;
  16-bit grey + alpha PNG is decoded as 8-bit RGBA of the same width (same row and pixel
  byte layout, so PNG's filters undo identically) and each byte pair is joined;
* 16-bit multi-channel TIFF is read with tifffile (a dependency of scikit-image).

Every failure to read becomes an `ImageReadError` that names the file and the reason; an image
over the pixel limit becomes an `ImageTooLargeError` (a subclass) that names the size and the
`--max-megapixels` option.

Physical resolution: `read_image` gives the pixels per inch the file states (PNG pHYs, JPEG JFIF density or
else EXIF, TIFF resolution tags, BMP header, WebP EXIF; None where it states none, or only an aspect ratio) and
`write_image(dpi=)` writes it to the same places, so an upscaled image can keep its print size.

Writing (`write_image`): the format comes from the file extension. The write is atomic: the
bytes go to an unnamed O_TMPFILE file in the destination folder (Linux) or, where that is not
available, to a hidden temporary file there; it is fsynced and only then linked to its name
(no-clobber link, so an existing file is never replaced unless `overwrite=True`). A process
killed mid-write leaves no file under the destination name (and, with O_TMPFILE, no file at all).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import math
import numbers
import os
import re
import shutil
import struct
import sys
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from .cli import PARTIAL_SUFFIX, new_partial_file, partial_name

DEFAULT_MAX_MEGAPIXELS = 64.0

# Pillow format name -> our name, for the formats we read.
READ_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "TIFF": "tiff", "BMP": "bmp"}
# File extension -> output format.
WRITE_FORMATS = {
    ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".tif": "tiff", ".tiff": "tiff", ".bmp": "bmp",
}
IMAGE_EXTENSIONS = frozenset(WRITE_FORMATS)  # what a folder scan picks up
FORMAT_EXTENSION = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", "webp": ".webp", "tiff": ".tif", "tif": ".tif",
                    "bmp": ".bmp"}
ALPHA_FORMATS = frozenset({"png", "webp", "tiff"})  # BMP alpha is not read back reliably
SIXTEEN_BIT_FORMATS = frozenset({"png", "tiff"})

_EXIF_ORIENTATION = 0x0112
_X_RESOLUTION, _Y_RESOLUTION, _RESOLUTION_UNIT = 0x011A, 0x011B, 0x0128  # TIFF and EXIF tags
_INCH, _CENTIMETRE = 2, 3  # ResolutionUnit values; 1 means an aspect ratio only (no unit), 2 is the default
_CENTIMETRES_PER_INCH = 2.54
_METRES_PER_INCH = 0.0254


class ImageReadError(Exception):
    """A file could not be read as an image; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class ImageTooLargeError(ImageReadError):
    """The image has more pixels than the decompression-bomb limit allows. `over_limit` says by how much; the
    reason adds how the runtime's user raises the limit."""

    def __init__(self, path: str | os.PathLike, over_limit: str):
        self.over_limit = over_limit
        super().__init__(path, f"{over_limit} (raise it with --max-megapixels / max_megapixels=)")


class ImageWriteError(Exception):
    """A file could not be written; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot write image {self.path}: {reason}")


class OutputFormatWarning(UserWarning):
    """The output format cannot hold all of the image: its alpha channel or its 16 bits are dropped."""


class OutputExistsError(ImageWriteError, FileExistsError):
    """The destination exists and overwrite was not asked for."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, "the file already exists (pass overwrite=True / --overwrite to replace it)")


@dataclass(frozen=True)
class ImageInfo:
    """What the writer needs to give an output the input's layout back."""

    path: str | None
    format: str | None  # 'png', 'jpeg', 'webp', 'tiff', 'bmp'; None for in-memory arrays
    mode: str  # 'L', 'LA', 'RGB' or 'RGBA': the layout of the returned array's channels
    bit_depth: int  # 8 or 16
    width: int
    height: int
    icc_profile: bytes | None = None
    dpi: tuple[float, float] | None = None  # (horizontal, vertical) pixels per inch of the returned array

    @property
    def has_alpha(self) -> bool:
        return self.mode in ("LA", "RGBA")

    @property
    def channels(self) -> int:
        return len(self.mode)


# --------------------------------------------------------------------------------------------- read


def read_image(path: str | os.PathLike,
               max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS) -> tuple[np.ndarray, ImageInfo]:
    """Read an image file into a float32 [H, W, C] array in [0, 1] (C = len(info.mode)).

    `max_megapixels` (None: no limit) is checked from the header, before anything is decoded.
    """
    path = Path(path)
    max_pixels = _prepare_read(path, max_megapixels)
    with _read_errors(path, max_pixels), _pillow_pixel_limit(max_pixels):
        if _is_16bit_multisample_tiff(path):
            # Pillow has no 16-bit RGB / grey + alpha modes; tifffile reads these exactly.
            array, mode, orientation, icc, dpi = _read_tiff_16bit(path, max_pixels)
            depth, fmt = 16, "tiff"
        else:
            with _open_with_pillow(path) as image:
                _check_format_and_size(path, image.format, image.size, max_pixels, getattr(image, "n_frames", 1),
                                       image.mode)
                fmt = READ_FORMATS[image.format]
                # Decide before getexif(), which loads a PNG (and so empties its tile list).
                png_rawmode = image.tile[0].args if image.format == "PNG" and image.tile else None
                if png_rawmode in _PNG16_RAWMODES:
                    array, mode, depth = _read_png_16bit_color(path, png_rawmode, image.info.get("transparency"))
                else:
                    array, mode, depth = _pillow_to_array(image)
                orientation = _orientation(image)
                icc = image.info.get("icc_profile")
                dpi = _pillow_dpi(image)
    array = _apply_orientation(array, orientation)
    if dpi is not None and orientation >= 5:  # turned by a quarter: the axes swap
        dpi = dpi[::-1]
    icc = _profile_of_mode(icc, mode)
    scale = 65535.0 if depth == 16 else 255.0
    out = array.astype(np.float32)
    out /= scale
    height, width = out.shape[:2]
    info = ImageInfo(path=str(path), format=fmt, mode=mode, bit_depth=depth,
                     width=width, height=height, icc_profile=icc, dpi=dpi)
    return out, info


def check_image_header(path: str | os.PathLike,
                       max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS) -> tuple[int, int]:
    """Raise what `read_image` would for a missing, unrecognised, unsupported or too large file, from
    its header alone (nothing is decoded, so corrupt pixel data is found only by `read_image`).

    Returns the (width, height) the header gives, before any EXIF orientation.
    """
    path = Path(path)
    max_pixels = _prepare_read(path, max_megapixels)
    with _read_errors(path, max_pixels), _pillow_pixel_limit(max_pixels):
        if _is_16bit_multisample_tiff(path):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                size = (page.imagewidth, page.imagelength)
                _check_format_and_size(path, "TIFF", size, max_pixels, len(tif.pages))
        else:
            with _open_with_pillow(path) as image:
                size = image.size
                _check_format_and_size(path, image.format, size, max_pixels, getattr(image, "n_frames", 1),
                                       image.mode)
    return size


def _prepare_read(path: Path, max_megapixels: float | None) -> int | None:
    """Refuse a path that is missing, a folder or empty; returns the limit in pixels."""
    if not path.exists():
        raise ImageReadError(path, "no such file")
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not a file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    return None if max_megapixels is None else int(max_megapixels * 1_000_000)


@contextlib.contextmanager
def _open_with_pillow(path: Path) -> Iterator[Image.Image]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit replaces Pillow's warning
        with Image.open(path) as image:
            yield image


@contextlib.contextmanager
def _read_errors(path: Path, max_pixels: int | None) -> Iterator[None]:
    """Every failure to read `path` as an ImageReadError that names the file and the reason."""
    try:
        yield
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fires in Image.open, before our check, for images over twice its limit
        # (which we raise to ours when ours is higher, so this image is over our limit too).
        limit = "no limit" if max_pixels is None else f"the limit of {max_pixels / 1e6:g} megapixels"
        size = re.search(r"Image size \((\d+) pixels\)", str(exc))  # Pillow's wording, which names its own limit
        what = f"{int(size.group(1)) / 1e6:g} megapixels" if size else f"too large for Pillow ({exc})"
        raise ImageTooLargeError(path, f"{what}, over {limit}") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(path, "not a recognised image file (unknown format or corrupt header)") from exc
    except ImageCms.PyCMSError as exc:
        raise ImageReadError(path, f"its embedded ICC profile cannot convert its colours to RGB ({exc})") from exc
    except PermissionError as exc:
        raise ImageReadError(path, f"permission denied ({exc.strerror})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        # Pillow reports truncated/corrupt data as OSError ("image file is truncated",
        # "broken data stream"), SyntaxError (bad PNG chunk) or ValueError; tifffile as ValueError.
        raise ImageReadError(path, f"corrupt or truncated image data ({type(exc).__name__}: {exc})") from exc


@contextlib.contextmanager
def _pillow_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Our limit is the one that counts: Pillow's global bomb limit is raised to it for one read, then restored.

    Pillow refuses images over 2 x Image.MAX_IMAGE_PIXELS when it opens them; a caller who asks for
    a higher limit than that must get it, and nothing else in the process may lose Pillow's guard.
    """
    saved = Image.MAX_IMAGE_PIXELS
    if saved is not None and (max_pixels is None or 2 * saved < max_pixels):
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _check_format_and_size(path: Path, fmt: str | None, size: tuple[int, int], max_pixels: int | None,
                           frames: int, pillow_mode: str | None = None) -> None:
    if fmt not in READ_FORMATS:
        raise ImageReadError(path, f"unsupported format {fmt} (supported: PNG, JPEG, WebP, TIFF, BMP)")
    if frames > 1 and fmt != "MPO":  # an MPO's first image is the photo, the others its previews or depth maps
        raise ImageReadError(path, f"{frames} frames (an animation or a multi-page file); only single images are "
                                   f"upscaled, and writing the first frame alone would lose the others")
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            path,
            f"{width}x{height} = {width * height / 1e6:.1f} megapixels is over the limit of "
            f"{max_pixels / 1e6:g} megapixels",
        )
    if pillow_mode == "F":
        raise ImageReadError(path, "floating-point pixels (Pillow mode F) are not supported: their value range is "
                                   "undefined")


def _orientation(image: Image.Image) -> int:
    value = image.getexif().get(_EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an [H, W, C] array the way EXIF orientation 1..8 says (same result as ImageOps.exif_transpose)."""
    if orientation == 2:
        array = array[:, ::-1]
    elif orientation == 3:
        array = array[::-1, ::-1]
    elif orientation == 4:
        array = array[::-1]
    elif orientation == 5:
        array = array.transpose(1, 0, 2)
    elif orientation == 6:
        array = np.rot90(array, k=-1)
    elif orientation == 7:
        array = array[::-1, ::-1].transpose(1, 0, 2)
    elif orientation == 8:
        array = np.rot90(array, k=1)
    return np.ascontiguousarray(array)


_PROFILE_COLOUR_SPACES = {"L": b"GRAY", "LA": b"GRAY", "RGB": b"RGB ", "RGBA": b"RGB "}


def _profile_of_mode(icc: bytes | None, mode: str) -> bytes | None:
    """`icc` when it describes pixels of `mode` (its header's colour space), else None: a CMYK profile no longer
    describes the pixels once they are converted to RGB, and an RGB image tagged with it would be misread."""
    if icc is None or icc[16:20] != _PROFILE_COLOUR_SPACES[mode]:
        return None
    return icc


def _pillow_dpi(image: Image.Image) -> tuple[float, float] | None:
    """The pixels per inch a file opened by Pillow states, or None. Pillow's own info["dpi"] serves PNG (pHYs in
    metres) and BMP; for JPEG and TIFF it is not used, because Pillow reports 72 for a JPEG whose EXIF has no
    resolution and 1 for a TIFF without resolution tags, where the file states nothing."""
    if image.format in ("JPEG", "MPO") and image.info.get("jfif_unit") in (1, 2):
        per_unit = 1.0 if image.info["jfif_unit"] == 1 else _CENTIMETRES_PER_INCH
        return _positive_dpi(tuple(value * per_unit for value in image.info["jfif_density"]))
    if image.format in ("JPEG", "MPO", "WEBP", "TIFF"):
        tags = image.tag_v2 if image.format == "TIFF" else image.getexif()
        return _tagged_dpi(tags.get(_X_RESOLUTION), tags.get(_Y_RESOLUTION), tags.get(_RESOLUTION_UNIT, _INCH))
    return _positive_dpi(image.info.get("dpi"))


def _tagged_dpi(x, y, unit) -> tuple[float, float] | None:
    """TIFF / EXIF XResolution, YResolution and ResolutionUnit as pixels per inch, or None when one is missing (or
    not a single number) or the unit is not a length."""
    if not (isinstance(x, numbers.Real) and isinstance(y, numbers.Real)) or unit not in (_INCH, _CENTIMETRE):
        return None
    per_unit = 1.0 if unit == _INCH else _CENTIMETRES_PER_INCH
    return _positive_dpi((float(x) * per_unit, float(y) * per_unit))


def _positive_dpi(dpi: tuple[float, float] | None) -> tuple[float, float] | None:
    """`dpi` as floats when both are finite and positive (a zero or broken rational states no size), else None."""
    if dpi is None:
        return None
    values = tuple(float(value) for value in dpi)
    return values if all(math.isfinite(value) and value > 0 for value in values) else None


def pillow_pixels(image: Image.Image) -> np.ndarray:
    """A Pillow image's pixels as `read_image` lays them out, before scaling: uint8 [H, W, C] (C: 1 grey,
    2 grey + alpha, 3 RGB, 4 RGBA) or uint16 [H, W, 1] for 16- and 32-bit integer grey, turned upright by
    the image's EXIF orientation (`upright`)."""
    return upright(_pillow_to_array(image)[0], image)


def upright(array: np.ndarray, image: Image.Image) -> np.ndarray:
    """`array`, the [H, W, C] pixels of `image`, turned the way the image's EXIF orientation says, as `read_image`
    turns a file's. `ImageOps.exif_transpose` removes the tag from the image it returns, so its result stays as
    it is."""
    return _apply_orientation(array, _orientation(image))


def _pillow_to_array(image: Image.Image) -> tuple[np.ndarray, str, int]:
    """Decode with Pillow into uint8/uint16 [H, W, C] and our mode name."""
    image.load()  # decode errors surface here, not inside numpy's array conversion
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        array = np.asarray(image).astype(np.uint16)[..., None]
        if "transparency" in image.info:  # PNG tRNS: a grey level is transparent
            return _with_colour_key_alpha(array, image.info["transparency"]), "LA", 16
        return array, "L", 16
    if mode == "I":
        # 32-bit integer grey: what Pillow gives for some 16-bit grey files; anything wider is refused.
        array = np.asarray(image)
        if array.min() < 0 or array.max() > 65535:
            raise ImageReadError(getattr(image, "filename", "") or "(in-memory image)",
                                 f"32-bit integer samples outside 0..65535 are not supported "
                                 f"(range {array.min()}..{array.max()})")
        return array.astype(np.uint16)[..., None], "L", 16
    if mode in ("LA", "La") or (mode == "L" and "transparency" in image.info):  # tRNS: a grey value is transparent
        return np.asarray(image.convert("LA")), "LA", 8
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"))[..., None], "L", 8
    if mode in ("RGBA", "RGBa", "PA") or (mode in ("P", "RGB") and "transparency" in image.info):
        return np.asarray(image.convert("RGBA")), "RGBA", 8
    if mode == "CMYK" and image.info.get("icc_profile"):
        # Let the embedded profile do the CMYK -> RGB conversion when there is one.
        rgb = ImageCms.profileToProfile(image, io.BytesIO(image.info["icc_profile"]), ImageCms.createProfile("sRGB"),
                                        outputMode="RGB")
        return np.asarray(rgb), "RGB", 8
    return np.asarray(image.convert("RGB")), "RGB", 8


def _is_16bit_multisample_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.read(4) not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return False
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        return page.bitspersample == 16 and page.samplesperpixel > 1


def _read_tiff_16bit(path: Path,
                     max_pixels: int | None) -> tuple[np.ndarray, str, int, bytes | None, tuple[float, float] | None]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        _check_format_and_size(path, "TIFF", (page.imagewidth, page.imagelength), max_pixels, len(tif.pages))
        array = page.asarray()
        photometric = page.photometric
        extra = len(page.extrasamples)
        associated = extra > 0 and page.extrasamples[0] == tifffile.EXTRASAMPLE.ASSOCALPHA
        orientation_tag = page.tags.get("Orientation")
        icc_tag = page.tags.get("InterColorProfile")
        orientation = int(orientation_tag.value) if orientation_tag is not None else 1
        icc = bytes(icc_tag.value) if icc_tag is not None else None
        resolution = [_tiff_rational(page.tags.get(name)) for name in ("XResolution", "YResolution")]
        unit = page.tags.get("ResolutionUnit")
        dpi = _tagged_dpi(*resolution, int(unit.value) if unit is not None else _INCH)
    if array.ndim != 3 or array.dtype != np.uint16:
        raise ImageReadError(path, f"unsupported 16-bit TIFF layout (shape {array.shape}, dtype {array.dtype})")
    if photometric == tifffile.PHOTOMETRIC.MINISBLACK and array.shape[2] == 1 + extra:
        mode = "LA" if extra else "L"
    elif photometric == tifffile.PHOTOMETRIC.RGB and array.shape[2] == 3 + extra:
        mode = "RGBA" if extra else "RGB"
    else:
        raise ImageReadError(path, f"unsupported 16-bit TIFF ({photometric.name}, {array.shape[2]} samples)")
    array = array[..., : len(mode)]
    if associated:  # premultiplied colour: divided by alpha, as Pillow does for 8-bit RGBa
        alpha = array[..., -1:].astype(np.float64)
        colour = np.where(alpha > 0, array[..., :-1] * 65535.0 / np.maximum(alpha, 1), 0)
        array = np.concatenate([np.clip(np.rint(colour), 0, 65535).astype(np.uint16), array[..., -1:]], axis=-1)
    return array, mode, orientation if 1 <= orientation <= 8 else 1, icc, dpi


def _tiff_rational(tag) -> float | None:
    """A tifffile RATIONAL tag's (numerator, denominator) as a number (NaN for a zero denominator); None when absent
    or not one rational."""
    if tag is None or not (isinstance(tag.value, tuple) and len(tag.value) == 2):
        return None
    numerator, denominator = tag.value
    return numerator / denominator if denominator else math.nan


# Pillow's raw mode of a 16-bit colour PNG -> the mode we return it in.
_PNG16_RAWMODES = {"RGB;16B": "RGB", "RGBA;16B": "RGBA", "LA;16B": "LA"}


def _read_png_16bit_color(path: Path, rawmode: str,
                          colour_key: tuple[int, int, int] | None) -> tuple[np.ndarray, str, int]:
    """`colour_key`: the RGB of a tRNS chunk, which makes the pixels of exactly that colour transparent."""
    mode = _PNG16_RAWMODES[rawmode]
    if mode == "LA":
        # LA16 (4 bytes a pixel) has the byte layout of RGBA8: decode as RGBA8, then join byte pairs.
        raw = _decode_png_with_rawmode(path, "RGBA").astype(np.uint16)
        array = np.stack([raw[..., 0] << 8 | raw[..., 1], raw[..., 2] << 8 | raw[..., 3]], axis=-1)
        return array, "LA", 16
    high = _decode_png_with_rawmode(path, f"{mode};16B").astype(np.uint16)  # PNG is big-endian: ;16B keeps byte 0
    low = _decode_png_with_rawmode(path, f"{mode};16L")  # ;16L keeps byte 1 of each sample
    high <<= 8
    high |= low
    if mode == "RGB" and colour_key is not None:
        return _with_colour_key_alpha(high, colour_key), "RGBA", 16
    return high, mode, 16


def _with_colour_key_alpha(array: np.ndarray, colour_key: int | tuple[int, ...]) -> np.ndarray:
    """uint16 [H, W, C] -> [H, W, C + 1]: alpha 0 where the samples equal `colour_key` (PNG tRNS), else opaque."""
    opaque = np.any(array != np.asarray(colour_key, np.uint16).reshape(-1), axis=-1)
    alpha = np.where(opaque, np.uint16(65535), np.uint16(0))
    return np.concatenate([array, alpha[..., None]], axis=-1)


def _decode_png_with_rawmode(path: Path, rawmode: str) -> np.ndarray:
    with Image.open(path) as image:
        image.tile = [tile._replace(args=rawmode) for tile in image.tile]
        image.load()
        return np.asarray(image)


# -------------------------------------------------------------------------------------------- write


def output_format(path: str | os.PathLike) -> str:
    """'png', 'jpeg', 'webp', 'tiff' or 'bmp' from the extension; ValueError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in WRITE_FORMATS:
        raise ValueError(f"{path}: unknown output extension {suffix!r}; use one of {sorted(WRITE_FORMATS)}")
    return WRITE_FORMATS[suffix]


def to_integer(array: np.ndarray, bit_depth: int) -> np.ndarray:
    """float [0, 1] -> uint8 / uint16 with rounding (in bands, so no second float copy is made)."""
    if bit_depth not in (8, 16):
        raise ValueError(f"bit depth must be 8 or 16, not {bit_depth}")
    top = 255 if bit_depth == 8 else 65535
    out = np.empty(array.shape, np.uint8 if bit_depth == 8 else np.uint16)
    rows = max(1, (1 << 22) // max(1, array[0].size))
    for y in range(0, array.shape[0], rows):
        band = np.clip(array[y : y + rows], 0.0, 1.0) * top
        np.rint(band, out=band)
        out[y : y + rows] = band
    return out


def write_image(path: str | os.PathLike, array: np.ndarray, *, bit_depth: int = 8, overwrite: bool = False,
                quality: int = 95, icc_profile: bytes | None = None, dpi: tuple[float, float] | None = None) -> Path:
    """Write a float [H, W, C] array in [0, 1] (C = 1, 2, 3, 4) atomically; returns the path.

    16 bits are kept for PNG and TIFF (else 8); alpha is kept for PNG, WebP and TIFF and dropped
    for JPEG and BMP, each loss with an OutputFormatWarning. `quality` is the JPEG / WebP quality.
    `dpi` (horizontal, vertical pixels per inch) goes to PNG pHYs, JPEG JFIF density, TIFF resolution tags, the
    BMP header or WebP EXIF; one past what the format's field holds (`_RESOLUTION_FIELDS`: JPEG 65535 dpi) is
    dropped with an OutputFormatWarning; None writes no physical resolution.
    """
    path = Path(path)
    fmt = output_format(path)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an [H, W, C] array with C in 1..4, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"expected a float array in [0, 1], got {array.dtype} (divide uint8 pixels by 255, "
                        f"uint16 ones by 65535)")
    if fmt not in ALPHA_FORMATS and array.shape[2] in (2, 4):
        warnings.warn(f"{path}: {fmt.upper()} has no alpha channel; the alpha channel is dropped "
                      f"(PNG, WebP and TIFF keep it)", OutputFormatWarning, stacklevel=2)
        array = array[..., : array.shape[2] - 1]
    per_inch, largest = _RESOLUTION_FIELDS[fmt]
    if dpi is not None and round(max(dpi) * per_inch) > largest:
        warnings.warn(f"{path}: {fmt.upper()} holds at most {largest / per_inch:.0f} pixels per inch; the resolution "
                      f"{dpi[0]:g}x{dpi[1]:g} dpi is not written", OutputFormatWarning, stacklevel=2)
        dpi = None
    depth = bit_depth if fmt in SIXTEEN_BIT_FORMATS else 8
    if depth < bit_depth:
        warnings.warn(f"{path}: {fmt.upper()} holds 8 bits a channel; the {bit_depth}-bit image is written with 8 "
                      f"(PNG and TIFF keep 16)", OutputFormatWarning, stacklevel=2)
    if not overwrite and path.exists():
        raise OutputExistsError(path)
    if not path.parent.is_dir():
        raise ImageWriteError(path, f"the folder {path.parent} does not exist")
    pixels = to_integer(array, depth)
    with _atomic_file(path, overwrite) as stream:
        _encode(stream, pixels, fmt, quality, icc_profile, dpi)
    return path


# (field units per inch, the field's largest value) of each format's resolution: JFIF density in whole dots per inch,
# 16 bits (Pillow would write a larger one modulo 65536); PNG pHYs and the BMP header in pixels per metre, 32 bits
# (Pillow's BMP writer multiplies by 39.3701, a little more than 1 / 0.0254); TIFF and EXIF rationals, a 32-bit
# numerator. Past them the encoders raise, or write a number that reads back as another.
_RESOLUTION_FIELDS = {"jpeg": (1.0, 2**16 - 1), "png": (39.3701, 2**32 - 1), "bmp": (39.3701, 2**32 - 1),
                      "tiff": (1.0, 2**32 - 1), "webp": (1.0, 2**32 - 1)}


def _encode(stream, pixels: np.ndarray, fmt: str, quality: int, icc_profile: bytes | None,
            dpi: tuple[float, float] | None) -> None:
    channels = pixels.shape[2]
    if pixels.dtype == np.uint16 and (fmt == "tiff" and channels > 1):
        import tifffile

        photometric = "minisblack" if channels <= 2 else "rgb"
        extrasamples = ["unassalpha"] if channels in (2, 4) else None
        buffer = io.BytesIO()  # tifffile wants a file with a name; an O_TMPFILE has none
        tifffile.imwrite(buffer, pixels, photometric=photometric, extrasamples=extrasamples, compression="zlib",
                         iccprofile=icc_profile, resolution=dpi, resolutionunit="INCH" if dpi else None)
        stream.write(buffer.getbuffer())
        return
    if pixels.dtype == np.uint16 and fmt == "png" and channels > 1:
        _write_png_16bit(stream, pixels, icc_profile, dpi)
        return
    # uint16 [H, W] -> I;16 (16-bit grey PNG/TIFF); uint8 [H, W] / [H, W, 2|3|4] -> L / LA / RGB / RGBA
    image = Image.fromarray(np.ascontiguousarray(pixels[..., 0] if channels == 1 else pixels))
    options: dict = {}
    if icc_profile:
        options["icc_profile"] = icc_profile
    if dpi is not None and fmt != "webp":
        options["dpi"] = dpi
    if fmt == "jpeg":
        options.update(quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "webp":
        options.update(quality=quality, method=4)
        if dpi is not None:  # WebP has no resolution field of its own
            options["exif"] = _resolution_exif(dpi)
    elif fmt == "png":
        options.update(compress_level=6)
    elif fmt == "tiff":
        options.update(compression="tiff_deflate")
    elif fmt == "bmp":
        options.pop("icc_profile", None)
        options.setdefault("dpi", (0, 0))  # 0: unstated; Pillow's default would state 96 dpi
    pillow_format = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "tiff": "TIFF", "bmp": "BMP"}[fmt]
    image.save(stream, format=pillow_format, **options)


def _resolution_exif(dpi: tuple[float, float]) -> Image.Exif:
    exif = Image.Exif()
    exif[_X_RESOLUTION], exif[_Y_RESOLUTION] = dpi
    exif[_RESOLUTION_UNIT] = _INCH
    return exif


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _write_png_16bit(stream, pixels: np.ndarray, icc_profile: bytes | None,
                     dpi: tuple[float, float] | None) -> None:
    """16-bit grey+alpha / RGB / RGBA PNG (Pillow cannot write these). Every row uses the Sub filter."""
    height, width, channels = pixels.shape
    color_type = {2: 4, 3: 2, 4: 6}[channels]
    bytes_per_pixel = 2 * channels
    stream.write(b"\x89PNG\r\n\x1a\n")
    stream.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)))
    if icc_profile:
        stream.write(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc_profile)))
    if dpi is not None:  # pixels per metre, unit 1 (the metre)
        per_metre = (round(value / _METRES_PER_INCH) for value in dpi)
        stream.write(_png_chunk(b"pHYs", struct.pack(">IIB", *per_metre, 1)))
    compressor = zlib.compressobj(6)
    idat = bytearray()
    rows_per_step = max(1, (1 << 20) // (width * bytes_per_pixel))
    for y in range(0, height, rows_per_step):
        raw = pixels[y : y + rows_per_step].astype(">u2").reshape(-1, width * channels).view(np.uint8)
        filtered = np.empty((raw.shape[0], raw.shape[1] + 1), np.uint8)
        filtered[:, 0] = 1  # Sub: each byte minus the byte one pixel to the left (mod 256)
        filtered[:, 1 : 1 + bytes_per_pixel] = raw[:, :bytes_per_pixel]
        np.subtract(raw[:, bytes_per_pixel:], raw[:, :-bytes_per_pixel], out=filtered[:, 1 + bytes_per_pixel :])
        idat += compressor.compress(filtered.tobytes())
        while len(idat) >= 1 << 20:
            stream.write(_png_chunk(b"IDAT", bytes(idat[: 1 << 20])))
            del idat[: 1 << 20]
    idat += compressor.flush()
    stream.write(_png_chunk(b"IDAT", bytes(idat)))
    stream.write(_png_chunk(b"IEND", b""))


def stale_partial_files(path: str | os.PathLike) -> list[Path]:
    """Hidden temporaries of `path` left by a writer that was killed (only where O_TMPFILE is unavailable)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob_escape(path.name)}.*{PARTIAL_SUFFIX}"))


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def _atomic_file(path: Path, overwrite: bool):
    """Yield a binary stream whose bytes appear at `path` only once complete and fsynced.

    Linux: an O_TMPFILE file (no name, so a killed writer leaves nothing), linked to `path` when
    done. Elsewhere: a hidden `.NAME.XXXX.partial` file renamed into place (a killed writer
    leaves that hidden file behind; `stale_partial_files` finds it for cleanup).
    """
    folder = path.parent
    fd = _open_unnamed(folder)
    if fd is None:
        with _named_temp_file(path, overwrite) as stream:
            yield stream
        return
    with os.fdopen(fd, "w+b") as stream:
        yield stream
        stream.flush()
        os.fsync(fd)
        if not _link_unnamed(fd, path, overwrite):
            # This system lets nobody name an O_TMPFILE (no /proc, no privilege): copy to a named temporary.
            stream.seek(0)
            with _named_temp_file(path, overwrite) as named:
                shutil.copyfileobj(stream, named)
            return
    _fsync_folder(folder)


@contextlib.contextmanager
def _named_temp_file(path: Path, overwrite: bool):
    fd, temp = new_partial_file(path)
    try:
        with os.fdopen(fd, "w+b") as stream:
            yield stream
            stream.flush()
            os.fsync(fd)
        _publish_named(temp, path, overwrite)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # _publish_named may have removed it already
            os.unlink(temp)
        raise
    _fsync_folder(path.parent)


def _open_unnamed(folder: Path) -> int | None:
    """An O_TMPFILE descriptor in `folder` (nothing visible until linked), or None where unsupported."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None:
        return None
    try:
        return os.open(folder, flag | os.O_RDWR, 0o666)  # the kernel applies the umask
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):  # filesystem or kernel without O_TMPFILE
            return None
        raise


def _link_unnamed(fd: int, path: Path, overwrite: bool) -> bool:
    """Give the O_TMPFILE `fd` the name `path`; False where this system allows no way to."""
    if not overwrite:
        try:
            return _linkat(fd, path)  # atomic no-clobber
        except FileExistsError:
            raise OutputExistsError(path) from None
    # Overwrite: link the complete file under a hidden name beside it, then rename it over `path`.
    temp = partial_name(path)
    if not _linkat(fd, temp):
        return False
    try:
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise
    return True


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000


def _linkat(fd: int, dest: Path) -> bool:
    """linkat() an open O_TMPFILE to `dest`: True when done, FileExistsError when `dest` exists,
    False when this system permits neither the /proc route nor AT_EMPTY_PATH."""
    try:
        os.link(f"/proc/self/fd/{fd}", dest, follow_symlinks=True)
        return True
    except FileExistsError:
        raise
    except OSError as exc:
        # No /proc, or a /proc that is not this mount's (EXDEV): try AT_EMPTY_PATH below.
        if exc.errno not in (errno.ENOENT, errno.EXDEV, errno.EPERM, errno.EACCES):
            raise
    if _LIBC is None or not hasattr(_LIBC, "linkat"):
        return False
    if _LIBC.linkat(fd, b"", _AT_FDCWD, os.fsencode(dest), _AT_EMPTY_PATH) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), str(dest))
    if err in (errno.ENOENT, errno.EPERM, errno.EACCES, errno.EINVAL):  # AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH
        return False
    raise OSError(err, os.strerror(err), str(dest))


def _publish_named(temp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(temp, path)
        return
    try:
        os.link(temp, path)  # no-clobber
    except FileExistsError:
        os.unlink(temp)
        raise OutputExistsError(path) from None
    except OSError as exc:  # a filesystem without hard links: check, then rename
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        if path.exists():
            os.unlink(temp)
            raise OutputExistsError(path) from None
        os.replace(temp, path)
        return
    os.unlink(temp)


def _fsync_folder(folder: Path) -> None:
    """Make the new directory entry durable (POSIX); Windows cannot open a folder for fsync."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
