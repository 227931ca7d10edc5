from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histolite.data.images import image_size, load_rgb
from histolite.errors import DataError


def _rgb(h: int = 20, w: int = 30) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext", [".png", ".tif", ".tiff"])
def test_lossless_formats_roundtrip(tmp_path: Path, ext: str) -> None:
    pixels = _rgb()
    path = tmp_path / f"x{ext}"
    if ext == ".png":
        Image.fromarray(pixels).save(path)
    else:
        tifffile.imwrite(path, pixels, photometric="rgb")
    loaded = load_rgb(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (20, 30, 3)
    np.testing.assert_array_equal(loaded, pixels)
    assert image_size(path) == (20, 30)


def test_jpeg_reads_as_rgb(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    Image.fromarray(_rgb()).save(path, quality=95)
    assert load_rgb(path).shape == (20, 30, 3)


def test_sixteen_bit_tiff_is_scaled_to_eight_bit(tmp_path: Path) -> None:
    pixels = _rgb().astype(np.uint16) * 257
    path = tmp_path / "x16.tif"
    tifffile.imwrite(path, pixels, photometric="rgb")
    np.testing.assert_array_equal(load_rgb(path), _rgb())


def test_planar_tiff_is_transposed(tmp_path: Path) -> None:
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(_rgb(), -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(load_rgb(path), _rgb())


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    path = tmp_path / "a.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    out = load_rgb(path)
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[3, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_grayscale_is_rejected_naming_the_file(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"gray{ext}"
    gray = np.full((8, 8), 128, np.uint8)
    if ext == ".png":
        Image.fromarray(gray).save(path)
    else:
        tifffile.imwrite(path, gray)
    with pytest.raises(DataError, match=r"gray.*grayscale"):
        load_rgb(path)


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(_rgb(64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=r"cut\.png.*(unreadable|truncated)"):
        load_rgb(path)


def test_garbage_and_unsupported_extension(tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"junk\.png"):
        load_rgb(junk)
    other = tmp_path / "x.bmp"
    other.write_bytes(b"BM")
    with pytest.raises(DataError, match="unsupported extension"):
        load_rgb(other)
    with pytest.raises(DataError, match="not found"):
        load_rgb(tmp_path / "missing.png")
