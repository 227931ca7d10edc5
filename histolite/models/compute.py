"""What a model costs: parameters, weight size, and multiply-accumulates at an input size.

"Small" has to mean small in compute as well as on disk: a 78k-parameter CIFAR ResNet at full
resolution costs more MACs than EfficientNet-Lite0. MACs are counted for convolutions and linear
layers (the convention of thop / fvcore; BatchNorm, activations and pooling are left out), by
shape alone on the meta device, so even large backbones are counted in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_size_mb(model: nn.Module) -> float:
    """Size of parameters and buffers as stored in float32-or-native dtype, in MB (10^6 bytes)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


def count_macs(model: nn.Module, input_size: int, channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass on one ``input_size`` x ``input_size`` image.

    Works on real and on meta-device models (no memory, no arithmetic): only output shapes are
    needed. A convolution costs (output elements) x (in_channels / groups x kernel area); a
    linear layer (output elements) x (in_features).
    """
    total = 0

    def conv(module: nn.Module, inputs: object, output: Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d)
        total += output.numel() * module.weight[0].numel()

    def linear(module: nn.Module, inputs: object, output: Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Linear)
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear))
    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, channels, input_size, input_size, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


@dataclass(frozen=True)
class ModelCost:
    """Parameters, weight size and MACs of a model at one input size."""

    name: str
    parameters: int
    size_mb: float
    input_size: int
    macs: int

    @property
    def mmacs(self) -> float:
        return self.macs / 1e6
