"""The modules that go into ONNX graphs.

Two graphs per exported model when it normalises stain, because training normalises each tile
at its own resolution *before* resizing it to the model's input (``data.transforms.preprocess``):

- ``StainGraph`` (``stain.onnx``): Reinhard on a batch of same-size patches of any height and
  width, float RGB in [0, 1] -> float RGB in [0, 1]; the runtime rounds it to 8 bits, as the
  training path does, then resizes;
- ``ServingGraph`` / ``MilServingGraph`` (``model.onnx``): model + softmax on resized input.

Normalising after the resize instead (one graph) changes each tile's Lab statistics and skips
the 8-bit rounding: 97.5% top-1 agreement with the trained model on Kather test tiles, against
100% in this order. Serving still needs only ONNX Runtime and NumPy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from histolite.models import NormalizedClassifier
from histolite.models.mil import AttentionMIL
from histolite.stain import ReinhardNormalizer


class StainGraph(nn.Module):
    def __init__(self, stain: ReinhardNormalizer) -> None:
        super().__init__()
        self.stain = stain

    def forward(self, patches: Tensor) -> Tensor:
        return self.stain.torch_normalize(patches)


class ServingGraph(nn.Module):
    def __init__(self, model: NormalizedClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return torch.softmax(self.model(images), dim=1)


class MilServingGraph(nn.Module):
    """One bag of any size: patches (N, 3, S, S) in [0, 1] -> probabilities (1, C), attention (N,).

    The backbone, the instance embedding, attention pooling, classifier and softmax in one
    graph, so serving a bag is one ONNX Runtime call (after the stain graph) with no torch.
    """

    def __init__(self, model: AttentionMIL) -> None:
        super().__init__()
        if model.encoder is None:
            raise ValueError("a MIL model on precomputed features has no image encoder to export")
        self.model = model

    def forward(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        assert self.model.encoder is not None
        h = self.model.embed(self.model.encoder(patches)).unsqueeze(0)  # (1, N, D)
        mask = torch.ones_like(h[..., 0], dtype=torch.bool)
        pooled, attention = self.model.pool(h, mask)
        return torch.softmax(self.model.classifier(pooled), dim=1), attention[0]
