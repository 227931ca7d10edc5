"""Grad-CAM maps of patches pasted into one coarse grid per image (served explanations)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Grad-CAM grids have at most this many cells a side: a 60 Mpx upload would otherwise answer
# with about a million cells, far finer than the page can show.
MAX_CAM_CELLS = 128


@dataclass(frozen=True)
class CamGrid:
    """Grad-CAM of the image's class over the image: ``values[r, c]`` in [0, 1] covers image
    pixels ``[r * cell_height, (r + 1) * cell_height) x [c * cell_width, (c + 1) * cell_width)``.
    """

    values: np.ndarray  # (rows, cols) float32
    cell_height: float
    cell_width: float


def _resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) -> (C, height, width), bilinear as ``explain.py`` resizes its maps; a
    whole-factor shrink (large images' coarser grid) is a block mean, ten times faster."""
    classes, h, w = maps.shape
    if h % height == 0 and w % width == 0:
        return maps.reshape(classes, height, h // height, width, w // width).mean(axis=(2, 4))
    size = (width, height)
    return np.stack(
        [np.asarray(Image.fromarray(m).resize(size, Image.Resampling.BILINEAR)) for m in maps]
    )


def _cell_side(natural: float, stride: int) -> float:
    """A cell side at least ``natural`` that divides the stride (or is a whole number of
    strides): patch starts then fall on cell edges and every patch spans the same number of
    cells, instead of rounding each edge on its own (half-cell shifts with overlaps)."""
    if natural <= stride:
        return stride / max(1, math.floor(stride / natural))
    return float(stride * math.ceil(natural / stride))


def _cells(start: int, length: int, cell: float, limit: int) -> tuple[int, int]:
    """The grid cells a patch covers along one axis: at least one, inside the grid."""
    first = min(int(start / cell + 1e-6), limit - 1)
    return first, min(limit, first + max(1, round(length / cell)))


class CamCanvas:
    """Grad-CAM maps of a batch of patches, pasted into one coarse grid per class as they come
    (memory stays flat in image size), then read out for the image's class.

    As ``explain.py`` does: each patch's map is scaled to [0, 1] by its own maximum, overlaps
    are averaged, and the result is scaled to [0, 1]. A cell is ``patch / feature map`` image
    pixels (coarser for very large images, so that no side exceeds ``MAX_CAM_CELLS``).
    """

    def __init__(self, boxes: list[tuple[int, int, int, int]], stride: int | None = None) -> None:
        self.boxes = boxes  # (y, x, height, width) of every patch, in image pixels
        self.stride = stride or boxes[0][2]  # patch starts are multiples of it
        self.total: np.ndarray | None = None
        self.count: np.ndarray = np.zeros((0, 0), np.float32)
        self.cell = (1.0, 1.0)
        self.seen = 0

    def _start(self, classes: int, height: int, width: int) -> None:
        _, _, box_h, box_w = self.boxes[0]
        bottom = max(y + h for y, _, h, _ in self.boxes)
        right = max(x + w for _, x, _, w in self.boxes)
        cell_h, cell_w = box_h / height, box_w / width
        factor = max(1, math.ceil(max(bottom / cell_h, right / cell_w) / MAX_CAM_CELLS))
        self.cell = (
            _cell_side(cell_h * factor, self.stride),
            _cell_side(cell_w * factor, self.stride),
        )
        rows = math.ceil(bottom / self.cell[0] - 1e-6)
        cols = math.ceil(right / self.cell[1] - 1e-6)
        self.total = np.zeros((classes, rows, cols), np.float32)
        self.count = np.zeros((rows, cols), np.float32)

    def add(self, cams: np.ndarray) -> None:
        """The next patches' maps, (N, C, h, w), in the order of ``boxes``."""
        if self.total is None:
            self._start(*cams.shape[1:])
        assert self.total is not None
        (cell_h, cell_w), (rows, cols) = self.cell, self.count.shape
        top = cams.max(axis=(2, 3), keepdims=True)
        cams = np.divide(cams, top, out=np.zeros_like(cams), where=top > 0)
        for cam, (y, x, h, w) in zip(cams, self.boxes[self.seen :], strict=False):
            r0, r1 = _cells(y, h, cell_h, rows)
            c0, c1 = _cells(x, w, cell_w, cols)
            if (r1 - r0, c1 - c0) != cam.shape[1:]:
                cam = _resize_maps(cam, r1 - r0, c1 - c0)
            self.total[:, r0:r1, c0:c1] += cam
            self.count[r0:r1, c0:c1] += 1
        self.seen += len(cams)

    def grid(self, target: int) -> CamGrid:
        assert self.total is not None
        heat = np.divide(
            self.total[target], self.count, out=np.zeros_like(self.count), where=self.count > 0
        )
        heat -= heat.min()  # as explain.normalise: a flat map means nothing stands out
        top = float(heat.max())
        return CamGrid(heat / top if top > 0 else heat, *self.cell)
