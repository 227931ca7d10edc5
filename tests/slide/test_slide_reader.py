"""Slide reading without a model: OME-TIFF scale, thumbnails in bounded memory, broken files."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from histolite.slide.pyramid import write_pyramidal_tiff
from histolite.slide.reader import (
    THUMBNAIL_BLOCK,
    SlideError,
    TiffSlide,
    open_slide,
    thumbnail,
)


@pytest.mark.parametrize("pyramidal", [False, True])
def test_ome_tiff_scale_comes_from_the_ome_xml(pyramidal: bool, tmp_path: Path) -> None:
    """OpenSlide opens OME-TIFF as generic-tiff without mpp; tifffile reads PhysicalSizeX."""
    rng = np.random.default_rng(0)
    level0 = rng.integers(0, 256, (512, 384, 3), dtype=np.uint8)
    path = tmp_path / "s.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(
            level0,
            tile=(128, 128),
            photometric="rgb",
            subifds=1 if pyramidal else 0,
            metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25},
        )
        if pyramidal:
            tif.write(level0[::2, ::2], tile=(128, 128), photometric="rgb", subfiletype=1)
    slide = open_slide(path)
    try:
        assert slide.info.mpp == pytest.approx(0.25)
        assert slide.info.mpp_source == "OME-XML PhysicalSizeX"
        assert (slide.info.width, slide.info.height) == (384, 512)
        assert len(slide.info.level_dimensions) == (2 if pyramidal else 1)
        np.testing.assert_array_equal(
            slide.read_level(0, 100, 200, 64, 64), level0[200:264, 100:164]
        )
    finally:
        slide.close()


def _gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    channels = [x * 255 // (width - 1), y * 255 // (height - 1), (7 * x + 3 * y) % 256]
    return np.stack(channels, axis=-1).astype(np.uint8)


@pytest.mark.parametrize("layout", ["strips", "tiles"])
def test_thumbnail_of_a_single_level_slide_reads_bounded_blocks(
    layout: str, tmp_path: Path
) -> None:
    """A flat slide is shrunk block by block, not decoded whole, and the result is unchanged."""
    level0 = _gradient(2300, 3100)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(
        path,
        level0,
        photometric="rgb",
        compression="zlib",
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
        **({"rowsperstrip": 16} if layout == "strips" else {"tile": (256, 256)}),
    )
    slide = open_slide(path)  # strips: tifffile; tiles: OpenSlide's generic-tiff
    sizes: list[int] = []

    def recording(read: Any) -> Any:
        def read_box(level: int, x: int, y: int, width: int, height: int) -> Any:
            sizes.append(width * height)
            return read(level, x, y, width, height)

        return read_box

    # OpenSlide's overview blocks stay PIL images (read_level_image); tifffile's are arrays
    for name in ("read_level", "read_level_image"):
        if hasattr(slide, name):
            setattr(slide, name, recording(getattr(slide, name)))
    try:
        thumb, scale = thumbnail(slide, 512)
    finally:
        slide.close()
    assert sizes, "no block was read through the reader"
    assert thumb.shape == (380, 512, 3) and scale == pytest.approx(3100 / 512)
    assert max(sizes) <= (THUMBNAIL_BLOCK + 8) ** 2 < level0.shape[0] * level0.shape[1] / 4
    whole = Image.fromarray(level0).resize((512, 380), Image.Resampling.BOX)
    assert np.abs(thumb.astype(int) - np.asarray(whole)).max() <= 1  # one resize of the level


def test_stripped_tiff_regions_decode_only_their_strips(tmp_path: Path) -> None:
    """A region of a stripped TIFF costs its strips, not the page (memory flat in slide size)."""
    level0 = _gradient(3000, 3000)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(
        path,
        level0,
        photometric="rgb",
        compression="zlib",
        rowsperstrip=32,
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )
    slide = TiffSlide(path)
    try:
        tracemalloc.start()
        region = slide.read_level(0, 1000, 2990, 256, 256)  # past the bottom edge: white
        thumb, _ = thumbnail(slide, 300)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        slide.close()
    np.testing.assert_array_equal(region[:10], level0[2990:, 1000:1256])
    assert (region[10:] == 255).all()
    assert thumb.shape == (300, 300, 3)
    assert peak < level0.nbytes / 3, peak


SVS = Path(__file__).resolve().parents[3] / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


@pytest.mark.parametrize("keep", [8, 1000, 150_000])
def test_a_truncated_file_is_named_and_called_truncated(keep: int, tmp_path: Path) -> None:
    """An SVS keeps its directories at the end: cut short, it has a header and no pages."""
    source = SVS.read_bytes() if SVS.is_file() else b"II*\x00\x00\x00\x10\x00" + bytes(200_000)
    cut = tmp_path / "cut.svs"
    cut.write_bytes(source[:keep])
    with pytest.raises(SlideError, match=r"cut\.svs: truncated or not a slide") as caught:
        open_slide(cut)
    assert "max()" not in str(caught.value)


def test_tiles_past_the_end_of_a_truncated_pyramid_are_named(tmp_path: Path) -> None:
    whole = write_pyramidal_tiff(tmp_path / "whole.tif", _gradient(600, 800), mpp=0.5, tile=128)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    slide = open_slide(cut)  # the first directory is whole; tiles after the cut are gone
    try:
        with pytest.raises(SlideError, match=r"cut\.tif: truncated or not a slide: tile \d+"):
            slide.read_level(0, 0, 0, 800, 600)
    finally:
        slide.close()


def test_openslide_image_reads_equal_array_reads_inside_and_past_the_edge(tmp_path: Path) -> None:
    """The overview's PIL path flattens transparency exactly as the array path does."""
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(
        path,
        _gradient(600, 700),
        photometric="rgb",
        tile=(256, 256),
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    slide = open_slide(path)
    try:
        assert slide.info.reader.startswith("openslide")
        for box in ((0, 0, 300, 200), (650, 550, 120, 90)):  # opaque; half outside (transparent)
            image = slide.read_level_image(0, *box)  # type: ignore[attr-defined]
            assert image.mode == "RGB"
            assert np.array_equal(np.asarray(image), slide.read_level(0, *box))
    finally:
        slide.close()


@pytest.mark.parametrize(
    ("unit", "resolution", "why"),
    [
        ("INCH", 300.0, "no usable microns per pixel"),  # an image editor's 300 dpi: 84.7 µm/px
        ("CENTIMETER", 100.0, "give 100 microns per pixel, outside the 0.05-16"),
    ],
)
def test_a_resolution_no_scanner_records_asks_for_mpp(
    unit: str, resolution: float, why: str, tmp_path: Path
) -> None:
    """A flat TIFF's dpi would cut 1-pixel tiles and scale them up, silently; refuse it."""
    path = tmp_path / "photo.tif"
    tifffile.imwrite(
        path,
        _gradient(256, 256),
        photometric="rgb",
        tile=(64, 64),
        resolution=(resolution, resolution),
        resolutionunit=unit,
    )
    with pytest.raises(SlideError, match=rf"photo\.tif: .*{why}.*pass --mpp"):
        open_slide(path)
    slide = open_slide(path, mpp=0.5)
    try:
        assert slide.info.mpp == 0.5 and slide.info.mpp_source == "given (--mpp)"
    finally:
        slide.close()


def test_ome_scale_is_read_from_the_chosen_image_not_a_label_before_it(tmp_path: Path) -> None:
    path = tmp_path / "label_first.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(
            _gradient(64, 64),
            photometric="rgb",
            metadata={"axes": "YXS", "Name": "label", "PhysicalSizeX": 10.0},
        )
        tif.write(
            _gradient(512, 384),
            tile=(128, 128),
            photometric="rgb",
            metadata={"axes": "YXS", "Name": "tissue", "PhysicalSizeX": 0.25},
        )
    slide = TiffSlide(path)
    try:
        assert (slide.info.width, slide.info.mpp) == (384, pytest.approx(0.25))
    finally:
        slide.close()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_refused_slide_does_not_keep_its_file_open(tmp_path: Path) -> None:
    path = tmp_path / "no_mpp.tif"
    tifffile.imwrite(path, _gradient(256, 256), tile=(64, 64), photometric="rgb")
    before = len(list(Path("/proc/self/fd").iterdir()))
    for _ in range(10):
        for reader in (open_slide, TiffSlide):
            with pytest.raises(SlideError, match="pass --mpp"):
                reader(path)
    assert len(list(Path("/proc/self/fd").iterdir())) == before
