"""Tissue masks on a low-resolution view of a slide.

H&E tissue is coloured (saturated pink and purple); glass is white or grey. So the mask is an
Otsu threshold on HSV saturation, bounded to where glass ends and tissue begins: floored so that
a blank slide (nothing but low-saturation glass) gives no tissue instead of half of its noise,
and capped so that a view with no glass at all (a field of tissue) is not split in two, pale
eosin against dark haematoxylin. Pen marks are excluded by colour: ink is blue, green or
near-black, hues and values that haematoxylin and eosin do not take. Small specks are removed
and small holes filled, at sizes set in microns so the result does not depend on the view's
resolution.

Known limitation: red ink has the hue and saturation of eosin and is kept as tissue.
"""

from __future__ import annotations

import numpy as np

MIN_SATURATION = 0.07  # below this no pixel is tissue, whatever Otsu says
# at or above this every pixel is tissue: glass, even tinted, stays below it (about 0.01-0.05),
# and pale stroma, mucus and debris stay above it (Kather tiles: 0.1-0.3 at their palest)
MAX_SATURATION_CUT = 0.15
PEN_HUES = (0.25, 0.70)  # green through blue, in HSV hue (0..1)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB to float HSV in [0, 1] (vectorised, no colour library needed)."""
    x = rgb.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    high = x.max(axis=-1)
    low = x.min(axis=-1)
    span = high - low
    safe = np.where(span > 0, span, 1.0)
    hue = np.where(
        high == r,
        (g - b) / safe % 6.0,
        np.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = np.where(span > 0, hue / 6.0, 0.0)
    saturation = np.where(high > 0, span / np.where(high > 0, high, 1.0), 0.0)
    return np.stack([hue, saturation, high], axis=-1)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut that maximises between-class variance."""
    histogram, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    weights = histogram.astype(np.float64)
    total = weights.sum()
    if total == 0:
        return 1.0
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(weights)
    mean_below = np.cumsum(weights * centres)
    above = total - below
    overall = mean_below[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (overall * below - mean_below * total) ** 2 / (below * above)
    between[~np.isfinite(between)] = 0
    return float(edges[int(np.argmax(between)) + 1])


def pen_mask(hsv: np.ndarray) -> np.ndarray:
    """Ink: saturated green-to-blue pixels, or very dark ones."""
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    coloured = (hue >= PEN_HUES[0]) & (hue <= PEN_HUES[1]) & (saturation > 0.2)
    return coloured | (value < 0.2)


def tissue_mask(
    rgb: np.ndarray, mpp: float, min_object_um2: float = 5000.0, hole_um2: float = 2000.0
) -> np.ndarray:
    """Boolean tissue mask of an RGB view whose pixels are ``mpp`` microns wide.

    Args:
        rgb: H x W x 3 uint8 (a thumbnail or a low pyramid level).
        mpp: microns per pixel of ``rgb``.
        min_object_um2: connected tissue smaller than this (in square microns) is dropped.
        hole_um2: holes smaller than this inside tissue are filled.
    """
    from scipy import ndimage

    hsv = rgb_to_hsv(rgb)
    saturation = hsv[..., 1]
    threshold = min(max(otsu_threshold(saturation), MIN_SATURATION), MAX_SATURATION_CUT)
    mask = (saturation > threshold) & ~pen_mask(hsv)
    pixel_area = mpp * mpp
    mask = ndimage.binary_opening(mask, iterations=1)
    labels, count = ndimage.label(mask)
    if count:
        sizes = np.bincount(labels.ravel())
        keep = sizes * pixel_area >= min_object_um2
        keep[0] = False
        mask = keep[labels]
    holes = ndimage.binary_fill_holes(mask) & ~mask
    hole_labels, hole_count = ndimage.label(holes)
    if hole_count:
        hole_sizes = np.bincount(hole_labels.ravel())
        small = hole_sizes * pixel_area < hole_um2
        small[0] = False
        mask = mask | small[hole_labels]
    return np.asarray(mask, dtype=bool)


def summed_area(mask: np.ndarray) -> np.ndarray:
    """The summed-area table of a mask: ``table[y, x]`` counts its pixels above and left of
    (y, x); int32 while the count fits (a 4096 px mask's table is then 67 MB, not 134)."""
    height, width = mask.shape
    dtype = np.int32 if mask.size < 2**31 else np.int64
    table = np.zeros((height + 1, width + 1), dtype)
    table[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=dtype), axis=1, dtype=dtype)
    return table


def box_fractions(
    mask: np.ndarray,
    scale: float,
    xs: np.ndarray,
    ys: np.ndarray,
    size: int,
    table: np.ndarray | None = None,
) -> np.ndarray:
    """Tissue fraction of level-0 boxes (x, y, size) in a mask made at ``scale`` downsample.

    A box covers the mask pixels it touches; parts outside the slide count as background.
    One summed-area table answers every box, so a 100k-tile grid costs milliseconds; pass
    ``table`` (:func:`summed_area` of ``mask``) to reuse it over several calls.
    """
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    x0, y0 = (xs / scale).astype(np.int64), (ys / scale).astype(np.int64)
    x1 = np.maximum(x0 + 1, np.ceil((xs + size) / scale).astype(np.int64))
    y1 = np.maximum(y0 + 1, np.ceil((ys + size) / scale).astype(np.int64))
    height, width = mask.shape
    if table is None:
        table = summed_area(mask)
    cx0, cx1 = np.clip(x0, 0, width), np.clip(x1, 0, width)
    cy0, cy1 = np.clip(y0, 0, height), np.clip(y1, 0, height)
    inside = table[cy1, cx1] - table[cy0, cx1] - table[cy1, cx0] + table[cy0, cx0]
    return inside / ((y1 - y0) * (x1 - x0)).astype(np.float64)
