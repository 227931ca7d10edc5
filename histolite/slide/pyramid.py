"""Write an image as a tiled pyramidal TIFF that OpenSlide and tifffile read as a slide.

Useful to turn a large scan exported as one flat image into something `histolite slide` can
stream tile by tile, and to build slide fixtures of any size for tests and benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histolite.fileio import atomic_path


def write_pyramidal_tiff(
    path: Path,
    level0: np.ndarray,
    mpp: float,
    *,
    levels: int = 3,
    tile: int = 256,
    compression: str = "zlib",
) -> Path:
    """Save (H, W, 3) uint8 ``level0`` with ``levels`` pages, each half the previous one's size.

    The resolution tags carry ``mpp`` (microns per pixel of level 0), so readers know the
    physical scale. BigTIFF is used when the pixels alone pass 2 GB.
    """
    import tifffile

    if level0.ndim != 3 or level0.shape[2] != 3 or level0.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {level0.shape} {level0.dtype}")
    pixels = level0
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=level0.nbytes > 2**31) as tif:
        for level in range(levels):
            scale = mpp * 2**level
            tif.write(
                pixels,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                resolution=(1e4 / scale, 1e4 / scale),
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
            )
            h, w = pixels.shape[0] // 2 * 2, pixels.shape[1] // 2 * 2
            pixels = (
                pixels[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round()
            ).astype(np.uint8)
    return path
