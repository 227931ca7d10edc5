"""Slide reading without a model: OME-TIFF scale, thumbnails in bounded memory, broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from histolite.slide.reader import open_slide


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
