"""The modules that go into ONNX graphs: stain normalisation + model + softmax.

Serving then needs only ONNX Runtime and NumPy: images in [0, 1], resized to the model's input,
go in; class probabilities come out. Each image (or patch) is stain-normalised on its own, as
in training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from histolite.models import NormalizedClassifier
from histolite.models.mil import AttentionMIL
from histolite.stain import ReinhardNormalizer


class ServingGraph(nn.Module):
    def __init__(self, model: NormalizedClassifier, stain: ReinhardNormalizer | None) -> None:
        super().__init__()
        self.model = model
        self.stain = stain

    def forward(self, images: Tensor) -> Tensor:
        if self.stain is not None:
            images = self.stain(images)
        return torch.softmax(self.model(images), dim=1)


class MilServingGraph(nn.Module):
    """One bag of any size: patches (N, 3, S, S) in [0, 1] -> probabilities (1, C), attention (N,).

    Stain normalisation, the backbone, the instance embedding, attention pooling, classifier
    and softmax in one graph, so serving a bag is one ONNX Runtime call with no torch.
    """

    def __init__(self, model: AttentionMIL, stain: ReinhardNormalizer | None) -> None:
        super().__init__()
        if model.encoder is None:
            raise ValueError("a MIL model on precomputed features has no image encoder to export")
        self.model = model
        self.stain = stain

    def forward(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        if self.stain is not None:
            patches = self.stain(patches)
        assert self.model.encoder is not None
        h = self.model.embed(self.model.encoder(patches)).unsqueeze(0)  # (1, N, D)
        mask = torch.ones_like(h[..., 0], dtype=torch.bool)
        pooled, attention = self.model.pool(h, mask)
        return torch.softmax(self.model.classifier(pooled), dim=1), attention[0]
