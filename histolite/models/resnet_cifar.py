"""CIFAR-style ResNets (He et al. 2016, section 4.2): tiny students for distillation.

Three stages of basic blocks at 16/32/64 channels, stride-1 3x3 stem, global average pooling.
ResNet-8 (one block per stage) has about 78k parameters for 8 classes, under the 94.7k of the
BACH paper's student, and runs at any input size.
"""

from __future__ import annotations

from torch import Tensor, nn

from histolite.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2): ``blocks_per_stage`` = n basic blocks in each of three stages."""

    def __init__(
        self, blocks_per_stage: int, num_classes: int, widths: tuple[int, int, int] = (16, 32, 64)
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        in_channels = widths[0]
        for i, width in enumerate(widths):
            blocks = [
                BasicBlock(in_channels if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1)
                for j in range(blocks_per_stage)
            ]
            stages.append(nn.Sequential(*blocks))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self.num_features = in_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


@register_model
def resnet8(num_classes: int) -> CifarResNet:
    """ResNet-8: one basic block per stage, ~78k parameters."""
    return CifarResNet(1, num_classes)


@register_model
def resnet14(num_classes: int) -> CifarResNet:
    """ResNet-14: two basic blocks per stage, ~175k parameters."""
    return CifarResNet(2, num_classes)


@register_model
def resnet20(num_classes: int) -> CifarResNet:
    """ResNet-20: three basic blocks per stage, ~272k parameters."""
    return CifarResNet(3, num_classes)
