"""The served Grad-CAM grid (``runtime/cam.py``): coarse for large images, patches in place."""

from __future__ import annotations

import numpy as np


def test_large_images_get_a_coarser_grid_with_the_hot_spot_in_place() -> None:
    """A 4,000 px wide image of 32 px patches with 8 x 8 maps would be 1,000 cells wide."""
    from histolite.runtime.cam import MAX_CAM_CELLS, CamCanvas

    boxes = [(y, x, 32, 32) for y in (0, 32) for x in range(0, 4000 - 31, 32)]
    cams = np.zeros((len(boxes), 2, 8, 8), np.float32)
    hot = boxes.index((32, 2048, 32, 32))
    cams[hot, 1, 2:4, 4:6] = 5.0  # class 1, in image pixels y 40-48, x 2064-2072
    canvas = CamCanvas(boxes)
    for start in range(0, len(boxes), 16):  # batches, as the service runs them
        canvas.add(cams[start : start + 16])
    grid = canvas.grid(1)
    rows, cols = grid.values.shape
    assert max(rows, cols) <= MAX_CAM_CELLS and cols * grid.cell_width == 4000 - 4000 % 32
    r, c = np.unravel_index(grid.values.argmax(), grid.values.shape)
    assert r * grid.cell_height <= 44 < (r + 1) * grid.cell_height
    assert c * grid.cell_width <= 2068 < (c + 1) * grid.cell_width
    assert canvas.grid(0).values.max() == 0.0  # nothing for class 0


def test_overlapping_patches_land_on_their_own_pixels() -> None:
    """Found in review: each patch edge was rounded to a cell on its own, so with 224 px
    patches at stride 112 and 7 x 7 maps a patch was painted half a cell off (and some
    patches squeezed to fewer cells): up to 0.47 off the pixel-level stitching."""
    from PIL import Image

    from histolite.evaluate.explain import normalise
    from histolite.runtime.cam import CamCanvas

    rng = np.random.default_rng(0)
    size, stride, side = 224, 112, 448
    boxes = [(y, x, size, size) for y in range(0, side - size + 1, stride)
             for x in range(0, side - size + 1, stride)]  # fmt: skip
    cams = rng.random((len(boxes), 1, 7, 7)).astype(np.float32)
    canvas = CamCanvas(boxes, stride)
    canvas.add(cams)
    grid = canvas.grid(0)
    # explain.py's way, in pixels: each map scaled by its maximum, resized, overlaps averaged
    total, count = np.zeros((side, side), np.float32), np.zeros((side, side), np.float32)
    for (y, x, h, w), cam in zip(boxes, cams[:, 0], strict=True):
        scaled = Image.fromarray(cam / cam.max(), mode="F").resize(
            (w, h), Image.Resampling.BILINEAR
        )
        total[y : y + h, x : x + w] += np.asarray(scaled)
        count[y : y + h, x : x + w] += 1
    pixels = normalise(total / count)
    rows, cols = grid.values.shape
    centres_y = ((np.arange(rows) + 0.5) * grid.cell_height).astype(int)
    centres_x = ((np.arange(cols) + 0.5) * grid.cell_width).astype(int)
    sampled = pixels[np.ix_(centres_y, centres_x)]
    assert rows * grid.cell_height == side and cols * grid.cell_width == side
    assert np.abs(sampled - grid.values).max() < 0.2
    assert np.corrcoef(sampled.ravel(), grid.values.ravel())[0, 1] > 0.9
