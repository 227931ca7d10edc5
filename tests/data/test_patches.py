from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histolite.data.folder import Sample
from histolite.data.patches import (
    aggregate_patch_predictions,
    extract_patches,
    grid_positions,
    index_patches,
    patch_grid_shape,
    tissue_fraction,
)
from histolite.errors import DataError
from histolite.runspec import PatchSpec


@pytest.mark.parametrize(
    ("h", "w", "k", "s", "expected"),
    [
        (1536, 2048, 512, 256, 35),  # BACH paper: 5 x 7
        (150, 150, 150, 150, 1),
        (150, 150, 64, 32, 9),
        (100, 300, 50, 50, 12),
        (49, 300, 50, 50, 0),
    ],
)
def test_patch_count_formula(h: int, w: int, k: int, s: int, expected: int) -> None:
    rows, cols = patch_grid_shape(h, w, k, s)
    assert rows * cols == expected
    assert len(grid_positions(h, w, k, s)) == expected
    if expected:
        assert rows == (h - k) // s + 1 and cols == (w - k) // s + 1


def test_patches_stay_inside_the_image() -> None:
    for y, x in grid_positions(1536, 2048, 512, 256):
        assert 0 <= y <= 1536 - 512 and 0 <= x <= 2048 - 512


def test_tissue_fraction() -> None:
    patch = np.full((10, 10, 3), 245, np.uint8)
    assert tissue_fraction(patch) == 0.0
    patch[:5] = (150, 60, 160)
    assert tissue_fraction(patch) == pytest.approx(0.5)


def _tiff(path: Path, h: int, w: int, tissue_rows: int) -> Path:
    pixels = np.full((h, w, 3), 250, np.uint8)
    pixels[:tissue_rows] = (160, 80, 170)
    tifffile.imwrite(path, pixels, photometric="rgb")
    return path


def test_index_keeps_coordinates_label_group_and_filters_background(tmp_path: Path) -> None:
    image = _tiff(tmp_path / "big.tif", 96, 128, tissue_rows=32)
    sample = Sample(image, 2, "Invasive", "patient7")
    everything = index_patches([sample], PatchSpec(32))
    assert len(everything) == 3 * 4
    assert {(r.label, r.group) for r in everything} == {(2, "patient7")}
    assert (everything[5].y, everything[5].x) == (32, 32)
    tissue = index_patches([sample], PatchSpec(32, min_tissue=0.5))
    assert [(r.y, r.x) for r in tissue] == [(0, 0), (0, 32), (0, 64), (0, 96)]
    with pytest.raises(DataError, match="no patches"):
        index_patches([sample], PatchSpec(256))


def test_extract_patches_writes_pngs(tmp_path: Path) -> None:
    image = _tiff(tmp_path / "slide.tiff", 64, 96, tissue_rows=64)
    written = extract_patches(image, tmp_path / "out", 32, 16)
    assert len(written) == 3 * 5
    assert written[0].name == "slide_y0_x0.png"
    source = tifffile.imread(image)
    for path in written:  # each PNG holds exactly the source pixels at its name's position
        y, x = (int(part[1:]) for part in path.stem.split("_")[1:])
        np.testing.assert_array_equal(np.asarray(Image.open(path)), source[y : y + 32, x : x + 32])


def test_aggregation_majority_and_mean() -> None:
    probs = np.array(
        [
            [0.6, 0.4],
            [0.55, 0.45],
            [0.0, 1.0],  # image 0: vote says 0, mean says 1
            [0.2, 0.8],  # image 1
            [0.9, 0.1],
            [0.2, 0.8],  # image 2: one vote each; the tie goes to the higher mean (0.55: class 0)
        ]
    )
    result = aggregate_patch_predictions([0, 0, 0, 1, 2, 2], probs)
    assert [(r.majority_vote, r.mean_probability, r.n_patches) for r in result[:2]] == [
        (0, 1, 3),
        (1, 1, 1),
    ]
    np.testing.assert_allclose(result[0].mean_probs, [0.3833333, 0.6166667], atol=1e-6)
    assert (result[2].majority_vote, result[2].mean_probability) == (0, 0)
