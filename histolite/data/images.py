"""Reading images as 8-bit RGB, with explicit, documented conversions.

H&E classifiers expect colour: grayscale input is almost always a mistake (a mask, a wrong
channel), so it is rejected rather than silently replicated. Alpha is composited onto white (the
slide background), 16-bit data is scaled to 8 bit, palette images are expanded. Colour spaces that
only reach RGB through colour management (CMYK, CIELAB and TIFF's other photometric
interpretations) are refused rather than approximated: a naive conversion shifts stain hues, and
the classifier would answer confidently on colours it never saw.

Uploads (:func:`decode_rgb`) are also bounded from their headers, before a pixel is decoded: the
pixel count, the decoding work (a progressive JPEG costs a pass over the image per scan), the
compression ratio and the estimated peak memory (:class:`DecodeLimits`).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass
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


class DecodeBudgetExceeded(ImageTooLarge):
    """Decoding would cost more CPU time or memory than allowed, judged from the headers: too much
    progressive-JPEG work, an impossible compression ratio, too many strips or tiles, or a peak
    memory over budget (HTTP 413 when served, like any :class:`ImageTooLarge`)."""


IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})
# Exactly the documented formats (TIFF goes through tifffile): Pillow would also decode BMP,
# WebP, ICO, TGA, GIF... and the error messages promise PNG, JPEG or TIFF.
PIL_FORMATS = ("PNG", "JPEG")

DECODE_WORK_PER_PIXEL = 4
"""Default JPEG decoding budget, in pixel-scans per allowed pixel (``max_pixels * 4``).

libjpeg-turbo makes a pass over every 8x8 block of the image for each progressive scan (here
about 0.7 ns per pixel for a scan of a few bytes, up to ~5 for real data), however little data
the scan holds: a 21 KB progressive file declaring 7000 x 8000 pixels took 48 s to decode. A
baseline JPEG is 1 scan and libjpeg's standard progressive script 10: four pixel-scans per
allowed pixel accept baseline images up to the pixel limit and progressive ones up to 40% of it
(24 Mpx of 60), and hold the worst file within budget to about a second of CPU. (libjpeg also
keeps all DCT coefficients of a progressive image, up to 6 B/px, so allowing progressive images
at the full pixel limit would break the memory bound as well.)
"""

DECODE_BYTES_PER_PIXEL = 8
"""Default peak-memory budget, in bytes per allowed pixel (``max_pixels * 8``): the ~8 B/px the
service documents for sizing pods (``max_concurrent_predictions x 8 x max_pixels``)."""

MAX_JPEG_SCANS = 100
"""Scans allowed in one JPEG stream. Encoders write 1 (baseline) to about 10 (libjpeg's and
mozjpeg's progressive scripts); each scan costs a pass over the image, and a tiny image with
thousands of scans would still cost seconds of per-scan set-up."""

MAX_COMPRESSION_RATIO = 2000
"""Most declared raw bytes (pixels x components) per byte of JPEG scan data.

A complete Huffman-coded JPEG spends at least one bit per 8x8 block of its most detailed
component in the DC scan (two in a baseline scan, DC plus end-of-block), so no real JPEG exceeds
about 1,400:1 even if blank (Pillow's blank white JPEGs measure 256:1 at 4:4:4, 509:1 at
4:2:0), and photographs and H&E scans sit far lower. Above 2,000:1 the scan data is missing
(libjpeg fills the gap with grey after decoding the full declared size) or crafted.
"""

MAX_JPEG_MARKERS = 10_000
"""Marker segments walked in one JPEG (ICC and XMP chunks make hundreds at most)."""

MAX_PNG_CHUNKS = 50_000
"""Chunks walked in one PNG upload: Pillow spends about 6 us on each, even an empty one (0.3 s
at this bound); encoders write image data in 8-64 KB chunks, so a 25 MB PNG has a few thousand."""

MAX_PNG_ANCILLARY = 1_000
"""PNG chunks besides image data (text, ICC, time, ...): real files carry a handful."""

MAX_TIFF_SEGMENTS = 100_000
"""Strips or tiles decoded one by one in an uploaded TIFF: tifffile spends about 12 us on each
(1.2 s at this bound), and a crafted file of one-pixel strips would hold millions."""

_TIFF_READ_BYTES = 1 << 22  # tifffile's reads of segment data for uploads: 4 MiB at a time
_PIL_PEAK_PER_PIXEL = 7  # Pillow keeps RGB as 4 bytes per pixel, plus our 3-byte RGB copy


@dataclass(frozen=True)
class DecodeLimits:
    """What decoding one upload may cost, checked from its headers before decoding.

    Attributes:
        max_pixels: width x height (None: no limit).
        max_work: JPEG decoding work in pixel-scans, declared pixels x scans (summed over the
            strips or tiles of a JPEG-compressed TIFF). None: no limit.
        max_bytes: estimated peak bytes of decoding plus the conversion to 8-bit RGB. None: no
            limit.
    """

    max_pixels: int | None = None
    max_work: int | None = None
    max_bytes: int | None = None

    @classmethod
    def for_pixels(
        cls, max_pixels: int | None, max_work: int | None = None, max_bytes: int | None = None
    ) -> DecodeLimits:
        """Limits where work and memory default to :data:`DECODE_WORK_PER_PIXEL` and
        :data:`DECODE_BYTES_PER_PIXEL` times ``max_pixels``: one setting sizes them all."""
        if max_pixels is not None:
            if max_work is None:
                max_work = max_pixels * DECODE_WORK_PER_PIXEL
            if max_bytes is None:
                max_bytes = max_pixels * DECODE_BYTES_PER_PIXEL
        return cls(max_pixels, max_work, max_bytes)


def is_image_file(path: Path) -> bool:
    """True for a visible file with a supported image extension."""
    return (
        path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _check_pixels(label: str | Path, height: int, width: int, max_pixels: int | None) -> None:
    if max_pixels is not None and height * width > max_pixels:
        raise ImageTooLarge(f"{label}: {height}x{width} pixels exceeds the limit of {max_pixels}")


def _mb(size: int) -> str:
    return f"{size / 1e6:,.0f} MB"


# ---------------------------------------------------------------- conversion to 8-bit RGB
def _to_rgb_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    """Convert a decoded array to HxWx3 uint8 or raise naming the file and what was found."""
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 2)):
        raise DataError(
            f"{path}: grayscale image (shape {array.shape}); H&E classifiers need RGB colour images"
        )
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise DataError(f"{path}: unsupported image shape {array.shape}; expected HxWx3 RGB")
    if array.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{path}: unsupported pixel type {array.dtype}; expected 8- or 16-bit RGB")
    return _to_rgb8(array)


def _to_rgb8(array: np.ndarray, alpha: str = "straight", rows: int = 256) -> np.ndarray:
    """HxWx3/4 uint8 or uint16 to HxWx3 uint8, all steps fused a band of rows at a time.

    Converting 16-bit RGBA in whole-image steps held the 16-bit input, an 8-bit RGBA copy and
    the RGB output at once (15 B/px, 1 GB for a 60 Mpx upload); by bands the peak is the input
    plus the 3 B/px output.

    Args:
        array: decoded pixels, HxWxC with C 3 or 4.
        alpha: what a fourth sample means: ``"straight"`` (unassociated) alpha,
            ``"premultiplied"`` (associated) alpha, or ``"none"`` (unspecified data, dropped).
        rows: rows per band.
    """
    if array.dtype == np.uint8 and array.shape[2] == 3:
        return np.ascontiguousarray(array)  # no copy when already contiguous
    out = np.empty((*array.shape[:2], 3), np.uint8)
    for start in range(0, array.shape[0], rows):
        band = array[start : start + rows]
        if band.dtype == np.uint16:
            band = _to_8bit(band)
        if band.shape[2] == 4:
            if alpha == "premultiplied":
                band = _flatten_premultiplied(band)
            elif alpha == "none":
                band = band[..., :3]
            else:
                band = _flatten_alpha(band)
        out[start : start + rows] = band
    return out


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


def _flatten_premultiplied(rgba: np.ndarray) -> np.ndarray:
    """Premultiplied (associated) RGBA onto white: c + (255 - a), since c already holds c * a.

    Clipped at 255: valid data has c <= a, but a file is not obliged to be valid.
    """
    out = rgba[..., :3].astype(np.uint16)
    out += 255 - rgba[..., 3:4]
    np.minimum(out, 255, out=out)
    return out.astype(np.uint8)


def _apply_colormap(indices: np.ndarray, colormap: np.ndarray) -> np.ndarray:
    """Palette indices to HxWx3 uint8 through a TIFF colour map (3 x N, 16-bit values).

    Like libtiff, a map whose values all fit in 8 bits is taken as written by an 8-bit writer
    (a common bug) rather than scaled to near black. Out-of-range indices take the last entry.
    """
    cmap = np.asarray(colormap).reshape(3, -1).astype(np.uint32)
    if cmap.max() > 255:
        cmap = (cmap + 128) // 257
    lut = np.ascontiguousarray(cmap.T.astype(np.uint8))  # N x 3
    return lut.take(indices, axis=0, mode="clip")


# ---------------------------------------------------------------- JPEG headers
# A marker: 0xFF then a code that is neither a stuffed zero, a fill byte nor a restart (RSTn,
# which belongs to the entropy-coded data). The same rule libjpeg applies when it looks for one.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # not DHT, JPG, DAC
_JPEG_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_JPEG_EOI, _JPEG_SOS = 0xD9, 0xDA
_JPEG_STANDALONE = frozenset({0x01, 0xD8})  # TEM, SOI: no length field


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG declares, read from its markers without decoding.

    Attributes:
        width, height: from the frame header (SOF).
        components: 1 grayscale, 3 YCbCr/RGB, 4 CMYK/YCCK.
        precision: bits per sample.
        sampling: (horizontal, vertical) sampling factors of each component.
        progressive: a progressive (SOF2-type) frame.
        scans: start-of-scan markers before the end of the image.
        entropy_bytes: bytes of entropy-coded (scan) data.
    """

    width: int
    height: int
    components: int
    precision: int
    sampling: tuple[tuple[int, int], ...]
    progressive: bool
    scans: int
    entropy_bytes: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def raw_bytes(self) -> int:
        """Bytes of the decoded samples: pixels x components x bytes per sample."""
        return self.pixels * self.components * (2 if self.precision > 8 else 1)

    @property
    def coefficient_bytes(self) -> int:
        """Bytes libjpeg holds for the DCT coefficients of the whole image when it has more than
        one scan (progressive, or components in separate scans): 2 per coefficient, 64 per block,
        blocks rounded up to whole MCUs."""
        if not self.progressive and self.scans <= 1:
            return 0
        hmax = max(h for h, _ in self.sampling)
        vmax = max(v for _, v in self.sampling)
        mcus_x = math.ceil(self.width / (8 * hmax))
        mcus_y = math.ceil(self.height / (8 * vmax))
        return sum(mcus_x * h * mcus_y * v for h, v in self.sampling) * 64 * 2


def _parse_sof(code: int, body: bytes, label: str | Path) -> JpegHeader:
    if len(body) < 6 or len(body) < 6 + 3 * body[5]:
        raise DataError(f"{label}: corrupt JPEG data (frame header of {len(body)} bytes)")
    precision = body[0]
    height = int.from_bytes(body[1:3], "big")
    width = int.from_bytes(body[3:5], "big")
    components = body[5]
    if width == 0 or height == 0 or components == 0:
        # height 0 defers it to a DNL marker, which libjpeg does not support either
        raise DataError(
            f"{label}: corrupt JPEG data (frame header declares {width} x {height} pixels, "
            f"{components} components)"
        )
    sampling = tuple(
        (body[6 + 3 * i + 1] >> 4, body[6 + 3 * i + 1] & 15) for i in range(components)
    )
    if any(not (1 <= h <= 4 and 1 <= v <= 4) for h, v in sampling):
        raise DataError(f"{label}: corrupt JPEG data (sampling factors {sampling}; expected 1-4)")
    return JpegHeader(
        width, height, components, precision, sampling, code in _JPEG_PROGRESSIVE, 0, 0
    )


def read_jpeg_header(data: bytes, name: str | Path = "upload") -> JpegHeader:
    """Walk a JPEG's markers up to its end (EOI) without decoding: frame size, scans, scan bytes.

    Segments are skipped by their length fields and entropy-coded data by searching for the
    next marker (the search runs in C: a 25 MB upload takes milliseconds). Truncated files end
    the walk; the decoder reports them.

    Raises:
        DataError: no frame header before the first scan, two frame headers, a malformed one.
        DecodeBudgetExceeded: more than :data:`MAX_JPEG_SCANS` scans or
            :data:`MAX_JPEG_MARKERS` marker segments.
    """
    frame: JpegHeader | None = None
    scans = entropy = markers = 0
    pos = 2  # after SOI
    while (match := _JPEG_MARKER.search(data, pos)) is not None:
        code, pos = data[match.start() + 1], match.end()
        markers += 1
        if markers > MAX_JPEG_MARKERS:
            raise DecodeBudgetExceeded(
                f"{name}: JPEG with more than {MAX_JPEG_MARKERS} marker segments; expected at "
                "most a few hundred"
            )
        if code == _JPEG_EOI:
            break
        if code in _JPEG_STANDALONE:
            continue
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > len(data):
            break  # truncated segment
        body, pos = data[pos + 2 : pos + length], pos + length
        if code in _JPEG_SOF:
            if frame is not None:
                raise DataError(f"{name}: corrupt JPEG data (two frame headers)")
            frame = _parse_sof(code, body, name)
        elif code == _JPEG_SOS:
            if frame is None:
                raise DataError(f"{name}: corrupt JPEG data (a scan before the frame header)")
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise DecodeBudgetExceeded(
                    f"{name}: JPEG with more than {MAX_JPEG_SCANS} scans; encoders write 1 "
                    "(baseline) to about 10 (progressive), and each scan is a pass over the image"
                )
            following = _JPEG_MARKER.search(data, pos)
            end = len(data) if following is None else following.start()
            entropy += end - pos
            pos = end
    if frame is None:
        raise DataError(f"{name}: corrupt JPEG data (no frame header)")
    return JpegHeader(
        frame.width,
        frame.height,
        frame.components,
        frame.precision,
        frame.sampling,
        frame.progressive,
        scans,
        entropy,
    )


def check_jpeg(
    data: bytes, name: str | Path = "upload", limits: DecodeLimits | None = None
) -> JpegHeader:
    """Refuse, from its headers, a JPEG that would cost more to decode than ``limits`` allow.

    Checks, in order: pixel count; colour model (grayscale -> :class:`DataError`, CMYK/YCCK ->
    :class:`UnsupportedImage`: see :func:`_read_pil`); decoding work, declared pixels x scans
    against ``limits.max_work``; compression ratio against :data:`MAX_COMPRESSION_RATIO`
    (always); peak memory (DCT coefficients of a multi-scan image plus Pillow's image and the
    RGB copy) against ``limits.max_bytes``.

    Returns:
        The header, for the caller to compare with what the decoder reads.
    """
    limits = limits or DecodeLimits()
    header = read_jpeg_header(data, name)
    width, height = header.width, header.height
    _check_pixels(name, height, width, limits.max_pixels)
    if header.components == 1:
        raise DataError(
            f"{name}: grayscale image (JPEG with 1 component); H&E classifiers need RGB colour "
            "images"
        )
    if header.components == 4:
        raise UnsupportedImage(
            f"{name}: CMYK JPEG (4 components); converting CMYK needs the file's colour profile "
            "and a naive conversion shifts stain colours: export it as an RGB (sRGB) JPEG"
        )
    if header.components != 3:
        raise UnsupportedImage(
            f"{name}: JPEG with {header.components} components; expected 3 (RGB colour)"
        )
    if header.scans == 0:
        raise DataError(f"{name}: corrupt JPEG data (no image scan)")
    work = header.pixels * header.scans
    if limits.max_work is not None and work > limits.max_work:
        raise DecodeBudgetExceeded(
            f"{name}: JPEG of {width} x {height} pixels (width x height) in {header.scans} scans "
            f"is {work:,} pixel-scans of decoding, over the budget of {limits.max_work:,}; "
            "re-save it as a baseline (non-progressive) JPEG or send fewer pixels"
        )
    ratio = header.raw_bytes / max(header.entropy_bytes, 1)
    if ratio > MAX_COMPRESSION_RATIO:
        raise DecodeBudgetExceeded(
            f"{name}: JPEG declares {width} x {height} pixels x {header.components} components "
            f"({header.raw_bytes:,} bytes) from {header.entropy_bytes:,} bytes of scan data, a "
            f"{ratio:,.0f}:1 compression ratio; a complete JPEG stays under about 1,400:1 "
            f"(limit {MAX_COMPRESSION_RATIO:,}:1), so the file is truncated or crafted"
        )
    peak = header.coefficient_bytes + _PIL_PEAK_PER_PIXEL * header.pixels
    if limits.max_bytes is not None and peak > limits.max_bytes:
        raise DecodeBudgetExceeded(
            f"{name}: decoding this {header.scans}-scan JPEG of {width} x {height} pixels needs "
            f"about {_mb(peak)} (the DCT coefficients of every scan held at once, then the RGB "
            f"image), over the budget of {_mb(limits.max_bytes)}; re-save it as a baseline JPEG "
            "or send fewer pixels"
        )
    return header


def _check_png(data: bytes, name: str | Path, limits: DecodeLimits) -> tuple[int, int] | None:
    """(width, height) from the IHDR chunk, refusing too many pixels or grayscale before Pillow
    opens the file; None when IHDR is not where PNG puts it (Pillow reports the corruption)."""
    if len(data) < 26 or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    _check_pixels(name, height, width, limits.max_pixels)
    colour_type = data[25]
    if colour_type in (0, 4):
        raise DataError(
            f"{name}: grayscale image (PNG colour type {colour_type}); H&E classifiers need RGB "
            "colour images"
        )
    _check_png_chunks(data, name)
    return width, height


def _check_png_chunks(data: bytes, name: str | Path) -> None:
    """Refuse a PNG padded with chunks: each costs Pillow time however small it is."""
    position, chunks, ancillary = 8, 0, 0
    while position + 8 <= len(data):
        kind = data[position + 4 : position + 8]
        chunks += 1
        ancillary += kind != b"IDAT"
        if chunks > MAX_PNG_CHUNKS or ancillary > MAX_PNG_ANCILLARY:
            raise DecodeBudgetExceeded(
                f"{name}: a PNG of more than {MAX_PNG_CHUNKS:,} chunks, or more than "
                f"{MAX_PNG_ANCILLARY:,} besides image data; encoders write a few thousand at "
                "most, and each costs decoding time"
            )
        if kind == b"IEND":
            return
        position += 12 + int.from_bytes(data[position : position + 4], "big")


# ---------------------------------------------------------------- TIFF
def _has_second_page(tif: Any) -> bool:
    try:
        tif.pages[1]
    except IndexError:
        return False
    return True


_TIFF_RGB, _TIFF_PALETTE, _TIFF_YCBCR = 2, 3, 6
_TIFF_GRAYSCALE = {0: "MINISWHITE", 1: "MINISBLACK"}
_TIFF_JPEG = 7
_TIFF_NONE = 1
# Compressions accepted in uploads: the general-purpose codecs, whose output tifffile sizes
# from the tags, and JPEG, whose strips and tiles are checked like JPEG files. Other image
# codecs (JPEG 2000, WebP, JPEG XL, PNG...) decode to whatever size their own stream declares
# before tifffile compares it with the tile.
_TIFF_UPLOAD_COMPRESSIONS = {
    _TIFF_NONE: "none",
    5: "LZW",
    7: "JPEG",
    8: "Deflate",
    32773: "PackBits",
    32946: "Deflate",
    34925: "LZMA",
    34926: "Zstd",
    50000: "Zstd",
}
# The imagecodecs codec(s) tifffile decodes each accepted compression with. Only those write
# into a buffer of the size the tags declare (``out=``); without them tifffile falls back to
# its pure-Python module, which ignores ``out`` (``zlib.decompress``, ``lzma.decompress``...):
# a 10 KB Deflate strip of a 16 x 16 image inflates to 10 MB, and a crafted one to gigabytes.
# LZW and JPEG have no fallback (tifffile cannot read them at all without imagecodecs).
_TIFF_BOUNDED_CODECS = {
    5: ("LZW",),
    7: ("JPEG8",),
    8: ("DEFLATE", "ZLIB"),
    32773: ("PACKBITS",),
    32946: ("DEFLATE", "ZLIB"),
    34925: ("LZMA",),
    34926: ("ZSTD",),
    50000: ("ZSTD",),
}
MAX_TIFF_SEGMENT_EXPANSION = 2
"""Most bytes of compressed data per decoded byte in a strip or tile (plus
:data:`_TIFF_SEGMENT_SLACK`): LZW's 9- to 12-bit codes reach 1.5x on noise, Deflate, LZMA, Zstd
and PackBits stay within a few bytes of the raw size. More is crafted or corrupt, and each
byte of it is read and fed to the decoder."""
_TIFF_SEGMENT_SLACK = 1024  # stream headers and trailers (an xz container is ~60 bytes)


def imagecodecs_available() -> bool:
    """Whether the ``imagecodecs`` package imports (the ``slide`` extra installs it).

    Tests replace this to see the refusals of a ``serve``-only install.
    """
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        return False
    return True


def _decodes_within_tags(compression: int) -> bool:
    """Whether tifffile decodes ``compression`` into a buffer sized from the tags."""
    if compression == _TIFF_NONE:
        return True
    if not imagecodecs_available():
        return False
    import imagecodecs

    # a build of imagecodecs without one codec sends tifffile to its fallback for that codec
    return any(
        getattr(getattr(imagecodecs, codec, None), "available", False)
        for codec in _TIFF_BOUNDED_CODECS.get(compression, ())
    )


def _tiff_enum_name(value: int, enum_name: str) -> str:
    import tifffile

    try:
        name = getattr(tifffile, enum_name)(value).name
    except ValueError:
        return str(value)
    return f"{name} (CMYK)" if enum_name == "PHOTOMETRIC" and value == 5 else str(name)


def _check_tiff_layout(page: Any, label: str | Path) -> str:
    """Refuse from the tags what does not decode to an RGB(A) image of its width and height.

    Extra samples per pixel, 3-D volumes and wide samples multiply the decoded size past what
    the pixel limit promises; grayscale is refused (module docstring); photometric
    interpretations other than RGB, palette and JPEG-compressed YCbCr (which tifffile decodes to
    RGB) are refused because tifffile returns their samples unconverted: CMYK or CIELAB read as
    RGB(A) is a different image.

    Returns:
        ``"rgb"`` or ``"palette"``.
    """
    samples = int(getattr(page, "samplesperpixel", 1))
    depth = int(getattr(page, "imagedepth", 1))
    bits = int(getattr(page, "bitspersample", 8))
    photometric = int(getattr(page, "photometric", _TIFF_RGB))
    if depth != 1:
        raise DataError(f"{label}: a 3-D TIFF (depth {depth}); expected one 2-D RGB image")
    if not 1 <= samples <= 4:
        raise DataError(f"{label}: {samples} samples per pixel; expected RGB (3) or RGBA (4)")
    if photometric in _TIFF_GRAYSCALE and samples in (1, 2):
        raise DataError(
            f"{label}: grayscale image ({samples} sample(s) per pixel); "
            "H&E classifiers need RGB colour images"
        )
    if bits not in (8, 16):
        raise DataError(f"{label}: {bits}-bit samples; expected 8- or 16-bit RGB")
    if photometric in _TIFF_GRAYSCALE:
        raise DataError(
            f"{label}: grayscale image (photometric {_TIFF_GRAYSCALE[photometric]} with "
            f"{samples} samples per pixel); H&E classifiers need RGB colour images"
        )
    if photometric == _TIFF_PALETTE:
        if samples != 1:
            raise DataError(
                f"{label}: palette TIFF with {samples} samples per pixel; expected 1 (an index "
                "into the colour map)"
            )
        if getattr(page, "colormap", None) is None:
            raise DataError(f"{label}: palette TIFF without a colour map (ColorMap tag)")
        return "palette"
    ycbcr_as_rgb = photometric == _TIFF_YCBCR and int(page.compression) == _TIFF_JPEG
    if photometric != _TIFF_RGB and not ycbcr_as_rgb:
        raise UnsupportedImage(
            f"{label}: TIFF photometric interpretation "
            f"{_tiff_enum_name(photometric, 'PHOTOMETRIC')} is not converted to RGB; accepted: "
            "RGB, palette, YCbCr (JPEG-compressed); export the image as RGB (sRGB)"
        )
    if samples not in (3, 4):
        raise DataError(
            f"{label}: RGB TIFF with {samples} sample(s) per pixel; expected RGB (3) or RGBA (4)"
        )
    return "rgb"


def _tiff_alpha(page: Any) -> str:
    """What a fourth sample is (ExtraSamples): unspecified data is dropped, associated alpha is
    premultiplied; unassociated alpha, or a missing tag, is straight alpha."""
    extras = tuple(getattr(page, "extrasamples", ()) or ())
    if not extras:
        return "straight"
    return {0: "none", 1: "premultiplied"}.get(int(extras[0]), "straight")


def _check_tiff_costs(
    tif: Any, page: Any, label: str | Path, limits: DecodeLimits, kind: str
) -> None:
    """Refuse, from the tags, an uploaded TIFF that would cost more than ``limits`` allow.

    Memory is bounded by refusing, not by decoding in bands: tifffile decodes the whole page into
    one array, so the peak is that array (pixels x samples x bytes per sample) plus the larger of
    one strip or tile in flight (decoded one at a time here) and the 3 B/px RGB copy (none for
    contiguous 8-bit RGB). At 8 B/px that admits 8-bit RGB(A) up to the pixel limit, 16-bit RGB
    to 89% of it and 16-bit RGBA to 73% (11 B/px).

    Compressed uploads need imagecodecs (:func:`_decodes_within_tags`), and no strip or tile
    may hold more compressed bytes than its decoded size explains
    (:func:`_check_tiff_byte_counts`).
    """
    compression = int(page.compression)
    if compression not in _TIFF_UPLOAD_COMPRESSIONS:
        accepted = ", ".join(sorted(set(_TIFF_UPLOAD_COMPRESSIONS.values())))
        raise UnsupportedImage(
            f"{label}: TIFF compression {_tiff_enum_name(compression, 'COMPRESSION')} is not "
            f"accepted for uploads; accepted: {accepted}"
        )
    if not _decodes_within_tags(compression):
        raise UnsupportedImage(
            f"{label}: TIFF compression {_TIFF_UPLOAD_COMPRESSIONS[compression]} is not accepted "
            "on this server: without the 'imagecodecs' package tifffile cannot decode it, or "
            "decodes it without a bound on the output size; send an uncompressed TIFF, a PNG or "
            "a JPEG, or have the server installed with pip install 'histolite[slide]' (or pip "
            "install imagecodecs)"
        )
    height, width = int(page.imagelength), int(page.imagewidth)
    samples, bits = int(page.samplesperpixel), int(page.bitspersample)
    itemsize = bits // 8
    planar = int(page.planarconfig) == 2
    segments = len(page.dataoffsets)
    contiguous = bool(page.is_contiguous)  # uncompressed, read in one go
    if not contiguous and segments > MAX_TIFF_SEGMENTS:
        raise DecodeBudgetExceeded(
            f"{label}: a TIFF of {segments:,} strips or tiles, each decoded on its own; "
            f"expected at most {MAX_TIFF_SEGMENTS:,}"
        )
    if page.is_tiled:
        seg_cols, seg_rows = int(page.tilewidth), int(page.tilelength)
        seg_pixels = seg_cols * seg_rows * max(1, int(page.tiledepth))
    else:
        seg_cols, seg_rows = width, min(int(page.rowsperstrip) or height, height)
        seg_pixels = seg_cols * seg_rows
    seg_bytes = seg_pixels * (1 if planar else samples) * itemsize
    segment = 0 if contiguous else seg_bytes
    decoded = height * width * samples * itemsize
    rgb_in_place = kind == "rgb" and itemsize == 1 and samples == 3 and not planar
    converted = 0 if rgb_in_place else height * width * 3
    peak = decoded + max(segment, converted)
    if limits.max_bytes is not None and peak > limits.max_bytes:
        raise DecodeBudgetExceeded(
            f"{label}: decoding this {width} x {height} TIFF ({samples} x {bits}-bit samples per "
            f"pixel, strips/tiles of {_mb(segment)}) needs about {_mb(peak)} at the peak, over "
            f"the budget of {_mb(limits.max_bytes)}; send fewer pixels or 8-bit RGB"
        )
    if compression == _TIFF_JPEG:
        _check_tiff_jpeg(tif, page, label, limits, seg_cols, seg_rows)
    else:
        _check_tiff_byte_counts(page, label, seg_bytes)


def _check_tiff_byte_counts(page: Any, label: str | Path, seg_bytes: int) -> None:
    """Refuse a strip or tile holding more compressed bytes than its decoded size explains.

    A lossless codec never expands its data more than :data:`MAX_TIFF_SEGMENT_EXPANSION` times
    (plus stream headers), so a 16 x 16 strip of 768 bytes stored in 10 KB is crafted: a
    decompression bomb whose output the decoder would have to cut short, or padding that makes
    the server read and decode bytes that are not pixels. Checked from the tags alone.
    """
    counts = page.databytecounts
    if not counts:
        return
    bound = MAX_TIFF_SEGMENT_EXPANSION * seg_bytes + _TIFF_SEGMENT_SLACK
    largest = max(counts)
    if largest > bound:
        index = list(counts).index(largest)
        codec = _TIFF_UPLOAD_COMPRESSIONS.get(int(page.compression), str(page.compression))
        raise DecodeBudgetExceeded(
            f"{label}: TIFF strip/tile {index} holds {largest:,} bytes of {codec} data for "
            f"{seg_bytes:,} bytes of pixels; expected at most {bound:,} "
            f"({MAX_TIFF_SEGMENT_EXPANSION}x the decoded size plus {_TIFF_SEGMENT_SLACK:,} "
            "bytes), so the file is crafted or corrupt"
        )


def _check_tiff_jpeg(
    tif: Any, page: Any, label: str | Path, limits: DecodeLimits, cols: int, rows: int
) -> None:
    """Each JPEG strip or tile is decoded at the size its own frame header declares before
    tifffile compares it with the tile (a 256 x 256 tile declaring 7000 x 8000 cost 0.5 s and
    168 MB, per tile): check each one's size and scans, and their total work."""
    handle = tif.filehandle
    work = 0
    for index, (offset, count) in enumerate(
        zip(page.dataoffsets, page.databytecounts, strict=False)
    ):
        if not count:
            continue
        handle.seek(offset)
        header = read_jpeg_header(handle.read(count), f"{label} (JPEG segment {index})")
        if header.width > cols or header.height > rows:
            raise DataError(
                f"{label}: corrupt TIFF (JPEG segment {index} declares {header.width} x "
                f"{header.height} pixels in a {cols} x {rows} strip/tile)"
            )
        work += header.pixels * header.scans
        if limits.max_work is not None and work > limits.max_work:
            raise DecodeBudgetExceeded(
                f"{label}: decoding the JPEG strips/tiles of this TIFF is over "
                f"{limits.max_work:,} pixel-scans (at segment {index} of {len(page.dataoffsets)})"
            )


def _read_tiff(
    path: Path | BinaryIO, label: str | Path, limits: DecodeLimits | None = None
) -> np.ndarray:
    """First page of a TIFF as HxWx3/4 (uint8 or uint16), or HxWx3 uint8 once converted.

    With ``limits`` (uploads) the costs are checked from the tags first, and tifffile decodes
    with one thread and small reads: bounded CPU per request, one segment in flight.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page: Any = tif.pages[0]
            # width x height from the tags, whatever the layout (planar data is (C, H, W))
            height, width = int(page.imagelength), int(page.imagewidth)
            _check_pixels(label, height, width, limits.max_pixels if limits else None)
            if _has_second_page(tif):  # len(pages) would walk a crafted chain of millions
                raise MultiFrameImage(f"{label}: a TIFF of several pages; send one image per file")
            kind = _check_tiff_layout(page, label)
            if limits is not None:
                _check_tiff_costs(tif, page, label, limits, kind)
                array = page.asarray(maxworkers=1, buffersize=_TIFF_READ_BYTES)
            else:
                array = page.asarray()
            planar = int(page.planarconfig) == 2
            colormap = page.colormap if kind == "palette" else None
            alpha = _tiff_alpha(page)
    except DataError:
        raise
    except Exception as exc:  # tifffile raises many types for broken files
        raise DataError(f"{label}: unreadable TIFF ({exc})") from exc
    if colormap is not None:
        return _apply_colormap(array, colormap)
    if array.ndim == 3 and planar:
        array = np.moveaxis(array, 0, -1)  # planar (CxHxW) storage
    if alpha != "straight" and array.ndim == 3 and array.shape[2] == 4:
        return _to_rgb8(array, alpha)
    return np.asarray(array)


# ---------------------------------------------------------------- PNG and JPEG through Pillow
_PIL_GRAYSCALE = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_PIL_COLOUR = frozenset({"RGB", "RGBA", "P", "YCbCr"})


def _pil_pixels(img: Image.Image, rows: int = 256) -> np.ndarray:
    """The decoded image as HxWx3 (RGBA flattened onto white), copied a band of rows at a time.

    ``np.array(img)`` goes through one full-size ``tobytes`` copy and RGBA then through a
    second full-size array: 10-11 bytes per pixel at the peak instead of about 7 here. Palette
    and YCbCr images are converted band by band too, never as a whole second image.
    """
    width, height = img.size
    target = None
    if img.mode == "P":
        target = "RGBA" if "transparency" in img.info else "RGB"
    elif img.mode not in ("RGB", "RGBA"):
        target = "RGB"
    out = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, rows):
        band_image = img.crop((0, top, width, min(height, top + rows)))
        if target is not None:
            band_image = band_image.convert(target)
        band = np.asarray(band_image)
        out[top : top + band.shape[0]] = _flatten_alpha(band) if band.shape[2] == 4 else band
    return out


def _read_pil(
    path: Path | BinaryIO,
    label: str | Path,
    max_pixels: int | None = None,
    expected_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """A PNG or JPEG as HxWx3 uint8, refusing from the header (before ``load``) too many pixels,
    several frames, grayscale and colour models other than RGB(A), palette and YCbCr.

    CMYK is refused, not converted: Pillow's conversion ignores the embedded profile, and the
    press profile decides what a CMYK value looks like, so stain colours would shift.

    Args:
        expected_size: (width, height) our own header parser read; Pillow must agree, so that
            the checks made on it hold for what is decoded.
    """
    try:
        with warnings.catch_warnings():
            # with max_pixels, that limit (checked below, from the header) is the one that
            # applies; without it, Pillow's decompression-bomb warning (~89 Mpx) is the limit
            if max_pixels is None:
                warnings.simplefilter("error", Image.DecompressionBombWarning)
            else:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=PIL_FORMATS) as opened:
                width, height = opened.size
                if expected_size is not None and (width, height) != expected_size:
                    raise DataError(
                        f"{label}: corrupt {opened.format} data (the decoder reads "
                        f"{width} x {height} pixels, the header {expected_size[0]} x "
                        f"{expected_size[1]})"
                    )
                _check_pixels(label, height, width, max_pixels)
                frames = getattr(opened, "n_frames", 1)
                if frames > 1:
                    raise MultiFrameImage(
                        f"{label}: an image of {frames} frames; send one image per file"
                    )
                mode = opened.mode
                if mode in _PIL_GRAYSCALE:
                    raise DataError(
                        f"{label}: grayscale image (mode {mode}); "
                        "H&E classifiers need RGB colour images"
                    )
                if mode == "CMYK":
                    raise UnsupportedImage(
                        f"{label}: CMYK image; converting CMYK needs the file's colour profile "
                        "and a naive conversion shifts stain colours: export it as RGB (sRGB)"
                    )
                if mode not in _PIL_COLOUR:
                    raise UnsupportedImage(
                        f"{label}: image mode {mode}; expected RGB, RGBA or palette colour"
                    )
                opened.load()
                return _pil_pixels(opened)
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

    Local files are trusted for size (no pixel or work limits); colour rules are those of
    :func:`decode_rgb`.

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


_PNG_SIGNATURE, _JPEG_SIGNATURE = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
_SIGNATURES = ((_PNG_SIGNATURE, "PNG"), (_JPEG_SIGNATURE, "JPEG"))
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def decode_rgb(
    data: bytes,
    name: str = "upload",
    max_pixels: int | None = None,
    *,
    max_decode_work: int | None = None,
    max_decode_bytes: int | None = None,
) -> np.ndarray:
    """Decode image bytes (PNG, JPEG, TIFF; format from the content, not the name) to RGB uint8.

    Everything is checked from the headers before decoding, so a hostile upload costs
    milliseconds: the pixel count, then for JPEG the scans and compression ratio (see
    :func:`check_jpeg`) and for TIFF the compression, strip/tile count and peak memory (see
    :func:`_check_tiff_costs`).

    Args:
        data: the uploaded bytes.
        name: names the upload in error messages.
        max_pixels: most width x height (None: no pixel limit).
        max_decode_work: most JPEG decoding work in pixel-scans (declared pixels x scans);
            default ``max_pixels * DECODE_WORK_PER_PIXEL``.
        max_decode_bytes: most estimated peak memory of decoding plus conversion, in bytes;
            default ``max_pixels * DECODE_BYTES_PER_PIXEL``.

    Raises:
        UnsupportedImage: not an image format histolite reads, or a colour model it does not
            convert (CMYK, CIELAB...).
        ImageTooLarge: more than ``max_pixels`` pixels; its subclass DecodeBudgetExceeded when
            the decoding work, compression ratio, strips/tiles or peak memory are over budget.
        DataError: corrupt, truncated or grayscale.
    """
    if not data:
        raise DataError(f"{name}: empty file")
    limits = DecodeLimits.for_pixels(max_pixels, max_decode_work, max_decode_bytes)
    stream = io.BytesIO(data)
    try:
        if data[:4] in _TIFF_MAGIC:
            array = _read_tiff(stream, name, limits)
        else:
            size: tuple[int, int] | None = None
            if data.startswith(_JPEG_SIGNATURE):
                header = check_jpeg(data, name, limits)
                size = (header.width, header.height)
            elif data.startswith(_PNG_SIGNATURE):
                size = _check_png(data, name, limits)
            array = _read_pil(stream, name, max_pixels, expected_size=size)
    except UnsupportedImage as exc:
        claimed = next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)
        if claimed is None or not isinstance(exc.__cause__, UnidentifiedImageError):
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
