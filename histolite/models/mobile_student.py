"""Mobile students: inverted-residual CNNs small in parameters *and* in compute.

A CIFAR ResNet-8 has only 78k parameters, but it keeps 16-64 full 3x3 convolutions at the input
resolution: about 153 M multiply-accumulates (MACs) per 112 px tile, more than EfficientNet-Lite0.
These students follow MobileNetV2 (Sandler et al. 2018): a stride-2 stem, then blocks of
1x1 expansion -> 3x3 depthwise -> 1x1 linear projection, with residuals where shapes allow.
Depthwise convolutions cost a few MACs per pixel, so ``mobile_student_s`` stays under 100k
parameters and 20 M MACs at 112 px. ReLU6 keeps activations bounded, which INT8 quantisation
likes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from histolite.models.registry import register_model


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    activation: bool = True,
) -> nn.Sequential:
    """Convolution, BatchNorm and (optionally) ReLU6: the unit every block is built from."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if activation:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand 1x1 (skipped at expansion 1), depthwise kxk, project 1x1 without activation."""

    def __init__(
        self, in_channels: int, out_channels: int, expansion: int, stride: int, kernel: int = 3
    ) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn(in_channels, hidden, 1))
        layers.append(conv_bn(hidden, hidden, kernel, stride, groups=hidden))
        layers.append(conv_bn(hidden, out_channels, 1, activation=False))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + out if self.residual else out


@dataclass(frozen=True)
class StageSpec:
    """``blocks`` inverted residuals to ``channels``; the first one strides."""

    channels: int
    expansion: int
    blocks: int
    stride: int
    kernel: int = 3


class MobileStudent(nn.Module):
    """Stem (3x3, stride 2) -> stages of inverted residuals -> 1x1 head -> pool -> linear."""

    def __init__(
        self,
        num_classes: int,
        stem: int,
        stages: Sequence[StageSpec],
        head: int,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.stem = conv_bn(3, stem, 3, stride=2)
        blocks: list[nn.Module] = []
        channels = stem
        for stage in stages:
            for i in range(stage.blocks):
                stride = stage.stride if i == 0 else 1
                blocks.append(
                    InvertedResidual(
                        channels, stage.channels, stage.expansion, stride, stage.kernel
                    )
                )
                channels = stage.channels
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(channels, head, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(head, num_classes)
        self.num_features = head
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.pool(self.head(self.blocks(self.stem(x)))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


@register_model
def mobile_student_s(num_classes: int) -> MobileStudent:
    """~94k parameters, ~17.8 M MACs at 112 px (8 classes): the default Kather student."""
    stages = (
        StageSpec(16, 1, 1, 1),
        StageSpec(24, 3, 2, 2),
        StageSpec(40, 3, 2, 2),
        StageSpec(64, 4, 2, 2),
    )
    return MobileStudent(num_classes, stem=16, stages=stages, head=192)


@register_model
def mobile_student_xs(num_classes: int) -> MobileStudent:
    """~79k parameters, ~14.7 M MACs at 112 px: narrower stem and expansion 3 throughout."""
    stages = (
        StageSpec(12, 1, 1, 1),
        StageSpec(24, 3, 2, 2),
        StageSpec(40, 3, 2, 2),
        StageSpec(64, 3, 2, 2),
    )
    return MobileStudent(num_classes, stem=12, stages=stages, head=192)
