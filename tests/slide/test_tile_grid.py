"""The tissue tiles of a slide's grid (``slide/tiles.py``): walked in chunks over the rows and
columns tissue can reach, the same tiles as the whole grid gives, and a tile budget that
refuses an enormous grid before it is held in memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import histolite.slide.tiles as tiles_module
from histolite.slide.tiles import TileBudgetExceeded, TileGrid, grid_boxes, tissue_tiles


def _whole_grid(
    grid: TileGrid, mask: np.ndarray, scale: float, min_tissue: float, shard: tuple[int, int]
) -> list[tuple[int, int, int, float]]:
    """The tissue tiles as the whole grid's boxes give them (the earlier implementation)."""
    boxes = grid_boxes(grid, mask, scale, shard)
    keep = (boxes.tissue >= min_tissue) & (boxes.tissue > 0.0)
    return [
        (int(i), int(x), int(y), round(float(f), 4))
        for i, x, y, f in zip(
            boxes.index[keep], boxes.x[keep], boxes.y[keep], boxes.tissue[keep], strict=True
        )
    ]


@pytest.mark.parametrize(
    ("size", "stride", "scale", "shard", "min_tissue"),
    [
        (64, 64, 16.0, (0, 1), 0.5),  # tiles larger than mask pixels
        (64, 32, 12.5, (1, 3), 0.01),  # overlapping tiles, a shard, fractional scale
        (5, 5, 16.0, (0, 2), 0.5),  # tiles smaller than a mask pixel
        (7, 3, 3.3, (2, 4), 0.0),  # every box with any tissue
    ],
)
def test_chunked_walk_gives_the_whole_grids_tiles(
    size: int,
    stride: int,
    scale: float,
    shard: tuple[int, int],
    min_tissue: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(size + stride)
    mask = np.zeros((60, 80), bool)
    mask[10:35, 20:50] = rng.random((25, 30)) < 0.7  # a ragged block of tissue, glass around
    mask[50, 75] = True  # and a speck far from it
    height, width = int(mask.shape[0] * scale), int(mask.shape[1] * scale)
    grid = TileGrid(size, stride, (width - size) // stride + 1, (height - size) // stride + 1)
    monkeypatch.setattr(tiles_module, "TILE_CHUNK", 97)  # many chunks, cut mid-row
    walked = tissue_tiles(grid, mask, scale, min_tissue, shard)
    expected = _whole_grid(grid, mask, scale, min_tissue, shard)
    assert expected  # the comparison is of something
    assert [(t.index, t.x, t.y, t.tissue) for t in walked] == expected
    assert all(t.size == size for t in walked)
    assert tissue_tiles(grid, np.zeros_like(mask), scale, min_tissue, shard) == []


def test_a_huge_grid_is_refused_by_its_budget_before_it_is_allocated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """9 million boxes of tissue (4 px tiles of a 12,000 px slide): holding the whole grid
    takes hundreds of MB; with a budget the walk stops at the first chunk over it."""
    monkeypatch.setattr(tiles_module, "TILE_CHUNK", 1 << 14)
    mask = np.ones((1250, 1250), bool)
    grid = TileGrid(size=4, stride=4, columns=3000, rows=3000)
    tracemalloc.start()
    try:
        with pytest.raises(TileBudgetExceeded, match=r"more than the 1000 tissue tiles allowed"):
            tissue_tiles(grid, mask, 9.6, 0.5, max_tiles=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * 1024**2, f"peak {peak / 1024**2:.0f} MB"  # the whole grid: > 400 MB
    # within the budget nothing changes, and a time budget's check stops the walk
    small = TileGrid(size=4, stride=4, columns=30, rows=30)
    assert len(tissue_tiles(small, mask, 9.6, 0.5, max_tiles=900)) == 900
    with pytest.raises(TileBudgetExceeded, match="more than the 899") as refused:
        tissue_tiles(small, mask, 9.6, 0.5, max_tiles=899)
    assert (refused.value.limit, refused.value.found) == (899, 900)  # a caller words its own

    def out_of_time() -> None:
        raise TimeoutError("over the time budget")

    with pytest.raises(TimeoutError):
        tissue_tiles(grid, mask, 9.6, 0.5, check=out_of_time)
