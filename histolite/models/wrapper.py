"""A classifier that owns its input normalisation, so every model keeps its own preprocessing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from histolite.models.calibration import LogitScaling


class NormalizedClassifier(nn.Module):
    """Takes float RGB in [0, 1] (B, 3, H, W); subtracts mean, divides by std, runs ``net``.

    Keeping mean/std as buffers puts them in every checkpoint and in the ONNX graph, so a
    teacher and a student trained with different statistics can share one input batch. The
    logits end in ``calibration`` (identity until a run's calibration is applied), which the
    ONNX graph then carries as well.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))
        self.calibration = LogitScaling()

    def forward(self, x: Tensor) -> Tensor:
        return self.calibration(self.net((x - self.mean) / self.std))
