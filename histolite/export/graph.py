"""The module that goes into the ONNX graph: stain normalisation + classifier + softmax.

Serving then needs only ONNX Runtime and NumPy: images in [0, 1], resized to the model's input,
go in; class probabilities come out. Each image (or patch) is stain-normalised on its own, as
in training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from histolite.models import NormalizedClassifier
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
