"""Uploads are bounded from their headers before decoding (issue: a hostile client's findings).

Each test fails on the code before the fix: a 21 KB progressive JPEG declaring 7000 x 8000
pixels decoded for 48 s, a 16-bit RGBA TIFF peaked at ~1 GB, CMYK and CIELAB TIFFs were
classified as if RGB(A). The hostile files here are tiny: only their headers declare large sizes,
and spies assert that nothing was decoded.
"""

from __future__ import annotations

import contextlib
import io
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from histolite.data import images
from histolite.data.images import (
    DecodeBudgetExceeded,
    DecodeLimits,
    ImageTooLarge,
    JpegHeader,
    UnsupportedImage,
    check_jpeg,
    decode_rgb,
    load_rgb,
    read_jpeg_header,
)
from histolite.errors import DataError

SERVICE = DecodeLimits.for_pixels(60_000_000)  # the service's default limits


class DecodeAttempted(Exception):
    """Raised by the spies: a decoder was reached (not a DataError, so nothing swallows it)."""


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace Pillow's and tifffile's pixel decoding (and Pillow's open) by spies that record
    the call and raise :class:`DecodeAttempted` instead of spending the decode."""
    calls: list[str] = []

    def spy(kind: str):  # type: ignore[no-untyped-def]
        def refuse(*args: object, **kwargs: object) -> None:
            calls.append(kind)
            raise DecodeAttempted(kind)

        return refuse

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy("pillow load"))
    monkeypatch.setattr(tifffile.TiffPage, "asarray", spy("tifffile asarray"))
    return calls


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Spy on ``PIL.Image.open``: refusals from our own header parse happen before it."""
    calls: list[str] = []
    original = Image.open

    def spy(*args: object, **kwargs: object) -> Image.Image:
        calls.append("open")
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", spy)
    return calls


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _smooth(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)


def _jpeg(pixels: np.ndarray | Image.Image, **save: object) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **save)
    return buffer.getvalue()


def _declare_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its frame header (SOF) patched to declare ``width`` x ``height``."""
    out, pos = bytearray(data), 2
    while True:
        assert out[pos] == 0xFF, "walked off the marker segments before the frame header"
        code, length = out[pos + 1], int.from_bytes(out[pos + 2 : pos + 4], "big")
        if code in (0xC0, 0xC1, 0xC2):
            out[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
            return bytes(out)
        pos += 2 + length


def _tiff(array: np.ndarray, **write: object) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **write)
    return buffer.getvalue()


def _declare_tiff_tags(data: bytes, values: dict[int, int]) -> bytes:
    """The same little-endian TIFF with first-IFD SHORT/LONG tags set to ``values``."""
    out = bytearray(data)
    assert out[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", out, 4)[0]
    for entry in range(struct.unpack_from("<H", out, ifd)[0]):
        at = ifd + 2 + 12 * entry
        tag, kind, count = struct.unpack_from("<HHI", out, at)
        if tag in values:
            assert count == 1 and kind in (3, 4), (tag, kind, count)
            struct.pack_into("<H" if kind == 3 else "<I", out, at + 8, values[tag])
    return bytes(out)


def _png_header(width: int, height: int, colour_type: int = 2) -> bytes:
    """A PNG declaring ``width`` x ``height`` 8-bit pixels with a few bytes of image data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


# 1. ---------------------------------------------------------------- JPEG decoding work
def test_progressive_jpeg_declaring_56_mpx_is_refused_fast_without_decoding(
    decodes: list[str],
) -> None:
    """The finding: 21 KB, 7000 x 8000 declared, 47.9 s to decode (a pass per scan)."""
    data = _declare_jpeg_size(_jpeg(_noise(64, 64), progressive=True), 7000, 8000)
    assert len(data) < 25_000 and 7000 * 8000 <= 60_000_000  # small, and within the pixel limit
    started = time.perf_counter()
    with pytest.raises(DecodeBudgetExceeded, match=r"7000 x 8000.*10 scans") as caught:
        decode_rgb(data, "bomb.jpg", max_pixels=60_000_000)
    assert time.perf_counter() - started < 1.0
    assert "560,000,000 pixel-scans" in str(caught.value) and "240,000,000" in str(caught.value)
    assert isinstance(caught.value, ImageTooLarge)  # served as 413
    assert decodes == []


def test_jpeg_with_hundreds_of_scans_is_refused_at_any_size(decodes: list[str]) -> None:
    """Each scan is a pass with its own set-up: a tiny image with thousands still costs seconds."""
    data = _jpeg(_noise(64, 64), progressive=True)
    last_scan, end = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    many = data[:end] + data[last_scan:end] * 120 + data[end:]
    with pytest.raises(DecodeBudgetExceeded, match=r"more than 100 scans"):
        decode_rgb(many, "scans.jpg")  # no pixel limit at all
    assert decodes == []


def test_baseline_jpeg_with_an_impossible_compression_ratio_is_refused(
    decodes: list[str],
) -> None:
    """One scan is within the work budget, but 168 MB of pixels cannot come from a few KB of
    Huffman-coded data: libjpeg would decode the full size and fill the missing part with grey."""
    data = _declare_jpeg_size(_jpeg(_noise(64, 64)), 7000, 8000)
    with pytest.raises(DecodeBudgetExceeded, match=r"compression ratio.*limit 2,000:1"):
        decode_rgb(data, "ratio.jpg", max_pixels=60_000_000)
    assert decodes == []


def test_normal_progressive_jpeg_decodes_as_pillow_does() -> None:
    data = _jpeg(_smooth(256, 320), quality=90, progressive=True)
    assert read_jpeg_header(data).scans == 10  # libjpeg's standard progression
    with Image.open(io.BytesIO(data)) as reference:
        expected = np.asarray(reference.convert("RGB"))
    np.testing.assert_array_equal(decode_rgb(data, "p.jpg", max_pixels=60_000_000), expected)


def test_legitimate_large_jpegs_pass_the_header_check() -> None:
    """A 60 Mpx baseline JPEG and an 8 Mpx progressive photo are accepted (checked from the
    headers only: the scan data is that of a 512 x 512 photo-like image at quality 95)."""
    baseline = _declare_jpeg_size(_jpeg(_noise(512, 512), quality=95), 7745, 7745)
    header = check_jpeg(baseline, "scan.jpg", SERVICE)
    assert (header.width * header.height, header.scans, header.progressive) == (
        59_985_025,
        1,
        False,
    )
    photo = _jpeg(_noise(512, 512, seed=1), quality=95, progressive=True)
    header = check_jpeg(_declare_jpeg_size(photo, 3264, 2448), "photo.jpg", SERVICE)
    assert (header.scans, header.progressive) == (10, True)
    # the trade-off: progressive images are accepted up to 40% of the pixel limit
    with pytest.raises(DecodeBudgetExceeded, match="pixel-scans"):
        check_jpeg(_declare_jpeg_size(photo, 7745, 7745), "big.jpg", SERVICE)


def test_multi_scan_jpeg_memory_counts_the_coefficient_buffer() -> None:
    """libjpeg keeps every DCT coefficient of a multi-scan image (2 bytes each, 6 B/px at
    4:4:4) on top of Pillow's image and our RGB copy."""
    assert JpegHeader(16, 16, 3, 8, ((2, 2), (1, 1), (1, 1)), True, 10, 1).coefficient_bytes == (
        6 * 64 * 2  # one 4:2:0 MCU: four luma blocks and two chroma blocks
    )
    textured = np.clip(_smooth(256, 256) + _noise(256, 256) // 16, 0, 255).astype(np.uint8)
    photo = _jpeg(textured, quality=95, progressive=True, subsampling=0)
    data = _declare_jpeg_size(photo, 2000, 2000)
    limits = DecodeLimits(max_bytes=40_000_000)
    with pytest.raises(DecodeBudgetExceeded, match=r"about 52 MB.*DCT coefficients"):
        check_jpeg(data, "444.jpg", limits)
    baseline = _declare_jpeg_size(_jpeg(textured, quality=95, subsampling=0), 2000, 2000)
    assert check_jpeg(baseline, "444.jpg", limits).coefficient_bytes == 0  # 28 MB: accepted


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=400), flips=st.lists(st.integers(0, 10_000), max_size=8))
def test_jpeg_header_parser_fails_only_with_data_errors(body: bytes, flips: list[int]) -> None:
    """Random and corrupted JPEGs give a header (or pixels) or a DataError, nothing else."""
    base = bytearray(_jpeg(_noise(16, 16), progressive=True))
    for at in flips:
        base[at % len(base)] ^= 0x5A
    for data in (b"\xff\xd8\xff" + body, bytes(base)):
        with contextlib.suppress(DataError):
            check_jpeg(data, "fuzz.jpg", SERVICE)
        with contextlib.suppress(DataError):
            decode_rgb(data, "fuzz.jpg", max_pixels=60_000_000)


# 2. ---------------------------------------------------------------- TIFF memory
def test_16_bit_rgba_tiff_over_the_byte_budget_is_refused_without_decoding(
    decodes: list[str],
) -> None:
    """The finding: ~1 GB per 16-bit RGBA TIFF. 7000 x 7000 is within 60 Mpx, but decoded it
    is 392 MB of samples plus the 147 MB RGB copy: 11 B/px, past the service's 8 B/px."""
    small = _tiff(np.zeros((16, 16, 4), np.uint16), photometric="rgb")
    data = _declare_tiff_tags(small, {256: 7000, 257: 7000, 278: 7000})
    assert len(data) < 4096
    with pytest.raises(DecodeBudgetExceeded, match=r"16-bit.*539 MB.*budget of 480 MB"):
        decode_rgb(data, "deep.tif", max_pixels=60_000_000)
    assert decodes == []
    # the same size in 8-bit RGBA (343 MB at the peak) is within budget: it reaches the decoder
    small8 = _tiff(np.zeros((16, 16, 4), np.uint8), photometric="rgb")
    data8 = _declare_tiff_tags(small8, {256: 7000, 257: 7000, 278: 7000})
    with pytest.raises(DataError, match=r"unreadable TIFF \(tifffile asarray\)"):
        decode_rgb(data8, "rgba8.tif", max_pixels=60_000_000)
    assert decodes == ["tifffile asarray"]


def test_16_bit_rgba_converts_with_one_rgb_copy_of_memory() -> None:
    """16-bit to 8-bit and alpha compositing run fused by bands: the peak is the decoded array
    plus the 3 B/px output (the old path added a full 8-bit RGBA copy, 4 B/px more)."""
    rgba = np.random.default_rng(0).integers(0, 65536, (4000, 250, 4), dtype=np.uint16)
    data = _tiff(rgba, photometric="rgb")
    expected = images._flatten_alpha(images._to_8bit(rgba))
    tracemalloc.start()
    out = decode_rgb(data, "deep.tif")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_array_equal(out, expected)
    pixels = 4000 * 250
    assert peak < pixels * (8 + 3) + 2_500_000, peak / pixels


def test_jpeg_tile_declaring_more_than_its_tile_is_refused_without_decoding(
    decodes: list[str],
) -> None:
    """Each JPEG tile is decoded at the size its own header declares before tifffile compares
    it with the tile: one patched tile cost 0.5 s and 168 MB."""
    data = bytearray(
        _tiff(_noise(512, 512), photometric="rgb", compression="jpeg", tile=(256, 256))
    )
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    tile = _declare_jpeg_size(bytes(data[offset : offset + count]), 7000, 8000)
    data[offset : offset + count] = tile
    with pytest.raises(
        DataError, match=r"JPEG segment 0 declares 7000 x 8000 pixels in a 256 x 256"
    ):
        decode_rgb(bytes(data), "tiles.tif", max_pixels=60_000_000)
    assert decodes == []


def test_too_many_strips_and_unchecked_codecs_are_refused(
    monkeypatch: pytest.MonkeyPatch, decodes: list[str]
) -> None:
    monkeypatch.setattr(images, "MAX_TIFF_SEGMENTS", 8)  # 100,000 in service; 16 strips here
    strips = _tiff(_noise(16, 4), photometric="rgb", compression="zlib", rowsperstrip=1)
    with pytest.raises(DecodeBudgetExceeded, match="16 strips or tiles"):
        decode_rgb(strips, "strips.tif")
    # a PNG-compressed TIFF decodes to the size its PNG stream declares: refused for uploads
    png_tiff = _tiff(_noise(16, 16), photometric="rgb", compression="png")
    with pytest.raises(UnsupportedImage, match=r"compression PNG.*accepted: .*JPEG"):
        decode_rgb(png_tiff, "png.tif")
    assert decodes == []


def _deflate_bomb_tiff() -> bytes:
    """A 16 x 16 RGB Deflate TIFF whose one strip inflates to 50 MB instead of 768 bytes: the
    strip of a valid file replaced (StripOffsets, StripByteCounts) by zeros deflated."""
    small = _tiff(np.zeros((16, 16, 3), np.uint8), photometric="rgb", compression="zlib")
    bomb = zlib.compress(bytes(50_000_000), 9)
    data = _declare_tiff_tags(small, {273: len(small), 279: len(bomb)}) + bomb
    with tifffile.TiffFile(io.BytesIO(data)) as tif:  # the tags say what the bomb needs
        page = tif.pages[0]
        assert (page.compression, page.shape, page.databytecounts) == (8, (16, 16, 3), (len(bomb),))
    return data


def test_compressed_tiffs_are_refused_without_imagecodecs(
    monkeypatch: pytest.MonkeyPatch, decodes: list[str]
) -> None:
    """Review finding A: tifffile's fallback without imagecodecs (a ``serve``-only install)
    ignores the output size, so a Deflate strip of a 16 x 16 image inflated to all it held."""
    monkeypatch.setattr(images, "imagecodecs_available", lambda: False)
    bomb = _deflate_bomb_tiff()
    assert len(bomb) < 100_000
    with pytest.raises(UnsupportedImage, match=r"compression Deflate .*histolite\[slide\]") as info:
        decode_rgb(bomb, "bomb.tif", max_pixels=60_000_000)
    assert "imagecodecs" in str(info.value)
    others = [("zstd", "Zstd"), ("lzma", "LZMA"), ("packbits", "PackBits"), ("lzw", "LZW")]
    for compression, named in [*others, ("jpeg", "JPEG")]:  # LZW, JPEG: no fallback at all
        data = _tiff(_smooth(16, 16), photometric="rgb", compression=compression)
        with pytest.raises(UnsupportedImage, match=rf"compression {named} is not accepted on"):
            decode_rgb(data, "small.tif")
    assert decodes == []


def test_a_codec_missing_from_the_imagecodecs_build_is_refused(
    monkeypatch: pytest.MonkeyPatch, decodes: list[str]
) -> None:
    """tifffile takes its unbounded fallback for one codec that imagecodecs was built without."""
    import imagecodecs

    data = _tiff(_smooth(16, 16), photometric="rgb", compression="zstd")
    monkeypatch.setattr(imagecodecs, "ZSTD", type("ZSTD", (), {"available": False}))
    with pytest.raises(UnsupportedImage, match="compression Zstd is not accepted on this server"):
        decode_rgb(data, "zstd.tif")
    assert decodes == []


def test_uncompressed_tiffs_need_no_imagecodecs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "imagecodecs_available", lambda: False)
    plain = _tiff(_smooth(16, 16), photometric="rgb")
    assert decode_rgb(plain, "plain.tif").tolist() == _smooth(16, 16).tolist()


def test_a_strip_holding_more_bytes_than_it_decodes_to_is_refused(decodes: list[str]) -> None:
    """With imagecodecs the bomb's output is cut at the strip's size, but 48 KB of data for a
    768-byte strip is crafted: refused from the tags, before reading it."""
    assert images.imagecodecs_available()  # the dev install has the slide extra
    message = r"strip/tile 0 holds [\d,]+ bytes of Deflate data for 768 bytes of pixels"
    with pytest.raises(DecodeBudgetExceeded, match=message + r"; expected at most 2,560"):
        decode_rgb(_deflate_bomb_tiff(), "bomb.tif", max_pixels=60_000_000)
    assert decodes == []


@pytest.mark.parametrize("compression", ["zlib", "zstd", "lzma", "packbits", "lzw", None])
def test_noise_in_every_accepted_codec_passes_the_byte_count_check(
    compression: str | None,
) -> None:
    """Incompressible data is the worst honest case (LZW expands it): still decoded exactly."""
    noise = _noise(64, 48)
    data = _tiff(noise, photometric="rgb", compression=compression, rowsperstrip=3)
    assert np.array_equal(decode_rgb(data, "noise.tif", max_pixels=60_000_000), noise)


# 3. ---------------------------------------------------------------- colour models
@pytest.mark.parametrize(
    ("photometric", "samples", "named"),
    [("separated", 4, r"SEPARATED \(CMYK\)"), ("cielab", 3, "CIELAB")],
)
def test_cmyk_and_cielab_tiffs_are_refused_naming_the_photometric(
    tmp_path: Path, decodes: list[str], photometric: str, samples: int, named: str
) -> None:
    """They were classified as RGB(A): CMYK's black channel taken for alpha, L*a*b* for R, G, B."""
    data = _tiff(np.full((16, 16, samples), 60, np.uint8), photometric=photometric)
    message = rf"{named} is not converted to RGB; accepted: RGB, palette, YCbCr"
    with pytest.raises(UnsupportedImage, match=message):
        decode_rgb(data, "colour.tif")
    path = tmp_path / "colour.tif"
    path.write_bytes(data)
    with pytest.raises(UnsupportedImage, match=named):
        load_rgb(path)  # training data follows the same rules
    assert decodes == []


def test_palette_ycbcr_and_alpha_tiffs_convert_correctly() -> None:
    indices = np.array([[0, 1], [2, 1]], np.uint8)
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, :3] = np.array([[65535, 0, 0], [0, 32896, 0], [0, 0, 257]])  # 16-bit values
    palette = decode_rgb(_tiff(indices, photometric="palette", colormap=colormap), "p.tif")
    assert palette.tolist() == [[[255, 0, 0], [0, 128, 0]], [[0, 0, 1], [0, 128, 0]]]

    smooth = _smooth(64, 64)  # tifffile writes JPEG-compressed RGB as YCbCr, decodes it to RGB
    ycbcr = _tiff(smooth, photometric="rgb", compression="jpeg")
    with tifffile.TiffFile(io.BytesIO(ycbcr)) as tif:
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.YCBCR
    decoded = decode_rgb(ycbcr, "ycbcr.tif").astype(int)
    assert np.abs(decoded - smooth.astype(int)).mean() < 4

    pixel = np.array([[[100, 100, 100, 128]]], np.uint8)  # colour, then a half alpha
    premultiplied = _tiff(pixel, photometric="rgb", extrasamples=["assocalpha"])
    assert decode_rgb(premultiplied, "a.tif").tolist() == [[[227, 227, 227]]]  # 100 + 127
    straight = _tiff(pixel, photometric="rgb", extrasamples=["unassalpha"])
    assert decode_rgb(straight, "s.tif").tolist() == [[[177, 177, 177]]]  # 100 x a + 255 x (1-a)
    unspecified = _tiff(pixel, photometric="rgb", extrasamples=["unspecified"])
    assert decode_rgb(unspecified, "u.tif").tolist() == [[[100, 100, 100]]]  # not alpha: dropped


def test_cmyk_and_grayscale_jpegs_are_refused_from_the_header(
    tmp_path: Path, decodes: list[str]
) -> None:
    """CMYK is refused, not converted: Pillow's conversion ignores the colour profile, and the
    press profile decides what a CMYK value looks like (stain colours would shift)."""
    cmyk = _jpeg(Image.new("CMYK", (32, 32), (0, 200, 200, 0)))
    with pytest.raises(UnsupportedImage, match=r"CMYK JPEG \(4 components\).*RGB \(sRGB\)"):
        decode_rgb(cmyk, "press.jpg")
    gray = _jpeg(Image.new("L", (32, 32), 128))
    with pytest.raises(DataError, match=r"grayscale image \(JPEG with 1 component\)"):
        decode_rgb(gray, "gray.jpg")
    assert decodes == []
    path = tmp_path / "press.jpg"
    path.write_bytes(cmyk)
    with pytest.raises(UnsupportedImage, match="CMYK image"):
        load_rgb(path)  # training data: refused by the mode, before decoding
    assert decodes == []


def test_new_refusals_map_to_their_http_statuses() -> None:
    from histolite.serve.middleware import client_status

    assert client_status(DecodeBudgetExceeded("x")) == 413
    assert client_status(UnsupportedImage("x")) == 415


# PNG ---------------------------------------------------------------- declared size
def test_png_declaring_a_huge_size_is_refused_from_its_header(opens: list[str]) -> None:
    """Refused by our limit, named, before Pillow opens it (Pillow's own guard spoke before,
    with its own limit and wording)."""
    data = _png_header(20000, 20000)
    assert len(data) < 100
    with pytest.raises(ImageTooLarge, match=r"20000x20000 pixels exceeds the limit of 60000000"):
        decode_rgb(data, "bomb.png", max_pixels=60_000_000)
    with pytest.raises(DataError, match=r"grayscale image \(PNG colour type 0\)"):
        decode_rgb(_png_header(64, 64, colour_type=0), "gray.png", max_pixels=60_000_000)
    assert opens == []


def test_the_configured_pixel_limit_applies_rather_than_pillows(decodes: list[str]) -> None:
    """95 Mpx is over Pillow's warning threshold (89 Mpx) but within a limit raised to 100 Mpx:
    it goes on to decoding instead of being refused with Pillow's limit."""
    with pytest.raises(DecodeAttempted):
        decode_rgb(_png_header(10000, 9500), "big.png", max_pixels=100_000_000)
    assert decodes == ["pillow load"]


def _png_chunk(kind: bytes, data: bytes = b"") -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


@pytest.mark.parametrize(("kind", "count"), [(b"abCd", 1_001), (b"IDAT", 50_001)])
def test_png_padded_with_chunks_is_refused_before_decoding(
    kind: bytes, count: int, decodes: list[str]
) -> None:
    """2 million empty chunks in a 24 MB upload cost Pillow 12 s inside a prediction slot."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 150)).save(buffer, "PNG")
    png = buffer.getvalue()
    padded = png[:33] + _png_chunk(kind) * count + png[33:]  # after IHDR (8 + 25 bytes)
    with pytest.raises(DecodeBudgetExceeded, match=r"x\.png: a PNG of more than 50,000 chunks"):
        decode_rgb(padded, "x.png")
    assert decodes == []


def test_png_with_a_few_text_chunks_decodes() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 150)).save(buffer, "PNG")
    png = buffer.getvalue()
    few = png[:33] + _png_chunk(b"tEXt", b"a\0b") * 20 + png[33:]
    assert decode_rgb(few, "few.png").shape == (16, 16, 3)


def test_tiff_page_count_is_not_walked_to_refuse_a_second_page(
    decodes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """len(pages) walked a crafted chain of 4 million empty pages for 8 s before refusing."""

    def walk_all(pages: object) -> int:
        raise AssertionError("every page was walked to count them")

    monkeypatch.setattr(tifffile.TiffPages, "__len__", walk_all)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.full((16, 16, 3), 200, np.uint8), photometric="rgb")
    data = bytearray(buffer.getvalue())
    first = struct.unpack_from("<I", data, 4)[0]
    next_field = first + 2 + 12 * struct.unpack_from("<H", data, first)[0]
    start = len(data) + len(data) % 2
    data += b"\0" * (start - len(data))
    struct.pack_into("<I", data, next_field, start)
    pages = 1_000
    for i in range(pages):  # empty directories, each pointing at the next
        data += struct.pack("<HI", 0, start + 6 * (i + 1) if i + 1 < pages else 0)
    with pytest.raises(UnsupportedImage, match=r"chain\.tif: a TIFF of several pages"):
        decode_rgb(bytes(data), "chain.tif", max_pixels=60_000_000)
    assert decodes == []
