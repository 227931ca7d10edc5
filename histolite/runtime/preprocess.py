"""Pixels to the model graph's input, in the training order: crop -> stain -> resize.

Pure NumPy and Pillow: slides, the service and export's parity check all batch through here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from histolite.data.patches import bag_positions, grid_positions, patch_grid_shape, resize_square

# uint8 H x W x 3 crops in, the same crops stain normalised out
CropStain = Callable[[list[np.ndarray]], list[np.ndarray]]


def crops_to_batch(
    crops: list[np.ndarray], input_size: int, stain: CropStain | None = None
) -> np.ndarray:
    """Crops stain normalised (at their own size), resized (bilinear) to ``input_size``, as
    float32 (N, 3, S, S) in [0, 1]."""
    if stain is not None and crops:
        crops = stain(crops)
    batch = np.empty((len(crops), 3, input_size, input_size), dtype=np.float32)
    for i, crop in enumerate(crops):
        batch[i] = resize_square(crop, input_size).transpose(2, 0, 1)
    batch /= 255.0
    return batch


def bag_to_batch(
    pixels: np.ndarray,
    input_size: int,
    patch_size: int,
    stride: int,
    min_tissue: float,
    stain: CropStain | None = None,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A bag model's instances: the patches training cut (tissue filter included)."""
    positions = bag_positions(pixels, patch_size, stride, min_tissue)
    crops = [pixels[y : y + patch_size, x : x + patch_size] for y, x in positions]
    return crops_to_batch(crops, input_size, stain), positions


def grid_crops(
    pixels: np.ndarray, patch_size: int, stride: int
) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Grid patches as views (or the whole image if smaller than a patch), and the grid."""
    height, width = pixels.shape[:2]
    rows, cols = patch_grid_shape(height, width, patch_size, stride)
    if rows == 0:
        return [pixels], (1, 1)
    crops = [
        pixels[y : y + patch_size, x : x + patch_size]
        for y, x in grid_positions(height, width, patch_size, stride)
    ]
    return crops, (rows, cols)


def image_to_batch(
    pixels: np.ndarray,
    input_size: int,
    patch_size: int,
    stride: int,
    stain: CropStain | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Grid patches (or the whole image if smaller than a patch), resized, as (N, 3, S, S)."""
    crops, grid = grid_crops(pixels, patch_size, stride)
    return crops_to_batch(crops, input_size, stain), grid
