"""MIL bags made from labelled tiles: each bag is a grid mosaic of tiles, saved as one image.

A bag is positive when it holds at least one tile of the ``positive`` class (the standard MIL
assumption) and negative otherwise. Saving bags as images means MIL trains, evaluates and
explains them exactly like any other image cut into patches, and ``bags.csv`` records which
cell holds which tile, so one can check that attention lands on the tiles that decide the label.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from histolite.data.folder import LabelledImages, Sample
from histolite.data.images import load_rgb
from histolite.errors import DataError
from histolite.fileio import atomic_path

POSITIVE_FOLDER = "positive"
NEGATIVE_FOLDER = "negative"
BAGS_CSV = "bags.csv"


@dataclass(frozen=True)
class MosaicSpec:
    """How to build bags.

    Attributes:
        positive: the class whose presence makes a bag positive.
        grid: tiles per side (a bag holds grid x grid tiles).
        bags_per_class: positive bags and negative bags each.
        max_positive: a positive bag holds 1..max_positive positive tiles (uniformly).
        tile_size: pixels per tile side; tiles are resized to it.
        within_group: draw all of a bag's tiles from one group (patient/slide).
    """

    positive: str
    grid: int = 3
    bags_per_class: int = 100
    max_positive: int = 2
    tile_size: int = 64
    within_group: bool = False

    def __post_init__(self) -> None:
        if self.grid < 1 or self.bags_per_class < 1 or self.tile_size < 1:
            raise DataError("grid, bags_per_class and tile_size must be positive")
        if not 1 <= self.max_positive <= self.grid * self.grid:
            raise DataError(
                f"max_positive must be in 1..{self.grid * self.grid} for a {self.grid}x{self.grid} "
                f"grid, got {self.max_positive}"
            )


def _pools(
    images: LabelledImages, spec: MosaicSpec
) -> dict[str, tuple[list[Sample], list[Sample]]]:
    """(positive tiles, negative tiles) per group, or one pool for everything."""
    if spec.positive not in images.classes:
        raise DataError(
            f"positive class {spec.positive!r} is not among the classes {list(images.classes)}"
        )
    pools: dict[str, tuple[list[Sample], list[Sample]]] = defaultdict(lambda: ([], []))
    for sample in images.samples:
        key = sample.group if spec.within_group else "all"
        pools[key][0 if sample.class_name == spec.positive else 1].append(sample)
    usable = {
        key: pool
        for key, pool in pools.items()
        if pool[0] and len(pool[1]) >= spec.grid * spec.grid
    }
    if not usable:
        raise DataError(
            f"no {'group' if spec.within_group else 'pool'} has both a {spec.positive!r} tile and "
            f"{spec.grid * spec.grid} other tiles to build a {spec.grid}x{spec.grid} bag"
        )
    return usable


def _tile(sample: Sample, size: int) -> np.ndarray:
    pixels = load_rgb(sample.path)
    if pixels.shape[:2] != (size, size):
        pixels = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))
    return pixels


def build_mosaic_bags(
    images: LabelledImages,
    out: str | Path,
    spec: MosaicSpec,
    *,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write ``out/{positive,negative}/<group>_bagNNNNN.png`` and ``out/bags.csv``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty; choose another --out")
    rng = np.random.Generator(np.random.PCG64(seed))
    pools = _pools(images, spec)
    keys = sorted(pools)
    cells = spec.grid * spec.grid
    rows: list[Sequence[object]] = []
    plan = [True] * spec.bags_per_class + [False] * spec.bags_per_class
    for number, positive in enumerate(tqdm(plan, desc="bags", disable=not progress)):
        key = keys[int(rng.integers(len(keys)))]
        positives, negatives = pools[key]
        chosen = [negatives[i] for i in rng.choice(len(negatives), cells, replace=False)]
        if positive:
            count = int(rng.integers(1, min(spec.max_positive, len(positives)) + 1))
            where = rng.choice(cells, count, replace=False)
            picks = rng.choice(len(positives), count, replace=False)
            for cell, pick in zip(where, picks, strict=True):
                chosen[int(cell)] = positives[int(pick)]
        mosaic = np.zeros((spec.grid * spec.tile_size, spec.grid * spec.tile_size, 3), np.uint8)
        for cell, sample in enumerate(chosen):
            r, c = divmod(cell, spec.grid)
            y, x = r * spec.tile_size, c * spec.tile_size
            mosaic[y : y + spec.tile_size, x : x + spec.tile_size] = _tile(sample, spec.tile_size)
        folder = out / (POSITIVE_FOLDER if positive else NEGATIVE_FOLDER)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{key}_bag{number:05d}.png"
        with atomic_path(target) as tmp:
            Image.fromarray(mosaic).save(tmp, format="PNG")
        for cell, sample in enumerate(chosen):
            r, c = divmod(cell, spec.grid)
            rows.append(
                (
                    target.relative_to(out).as_posix(),
                    POSITIVE_FOLDER if positive else NEGATIVE_FOLDER,
                    r * spec.tile_size,
                    c * spec.tile_size,
                    spec.tile_size,
                    sample.path.as_posix(),
                    sample.class_name,
                    int(sample.class_name == spec.positive),
                )
            )
    with atomic_path(out / BAGS_CSV) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(("bag", "label", "y", "x", "size", "source", "source_class", "decisive"))
        writer.writerows(rows)
    return out
