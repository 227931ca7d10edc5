"""A backbone as a function from uint8 tiles to feature vectors (slide features for MIL)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from histolite.models.registry import create_feature_extractor, pretrained_mean_std
from histolite.models.wrapper import NormalizedClassifier


def tile_embedder(
    backbone: str, *, pretrained: bool = True, weights: str | None = None
) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """``embed(uint8 (N, H, W, 3)) -> float32 (N, F)`` and its provenance for the bag files.

    The backbone runs without its classifier, on the input statistics its weights expect
    (ImageNet weights: theirs; random weights: a neutral 0.5 / 0.25), on CUDA when available.
    """
    net, dim = create_feature_extractor(backbone, pretrained=pretrained, weights=weights)
    if pretrained or weights:
        mean, std = pretrained_mean_std(backbone)
    else:
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = NormalizedClassifier(net, mean, std).eval().to(device)

    @torch.inference_mode()
    def embed(tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float().div(255).to(device)
        return model(x).float().cpu().numpy()

    provenance = {
        "backbone": backbone,
        "pretrained": pretrained,
        "weights": weights,
        "feature_dim": dim,
    }
    return embed, provenance
