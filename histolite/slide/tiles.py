"""Tile grids at a physical size, filtered by tissue, and split into disjoint shards.

Tiles are placed in level-0 pixels: a tile of ``tile_um`` microns is ``tile_um / mpp`` level-0
pixels wide, whatever the scanner's magnification, so a model trained on 0.5 um/px tiles sees
0.5 um/px tiles. Every tile of the full grid has a fixed index (row-major), so a shard is simply
the tiles whose index falls to it: shards are disjoint, deterministic and together complete.

:func:`plan_tissue_tiles` is the one place that turns a slide into its tissue tiles; inference,
slide features, tile datasets and stain fitting all start from it, so they agree on the tiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from histolite.errors import DataError
from histolite.slide.reader import Slide, SlideError, SlideInfo, thumbnail
from histolite.slide.tissue import box_fractions, summed_area, tissue_mask

MASK_MPP = 8.0  # microns per mask pixel: 1.25x for a 20x scan, as TIAToolbox masks
OVERVIEW_SIDE = 640  # the overview kept for heatmaps: their panels are at most this wide


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


@dataclass(frozen=True)
class GridBoxes:
    """Every box of a grid (or of one shard of it) as arrays: index, corner, tissue fraction."""

    index: np.ndarray
    x: np.ndarray
    y: np.ndarray
    tissue: np.ndarray
    size: int


def grid_boxes(
    grid: TileGrid, mask: np.ndarray, mask_scale: float, shard: tuple[int, int] = (0, 1)
) -> GridBoxes:
    """The boxes of this shard of the grid, in grid order, with their tissue fractions."""
    index, count = shard
    indices = np.arange(index, grid.count, count, dtype=np.int64)
    rows, columns = np.divmod(indices, max(grid.columns, 1))
    xs, ys = columns * grid.stride, rows * grid.stride
    tissue = box_fractions(mask, mask_scale, xs, ys, grid.size)
    return GridBoxes(indices, xs, ys, tissue, grid.size)


class TileBudgetExceeded(DataError):
    """A slide has more tissue tiles than its caller allows (``max_tiles``); raised while the
    grid is walked, before the tiles of a too-large slide are held in memory.

    Attributes:
        limit: The ``max_tiles`` given.
        found: Tissue tiles found when the walk stopped (more than ``limit``; the slide may
            hold more still).
    """

    def __init__(self, message: str, limit: int, found: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.found = found


# grid boxes looked at per step: a slide file may declare any size, so memory follows the
# tissue tiles kept, not the grid (48 bytes a box at once: about 50 MB per step)
TILE_CHUNK = 1 << 20


def _tissue_span(grid: TileGrid, mask: np.ndarray, mask_scale: float) -> tuple[range, range]:
    """The grid rows and columns whose boxes can touch the mask's tissue (one spare on each
    side against rounding): every box outside them has a tissue fraction of 0."""
    rows_with, columns_with = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not (rows_with.size and columns_with.size and grid.count):
        return range(0), range(0)

    def span(first: int, last: int, cells: int) -> range:
        low = math.floor((first * mask_scale - grid.size) / grid.stride) - 1
        high = math.ceil((last + 1) * mask_scale / grid.stride) + 1
        return range(max(0, low), min(cells, high))

    rows = span(int(rows_with[0]), int(rows_with[-1]), grid.rows)
    columns = span(int(columns_with[0]), int(columns_with[-1]), grid.columns)
    return rows, columns


def tissue_tiles(
    grid: TileGrid,
    mask: np.ndarray,
    mask_scale: float,
    min_tissue: float,
    shard: tuple[int, int] = (0, 1),
    *,
    max_tiles: int | None = None,
    check: Callable[[], None] | None = None,
) -> list[Tile]:
    """Tiles of this shard whose tissue fraction reaches ``min_tissue``, in grid order.

    Only the rows and columns that can reach the mask's tissue are looked at, ``TILE_CHUNK``
    boxes at a time, so the whole grid is never allocated.

    Args:
        grid: The slide's tile grid.
        mask: Tissue mask at ``mask_scale`` level-0 pixels per mask pixel.
        mask_scale: Level-0 pixels per mask pixel.
        min_tissue: Smallest tissue fraction a kept tile has (and always some tissue).
        shard: ``(I, N)``: only the tiles whose grid index is I modulo N.
        max_tiles: Most tissue tiles allowed; more raise as soon as they are found.
        check: Called before every chunk; may raise to stop the work (a time budget).

    Raises:
        TileBudgetExceeded: The shard has more than ``max_tiles`` tissue tiles.
    """
    if max_tiles is not None and max_tiles < 0:
        raise ValueError(f"max_tiles must be at least 0, got {max_tiles}")
    index, count = shard
    rows, columns = _tissue_span(grid, mask, mask_scale)
    boxes = len(rows) * len(columns)
    table = summed_area(mask) if boxes else None
    tiles: list[Tile] = []
    for start in range(0, boxes, TILE_CHUNK):
        if check is not None:
            check()
        flat = np.arange(start, min(boxes, start + TILE_CHUNK), dtype=np.int64)
        row, column = np.divmod(flat, len(columns))
        row += rows.start
        column += columns.start
        indices = row * grid.columns + column
        mine = indices % count == index
        indices, row, column = indices[mine], row[mine], column[mine]
        xs, ys = column * grid.stride, row * grid.stride
        tissue = box_fractions(mask, mask_scale, xs, ys, grid.size, table)
        keep = (tissue >= min_tissue) & (tissue > 0.0)
        found = len(tiles) + int(keep.sum())
        if max_tiles is not None and found > max_tiles:  # before building this chunk's tiles
            raise TileBudgetExceeded(
                f"more than the {max_tiles} tissue tiles allowed ({found} tiles of "
                f"{grid.size} level-0 pixels found before stopping)",
                max_tiles,
                found,
            )
        tiles += [
            Tile(int(i), int(x), int(y), grid.size, round(float(f), 4))
            for i, x, y, f in zip(indices[keep], xs[keep], ys[keep], tissue[keep], strict=True)
        ]
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


def thumbnail_side(info: SlideInfo, mask_mpp: float = MASK_MPP, max_side: int = 4096) -> int:
    """Side of the view the tissue mask is computed on: about ``mask_mpp`` um per pixel.

    At least 256 pixels (a small excerpt keeps some detail; never more than the slide itself),
    at most ``max_side`` (a huge slide's mask stays a few MB).
    """
    wanted = max(info.width, info.height) * info.mpp / mask_mpp
    longest = max(info.width, info.height)
    return int(min(max_side, longest, max(256, math.ceil(wanted))))


@dataclass(frozen=True)
class TissueTiles:
    """A slide's tissue tiles and the low-resolution views they were chosen on.

    ``overview`` (RGB, ``overview_scale`` level-0 pixels per pixel) is what heatmaps are drawn
    on; ``mask`` (``mask_scale``) is the tissue mask; ``tiles`` are the grid's tissue tiles.
    """

    overview: np.ndarray
    overview_scale: float
    mask: np.ndarray
    mask_scale: float
    grid: TileGrid
    tiles: list[Tile]


def shrink(view: np.ndarray, scale: float, side: int) -> tuple[np.ndarray, float]:
    """``view`` box-filtered by a whole factor to about ``side`` pixels on its longer side (not
    below it), and its new scale.

    A whole factor keeps every new pixel the mean of whole old pixels; a fractional one (a
    320 px excerpt to 256) would smear glass into tissue at each edge and gain nothing.
    """
    factor = max(view.shape[:2]) // side
    if factor <= 1:
        return view, scale
    size = (max(1, round(view.shape[1] / factor)), max(1, round(view.shape[0] / factor)))
    shrunk = np.asarray(Image.fromarray(view).resize(size, Image.Resampling.BOX))
    return shrunk, scale * view.shape[1] / size[0]


MAX_OVERVIEW_READ = 4_000_000_000  # pixels of the level an overview decodes (a 63k x 63k level)


def read_overview(
    slide: Slide,
    side: int = OVERVIEW_SIDE,
    *,
    check: Callable[[], None] | None = None,
    max_read_pixels: int = MAX_OVERVIEW_READ,
) -> tuple[np.ndarray, float]:
    """The whole slide at most ``side`` pixels on its longer side (never upsampled), and its
    downsample (level-0 pixels per overview pixel).

    The overview is read from the coarsest level fine enough; a slide without a small enough
    level would be decoded whole. Over ``max_read_pixels`` that is refused: a 307 KB file
    declaring one 100,000 x 100,000 level once held a service's only slide worker for good.
    """
    info = slide.info
    target = min(side, max(info.width, info.height))
    level = info.level_for(max(max(info.width, info.height) / target, 1.0))
    width, height = info.level_dimensions[level]
    if width * height > max_read_pixels:
        raise SlideError(
            f"{info.path}: its smallest usable level is {width} x {height} pixels "
            f"({width * height / 1e9:.1f} Gpx, more than {max_read_pixels / 1e9:.1f} Gpx to "
            "decode for an overview); give the slide a pyramid (e.g. vips tiffsave --pyramid)"
        )
    return thumbnail(slide, target, check)


def plan_tissue_tiles(
    slide: Slide,
    tile_um: float,
    *,
    overlap: float = 0.0,
    min_tissue: float = 0.5,
    shard: tuple[int, int] = (0, 1),
    overview_side: int = OVERVIEW_SIDE,
    check: Callable[[], None] | None = None,
    max_tiles: int | None = None,
) -> TissueTiles:
    """Read one overview, mask tissue at about ``MASK_MPP``, and keep the grid's tissue tiles.

    One read serves both the mask and the heatmap: the overview is read at the larger of the
    two sides and box-filtered down for the mask. A mask finer than ~8 um/px costs time (the
    mask is the slowest step of a small slide) without changing which tiles hold tissue.
    ``check`` runs during the overview read and the grid walk; with ``max_tiles``, a slide
    (shard) with more tissue tiles raises :class:`TileBudgetExceeded` before they are all held.
    """
    info = slide.info
    mask_side = thumbnail_side(info)
    overview, overview_scale = read_overview(slide, max(mask_side, overview_side), check=check)
    view, mask_scale = shrink(overview, overview_scale, mask_side)
    # specks smaller than a quarter tile cannot fill a tile; bigger ones are kept
    mask = tissue_mask(
        view,
        info.mpp * mask_scale,
        min_object_um2=min(5000.0, tile_um**2 / 4),
        hole_um2=min(2000.0, tile_um**2 / 8),
    )
    grid = tile_grid(info, tile_um, overlap)
    try:
        tiles = tissue_tiles(
            grid, mask, mask_scale, min_tissue, shard, max_tiles=max_tiles, check=check
        )
    except TileBudgetExceeded as exc:
        raise TileBudgetExceeded(
            f"{info.path}: the slide has {exc}", exc.limit, exc.found
        ) from None
    return TissueTiles(overview, overview_scale, mask, mask_scale, grid, tiles)
