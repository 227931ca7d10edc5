"""Grid patches of large images, a tissue filter, and patch-to-image aggregation.

A k x k grid with stride s gives floor(1 + (H - k) / s) x floor(1 + (W - k) / s) patches per image
(BACH: 2048 x 1536, k = 512, s = 256 -> 7 x 5 = 35).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histolite.data.folder import Sample
from histolite.data.images import image_size, load_rgb
from histolite.errors import DataError
from histolite.fileio import atomic_path
from histolite.runspec import PatchSpec


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """An H x W x 3 uint8 image resized to size x size (Pillow bilinear, antialiased when
    shrinking), uint8 out.

    The one resize evaluation and serving share, so the runtime's input equals ``evaluate``'s
    bit for bit (torchvision's antialiased uint8 resize differs from Pillow's by one level).
    """
    if pixels.shape[:2] == (size, size):
        return pixels
    image = Image.fromarray(np.ascontiguousarray(pixels))
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


def patch_grid_shape(height: int, width: int, size: int, stride: int) -> tuple[int, int]:
    """(rows, cols) of the patch grid; (0, 0) when the image is smaller than one patch."""
    if size <= 0 or stride <= 0:
        raise DataError(f"patch size and stride must be positive, got size={size}, stride={stride}")
    if height < size or width < size:
        return 0, 0
    return 1 + (height - size) // stride, 1 + (width - size) // stride


def grid_positions(height: int, width: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left (y, x) of every grid patch, row by row."""
    rows, cols = patch_grid_shape(height, width, size, stride)
    return [(r * stride, c * stride) for r in range(rows) for c in range(cols)]


def tissue_fraction(patch: np.ndarray, *, brightness: int = 220, saturation: int = 20) -> float:
    """Fraction of pixels that are not background (bright and unsaturated, i.e. bare glass)."""
    pixels = patch.reshape(-1, 3).astype(np.int16)
    bright = pixels.min(axis=1) >= brightness
    grey = (pixels.max(axis=1) - pixels.min(axis=1)) <= saturation
    return float(1.0 - np.mean(bright & grey))


@dataclass(frozen=True)
class PatchRef:
    """One patch: which image, where, and that image's label and group."""

    image_index: int
    y: int
    x: int
    size: int
    label: int
    group: str


def index_patches(samples: Sequence[Sample], patch: PatchSpec) -> list[PatchRef]:
    """Grid patches of every sample; with ``min_tissue`` > 0, mostly-background ones are dropped.

    Without the tissue filter only image headers are read, so indexing is cheap.
    """
    size, stride, min_tissue = patch.size, patch.step, patch.min_tissue
    refs: list[PatchRef] = []
    for i, sample in enumerate(samples):
        if min_tissue > 0:
            pixels = load_rgb(sample.path)
            height, width = pixels.shape[:2]
        else:
            height, width = image_size(sample.path)
        for y, x in grid_positions(height, width, size, stride):
            if min_tissue > 0 and tissue_fraction(pixels[y : y + size, x : x + size]) < min_tissue:
                continue
            refs.append(PatchRef(i, y, x, size, sample.label, sample.group))
    if samples and not refs:
        raise DataError(
            f"no patches of size {size} (stride {stride}, min_tissue {min_tissue}) in "
            f"{len(samples)} image(s); are the images smaller than the patch size?"
        )
    return refs


@dataclass(frozen=True)
class ImageLevelPrediction:
    image_index: int
    majority_vote: int
    mean_probability: int
    mean_probs: np.ndarray
    n_patches: int


def aggregate_patch_predictions(
    image_indices: Sequence[int], probs: np.ndarray
) -> list[ImageLevelPrediction]:
    """Image labels from patch probabilities by majority vote and by mean probability.

    Majority-vote ties go to the class with the higher mean probability among the tied ones.
    """
    by_image: dict[int, list[int]] = defaultdict(list)
    for row, image in enumerate(image_indices):
        by_image[image].append(row)
    results = []
    for image in sorted(by_image):
        p = probs[by_image[image]]
        mean = p.mean(axis=0)
        votes = np.bincount(p.argmax(axis=1), minlength=p.shape[1])
        tied = np.flatnonzero(votes == votes.max())
        majority = int(tied[np.argmax(mean[tied])])
        results.append(ImageLevelPrediction(image, majority, int(mean.argmax()), mean, len(p)))
    return results


def extract_patches(
    image: str | Path, out_dir: str | Path, size: int, stride: int, min_tissue: float = 0.0
) -> list[Path]:
    """Write the grid patches of one image as PNGs ``<stem>_y<Y>_x<X>.png``; returns their paths."""
    image = Path(image)
    pixels = load_rgb(image)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for y, x in grid_positions(pixels.shape[0], pixels.shape[1], size, stride):
        patch = pixels[y : y + size, x : x + size]
        if min_tissue > 0 and tissue_fraction(patch) < min_tissue:
            continue
        target = out_dir / f"{image.stem}_y{y}_x{x}.png"
        with atomic_path(target) as tmp:
            Image.fromarray(patch).save(tmp, format="PNG")
        written.append(target)
    return written


def write_patch_index(path: str | Path, rows: Sequence[tuple[Path, Path, int, int, int]]) -> None:
    """CSV of (patch, source image, y, x, size) so patches can be traced back."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(("patch", "image", "y", "x", "size"))
        for patch, source, y, x, size in rows:
            writer.writerow((patch.as_posix(), source.as_posix(), y, x, size))


def bag_positions(
    pixels: np.ndarray, size: int, stride: int, min_tissue: float = 0.0
) -> list[tuple[int, int]]:
    """Top-left (y, x) of an image's instances.

    Patches below ``min_tissue`` are dropped, unless that would empty the bag, in which case
    every grid patch is kept; an image smaller than one patch is one instance at (0, 0).
    """
    grid = grid_positions(pixels.shape[0], pixels.shape[1], size, stride)
    if not grid:
        return [(0, 0)]
    if min_tissue <= 0:
        return grid
    kept = [
        (y, x) for y, x in grid if tissue_fraction(pixels[y : y + size, x : x + size]) >= min_tissue
    ]
    return kept or grid
