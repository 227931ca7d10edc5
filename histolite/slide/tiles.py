"""Tile grids at a physical size, filtered by tissue, and split into disjoint shards.

Tiles are placed in level-0 pixels: a tile of ``tile_um`` microns is ``tile_um / mpp`` level-0
pixels wide, whatever the scanner's magnification, so a model trained on 0.5 um/px tiles sees
0.5 um/px tiles. Every tile of the full grid has a fixed index (row-major), so a shard is simply
the tiles whose index falls to it: shards are disjoint, deterministic and together complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from histolite.errors import DataError
from histolite.slide.reader import SlideInfo
from histolite.slide.tissue import box_fraction


@dataclass(frozen=True)
class Tile:
    """One tile: its index in the full grid and its box in level-0 pixels."""

    index: int
    x: int
    y: int
    size: int
    tissue: float


@dataclass(frozen=True)
class TileGrid:
    """The grid of a slide at a tile size and stride (level-0 pixels)."""

    size: int
    stride: int
    columns: int
    rows: int

    def box(self, index: int) -> tuple[int, int]:
        row, column = divmod(index, self.columns)
        return column * self.stride, row * self.stride

    @property
    def count(self) -> int:
        return self.columns * self.rows


def tile_grid(info: SlideInfo, tile_um: float, overlap: float = 0.0) -> TileGrid:
    """Tiles of ``tile_um`` microns, overlapping by the fraction ``overlap`` (0 <= overlap < 1).

    Partial tiles at the right and bottom edges are dropped, as in training data.
    """
    if tile_um <= 0:
        raise DataError(f"--tile-um must be positive, got {tile_um}")
    if not 0.0 <= overlap < 1.0:
        raise DataError(f"--overlap must be in [0, 1), got {overlap}")
    size = max(1, round(tile_um / info.mpp))
    stride = max(1, round(size * (1.0 - overlap)))
    columns = 0 if info.width < size else (info.width - size) // stride + 1
    rows = 0 if info.height < size else (info.height - size) // stride + 1
    return TileGrid(size, stride, columns, rows)


def tissue_tiles(
    grid: TileGrid,
    mask: np.ndarray,
    mask_scale: float,
    min_tissue: float,
    shard: tuple[int, int] = (0, 1),
) -> list[Tile]:
    """Tiles of this shard whose tissue fraction reaches ``min_tissue``, in grid order."""
    index, count = shard
    tiles = []
    for i in range(index, grid.count, count):
        x, y = grid.box(i)
        tissue = box_fraction(mask, mask_scale, x, y, grid.size)
        if tissue >= min_tissue and tissue > 0.0:
            tiles.append(Tile(i, x, y, grid.size, round(tissue, 4)))
    return tiles


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (0 <= I < N) as (I, N)."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise DataError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise DataError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def mm2(pixels: float, mpp: float) -> float:
    """Area in square millimetres of ``pixels`` level-0 pixels."""
    return pixels * (mpp / 1000.0) ** 2


def thumbnail_side(info: SlideInfo, mask_mpp: float = 8.0, max_side: int = 4096) -> int:
    """Side of the thumbnail the tissue mask is computed on: about ``mask_mpp`` um per pixel."""
    wanted = max(info.width, info.height) * info.mpp / mask_mpp
    return int(min(max_side, max(256, math.ceil(wanted))))
