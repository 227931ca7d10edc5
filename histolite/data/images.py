"""Reading images as 8-bit RGB, with explicit, documented conversions.

H&E classifiers expect colour: grayscale input is almost always a mistake (a mask, a wrong
channel), so it is rejected rather than silently replicated. Alpha is composited onto white (the
slide background), 16-bit data is scaled to 8 bit, palette images are expanded.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from histolite.errors import DataError


class UnsupportedImage(DataError):
    """Not an image format histolite reads (HTTP 415 when served)."""


class MultiFrameImage(UnsupportedImage):
    """An animation or a multi-page file: which frame was meant is unknown (HTTP 415)."""


class ImageTooLarge(DataError):
    """More pixels than allowed, e.g. a decompression bomb (HTTP 413 when served)."""


IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})
# Exactly the documented formats (TIFF goes through tifffile): Pillow would also decode BMP,
# WebP, ICO, TGA, GIF... and the error messages promise PNG, JPEG or TIFF.
PIL_FORMATS = ("PNG", "JPEG")


def is_image_file(path: Path) -> bool:
    """True for a visible file with a supported image extension."""
    return (
        path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _to_rgb_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    """Convert a decoded array to HxWx3 uint8 or raise naming the file and what was found."""
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 2)):
        raise DataError(
            f"{path}: grayscale image (shape {array.shape}); H&E classifiers need RGB colour images"
        )
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise DataError(f"{path}: unsupported image shape {array.shape}; expected HxWx3 RGB")
    if array.dtype == np.uint16:
        array = _to_8bit(array)
    elif array.dtype != np.uint8:
        raise DataError(f"{path}: unsupported pixel type {array.dtype}; expected 8- or 16-bit RGB")
    if array.shape[2] == 4:
        array = _flatten_alpha(array)
    return np.ascontiguousarray(array)


def _to_8bit(array: np.ndarray, rows: int = 256) -> np.ndarray:
    """16-bit to 8-bit, (v + 128) // 257 rounded exactly, a band of rows at a time: a uint32
    copy of a near-limit image costs gigabytes."""
    out = np.empty(array.shape, np.uint8)
    for start in range(0, array.shape[0], rows):
        band = array[start : start + rows].astype(np.uint32)
        band += 128
        band //= 257
        out[start : start + rows] = band
    return out


def _flatten_alpha(rgba: np.ndarray, rows: int = 256) -> np.ndarray:
    """RGBA onto white in integer arithmetic, a band of rows at a time.

    Float blending of a near-limit image costs gigabytes; uint16 bands cost a few megabytes
    over the output: (c * a + 255 * (255 - a) + 127) // 255, exact rounding.
    """
    out = np.empty((*rgba.shape[:2], 3), np.uint8)
    for start in range(0, rgba.shape[0], rows):
        band = rgba[start : start + rows]
        alpha = band[..., 3:4].astype(np.uint16)
        blended = band[..., :3].astype(np.uint16)
        blended *= alpha
        alpha *= 255  # 255 * (255 - a) + 127, in place
        np.subtract(255 * 255 + 127, alpha, out=alpha)
        blended += alpha
        blended //= 255
        out[start : start + rows] = blended
    return out


def _check_tiff_layout(page: Any, label: str | Path) -> None:
    """Refuse from the tags what would decode to more than an RGB(A) image of its width and
    height: extra samples per pixel, 3-D volumes and wide samples multiply the decoded size
    past what the pixel limit promises."""
    samples = int(getattr(page, "samplesperpixel", 1))
    depth = int(getattr(page, "imagedepth", 1))
    bits = int(getattr(page, "bitspersample", 8))
    if depth != 1:
        raise DataError(f"{label}: a 3-D TIFF (depth {depth}); expected one 2-D RGB image")
    if samples in (1, 2):
        raise DataError(
            f"{label}: grayscale image ({samples} sample(s) per pixel); "
            "H&E classifiers need RGB colour images"
        )
    if samples not in (3, 4):
        raise DataError(f"{label}: {samples} samples per pixel; expected RGB (3) or RGBA (4)")
    if bits not in (8, 16):
        raise DataError(f"{label}: {bits}-bit samples; expected 8- or 16-bit RGB")


def _read_tiff(
    path: Path | BinaryIO, label: str | Path, max_pixels: int | None = None
) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page: Any = tif.pages[0]
            # width x height from the tags, whatever the layout (planar data is (C, H, W))
            height, width = int(page.imagelength), int(page.imagewidth)
            if max_pixels is not None and height * width > max_pixels:
                raise ImageTooLarge(
                    f"{label}: {height}x{width} pixels exceeds the limit of {max_pixels}"
                )
            if len(tif.pages) > 1:
                raise MultiFrameImage(
                    f"{label}: a TIFF of {len(tif.pages)} pages; send one image per file"
                )
            _check_tiff_layout(page, label)
            array = page.asarray()
    except DataError:
        raise
    except Exception as exc:  # tifffile raises many types for broken files
        raise DataError(f"{label}: unreadable TIFF ({exc})") from exc
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[2] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar (CxHxW) storage
    return np.asarray(array)


def _pil_pixels(img: Image.Image, rows: int = 256) -> np.ndarray:
    """The decoded image as HxWx3 (RGBA flattened onto white), copied a band of rows at a time.

    ``np.array(img)`` goes through one full-size ``tobytes`` copy and RGBA then through a
    second full-size array: 10-11 bytes per pixel at the peak instead of about 7 here.
    """
    width, height = img.size
    out = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, rows):
        band = np.asarray(img.crop((0, top, width, min(height, top + rows))))
        if band.ndim != 3 or band.shape[2] not in (3, 4):
            return np.array(img)  # other layouts: the caller names what it found
        out[top : top + band.shape[0]] = _flatten_alpha(band) if band.shape[2] == 4 else band
    return out


def _read_pil(
    path: Path | BinaryIO, label: str | Path, max_pixels: int | None = None
) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=PIL_FORMATS) as opened:
                width, height = opened.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageTooLarge(
                        f"{label}: {height}x{width} pixels exceeds the limit of {max_pixels}"
                    )
                frames = getattr(opened, "n_frames", 1)
                if frames > 1:
                    raise MultiFrameImage(
                        f"{label}: an image of {frames} frames; send one image per file"
                    )
                opened.load()
                img: Image.Image = opened
                mode = img.mode
                if mode == "P":
                    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                elif mode in ("I;16", "I;16B", "I;16L", "I", "F", "1", "L", "LA"):
                    raise DataError(
                        f"{label}: grayscale image (mode {mode}); "
                        "H&E classifiers need RGB colour images"
                    )
                elif mode == "CMYK" or mode == "YCbCr":
                    img = img.convert("RGB")
                return _pil_pixels(img)
    except DataError:
        raise
    except UnidentifiedImageError as exc:
        raise UnsupportedImage(
            f"{label}: not a recognised image format; expected PNG, JPEG or TIFF"
        ) from exc
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageTooLarge(f"{label}: image too large to decode safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{label}: unreadable or truncated image ({exc})") from exc


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array.

    Raises:
        DataError: the file is missing, unreadable, truncated, grayscale or of an unsupported type.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(
            f"{path}: unsupported extension {path.suffix!r}; "
            f"expected one of {', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    if path.suffix.lower() in TIFF_EXTENSIONS:
        array = _read_tiff(path, path)
    else:
        array = _read_pil(path, path)
    return _to_rgb_uint8(array, path)


_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def decode_rgb(data: bytes, name: str = "upload", max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes (PNG, JPEG, TIFF; format from the content, not the name) to RGB uint8.

    Raises:
        UnsupportedImage: not an image format histolite reads.
        ImageTooLarge: more than ``max_pixels`` pixels (checked from the header, before decoding).
        DataError: corrupt, truncated or grayscale.
    """
    if not data:
        raise DataError(f"{name}: empty file")
    stream = io.BytesIO(data)
    reader = _read_tiff if data[:4] in _TIFF_MAGIC else _read_pil
    try:
        array = reader(stream, name, max_pixels)
    except UnsupportedImage as exc:
        claimed = next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)
        if claimed is None or isinstance(exc, MultiFrameImage):
            raise
        raise DataError(f"{name}: corrupt {claimed} data (unreadable or truncated)") from exc
    return _to_rgb_uint8(array, Path(name))


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) read from the file header, without decoding pixels."""
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_EXTENSIONS:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page: Any = tif.pages[0]
                return int(page.imagelength), int(page.imagewidth)
        with Image.open(path) as img:
            width, height = img.size
        return height, width
    except Exception as exc:
        raise DataError(f"{path}: cannot read image size ({exc})") from exc


def save_rgb(array: np.ndarray, path: str | Path) -> None:
    """Write an HxWx3 uint8 array; format from the extension (TIFF through tifffile)."""
    path = Path(path)
    if path.suffix.lower() in TIFF_EXTENSIONS:
        import tifffile

        tifffile.imwrite(path, array, photometric="rgb")
    else:
        Image.fromarray(array).save(path)
