"""CIFAR ResNet (depth 6n+2) as modified for FKD: blocks start with a ReLU and end without one.

He et al., "Deep Residual Learning" (CVPR 2016), CIFAR variant; the layout and the moved ReLU follow
clovaai/overhaul-distillation `CIFAR-100/models/ResNet.py` (vendored unchanged by Xming-Z/RobustKD), so
their state dicts load without renaming: `conv1`, `bn1`, `layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}`,
`layer{2,3}.0.downsample.{0,1}` (1x1 conv + BN), `fc`. Because each block applies ReLU to its *input*, a
stage output is already the pre-ReLU tensor FKD distils (algorithms.md §1.1).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from rkdtool.models.taps import TapPoint


class BasicBlock(nn.Module):
    """ReLU(x) -> conv3x3-BN-ReLU-conv3x3-BN, plus the activated input (or its 1x1 projection)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()  # not in-place: the block's input is a tap (the previous stage output)
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
            if stride != 1 or in_planes != planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut  # no trailing ReLU (the FKD modification)


class CifarResNet(nn.Module):
    """ResNet-depth for 32x32 inputs (depth = 6n+2, basic blocks); takes normalised images, gives logits."""

    def __init__(self, depth: int, num_classes: int) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}"
            )
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _stage(16, 16, n, stride=1)
        self.layer2 = _stage(16, 32, n, stride=2)
        self.layer3 = _stage(32, 64, n, stride=2)
        self.fc = nn.Linear(64, num_classes)
        reference_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))  # no ReLU here: layer1's first block applies it
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1)
        return self.fc(x)


def reference_init(model: nn.Module) -> None:
    """Initialises convs N(0, sqrt(2 / (k*k*out))) and BNs to gamma 1, beta 0, as the clovaai ResNet and
    PyramidNet files do (He et al. 2015 fan-out init); Linear layers keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        *[BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1) for i in range(blocks)]
    )


def resnet_cifar_taps(depth: int) -> tuple[TapPoint, ...]:
    """FKD positions (algorithms.md §1.1): the stage outputs; margins from each stage's last bn2."""
    last = (depth - 2) // 6 - 1
    return tuple(TapPoint(stream=f"layer{k}", margin_bn=f"layer{k}.{last}.bn2") for k in (1, 2, 3))
