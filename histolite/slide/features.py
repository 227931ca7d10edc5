"""Tile embeddings of whole slides, cached one file per slide, for attention MIL on slides.

The tiles are the ones ``histolite slide infer`` would classify (:func:`plan_tissue_tiles`);
each is read at ``tile_px`` pixels and handed to an embedder, any function from a batch of
uint8 tiles (N, H, W, 3) to vectors (N, F). This module imports no torch: the PyTorch backbone
that usually embeds (``histolite.models.embedding``) is passed in by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from histolite.data.feature_bags import FEATURE_SUFFIX, SlideBag, save_bag
from histolite.errors import DataError
from histolite.fileio import write_json
from histolite.slide.layout import SlideOutputs
from histolite.slide.outputs import render_attention
from histolite.slide.reader import open_slide, read_region
from histolite.slide.tiles import plan_tissue_tiles, read_overview

Embedder = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, 3) -> float (N, F)


@dataclass(frozen=True)
class TileSettings:
    """Which tiles of a slide are embedded, and at what size."""

    tile_um: float = 112.0
    tile_px: int = 224
    min_tissue: float = 0.5
    mpp: float | None = None
    batch_size: int = 32


def slide_features(
    paths: Sequence[Path],
    out: Path,
    settings: TileSettings,
    embed: Embedder,
    provenance: Mapping[str, Any],
    *,
    progress: bool = True,
) -> list[Path]:
    """Write ``OUT/<stem>.npz`` (features, boxes, tissue, meta) for every slide.

    ``provenance`` (backbone, weights, feature size) goes into each file's ``meta`` beside the
    tile geometry, so training can refuse bags made by different embedders.
    """
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        slide = open_slide(path, settings.mpp)
        try:
            info = slide.info
            tiles = plan_tissue_tiles(slide, settings.tile_um, min_tissue=settings.min_tissue).tiles
            if not tiles:
                raise DataError(
                    f"{path}: no tissue tiles of {settings.tile_um} um; nothing to embed"
                )
            chunks = []
            for start in tqdm(
                range(0, len(tiles), settings.batch_size),
                desc=f"features {path.name}",
                disable=not progress,
            ):
                batch = tiles[start : start + settings.batch_size]
                pixels = np.stack(
                    [read_region(slide, t.x, t.y, t.size, settings.tile_px) for t in batch]
                )
                chunks.append(np.asarray(embed(pixels), dtype=np.float32))
        finally:
            slide.close()
        bag = SlideBag(
            features=np.concatenate(chunks),
            boxes=np.array([(t.x, t.y, t.size, t.size) for t in tiles]),
            tissue=np.array([t.tissue for t in tiles]),
            meta={
                "slide": str(path.resolve()),
                **provenance,
                "tile_um": settings.tile_um,
                "tile_px": settings.tile_px,
                "mpp": info.mpp,
                "min_tissue": settings.min_tissue,
            },
        )
        written.append(save_bag(out / f"{path.stem}{FEATURE_SUFFIX}", bag))
    return written


def write_bag_prediction(
    outputs: SlideOutputs,
    features: Path,
    bag: SlideBag,
    classes: Sequence[str],
    probabilities: np.ndarray,
    attention: np.ndarray,
) -> dict[str, Any]:
    """A slide-level MIL prediction: ``mil_prediction.json`` and, when the slide file is still
    where its features were made, ``mil_heatmap.png`` (each tile's attention on the slide)."""
    predicted = classes[int(np.argmax(probabilities))]
    by_class = {c: float(p) for c, p in zip(classes, probabilities, strict=True)}
    result: dict[str, Any] = {
        "features": str(features),
        "slide": bag.meta.get("slide"),
        "class": predicted,
        "probabilities": by_class,
        "tiles": len(bag.boxes),
        "attention": [
            {"x": int(x), "y": int(y), "width": int(w), "height": int(h), "weight": float(a)}
            for (x, y, w, h), a in zip(bag.boxes, attention, strict=True)
        ],
    }
    outputs.root.mkdir(parents=True, exist_ok=True)
    write_json(outputs.mil_prediction, result)
    slide_path = Path(str(bag.meta.get("slide", "")))
    if slide_path.is_file():
        slide = open_slide(slide_path, bag.meta.get("mpp"))
        try:
            overview, scale = read_overview(slide)
        finally:
            slide.close()
        render_attention(
            overview,
            scale,
            [(int(x), int(y), int(w)) for x, y, w, _ in bag.boxes],
            [float(a) for a in attention],
            outputs.mil_heatmap,
            title=f"{slide_path.name}: {predicted} ("
            + ", ".join(f"{c} {p:.2f}" for c, p in by_class.items())
            + ")",
        )
    return result
