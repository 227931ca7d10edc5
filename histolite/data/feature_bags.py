"""Slide bags: one ``.npz`` of tile features per slide, as ``histolite slide features`` writes.

A slide is too large to be a bag of pixels, so attention MIL on slides trains on cached tile
embeddings. Each file holds ``features`` (N, F) float32, ``boxes`` (N, 4) level-0 x, y, width,
height, ``tissue`` (N,) and ``meta``, a JSON string saying how the features were made (backbone,
tile size in microns, slide path). Files are read with ``allow_pickle=False``. No torch here:
slides are embedded by ``histolite.slide.features``; ``data.bags`` makes the torch datasets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histolite.data.folder import Sample
from histolite.errors import DataError
from histolite.fileio import atomic_path

FEATURE_SUFFIX = ".npz"


@dataclass(frozen=True)
class SlideBag:
    features: np.ndarray
    boxes: np.ndarray
    tissue: np.ndarray
    meta: dict[str, Any]


def save_bag(path: Path, bag: SlideBag) -> Path:
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez(
            fh,
            features=bag.features.astype(np.float32),
            boxes=bag.boxes.astype(np.int64),
            tissue=bag.tissue.astype(np.float32),
            meta=np.array(json.dumps(bag.meta)),
        )
    return path


def load_bag(path: Path) -> SlideBag:
    """A slide bag, or a DataError naming the file and what is wrong with it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            bag = SlideBag(
                features=np.asarray(data["features"], dtype=np.float32),
                boxes=np.asarray(data["boxes"]),
                tissue=np.asarray(data["tissue"]),
                meta=json.loads(str(data["meta"])),
            )
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: not a slide feature file ({exc})") from exc
    if bag.features.ndim != 2 or len(bag.features) != len(bag.boxes):
        raise DataError(
            f"{path}: features {bag.features.shape} and boxes {bag.boxes.shape} do not match"
        )
    if len(bag.features) == 0:
        raise DataError(f"{path}: no tiles (the slide had no tissue at this tile size)")
    return bag


def feature_dimension(samples: Sequence[Sample]) -> tuple[int, dict[str, Any]]:
    """Feature size and provenance of a set of slide bags; all must agree."""
    first = load_bag(samples[0].path)
    dim = first.features.shape[1]
    for sample in samples[1:]:
        with np.load(sample.path, allow_pickle=False) as data:
            other = data["features"].shape[1]
        if other != dim:
            raise DataError(
                f"{sample.path}: {other} features per tile, but {samples[0].path} has {dim}; "
                "extract every slide with the same backbone"
            )
    return dim, first.meta
