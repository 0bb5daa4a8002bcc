"""PyramidNet (basic or bottleneck) for 32x32 inputs, with the module names of its published checkpoints.

Han, Kim & Kim, "Deep Pyramidal Residual Networks" (CVPR 2017); layout of dyhan0920/PyramidNet-PyTorch as
vendored by clovaai/overhaul-distillation `CIFAR-100/models/PyramidNet.py` (and Xming-Z/RobustKD), so
their checkpoints (e.g. `pyramid200_mixup_15.6.tar`, once unwrapped) load unchanged: `conv1`, `bn1`,
`layer{1,2,3}.{i}.{bn1,conv1,bn2,conv2,bn3[,conv3,bn4]}`, `bn_final`, `fc`. Widths grow by
alpha / (3n) per block; the shortcut is identity (avg-pooled when strided), zero-padded to the new width.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rkdtool.models.resnet_cifar import reference_init
from rkdtool.models.taps import TapPoint


class BasicBlock(nn.Module):
    """BN-conv3x3-BN-ReLU-conv3x3-BN plus the zero-padded shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()  # not in-place: FKD taps read BN outputs that this ReLU consumes
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(out)))
        return _add_padded_shortcut(self.bn3(out), x, self.downsample)


class Bottleneck(nn.Module):
    """BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1(x4)-BN plus the zero-padded shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return _add_padded_shortcut(self.bn4(out), x, self.downsample)


def _add_padded_shortcut(out: torch.Tensor, x: torch.Tensor, downsample: nn.Module | None) -> torch.Tensor:
    # The reference concatenates a zero tensor made with torch.cuda.FloatTensor; F.pad is the same
    # arithmetic on any device.
    shortcut = x if downsample is None else downsample(x)
    extra = out.shape[1] - shortcut.shape[1]
    if extra:
        shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, extra))
    return out + shortcut


class PyramidNet(nn.Module):
    """PyramidNet-depth with widening factor alpha (depth 6n+2 basic, 9n+2 bottleneck); gives logits."""

    def __init__(self, depth: int, alpha: int, num_classes: int, bottleneck: bool = False) -> None:
        super().__init__()
        block: type[BasicBlock] | type[Bottleneck] = Bottleneck if bottleneck else BasicBlock
        per_block = 9 if bottleneck else 6
        if depth < per_block + 2 or (depth - 2) % per_block != 0:
            kind = "bottleneck" if bottleneck else "basic"
            raise ValueError(f"{kind} PyramidNet depth must be {per_block}n+2, got {depth}")
        n = (depth - 2) // per_block
        self.depth, self.alpha, self.bottleneck = depth, alpha, bottleneck
        add_rate = alpha / (3 * n)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        # Channel growth exactly as the reference `pyramidal_make_layer`: a running float width, rounded.
        width, in_planes = 16.0, 16
        stages = []
        for stride in (1, 2, 2):
            blocks = []
            for i in range(n):
                width += add_rate
                blocks.append(block(in_planes, int(round(width)), stride if i == 0 else 1))
                in_planes = int(round(width)) * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.final_featuremap_dim = in_planes
        self.bn_final = nn.BatchNorm2d(in_planes)
        self.relu_final = nn.ReLU()
        self.fc = nn.Linear(in_planes, num_classes)
        reference_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu_final(self.bn_final(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def pyramidnet_taps(bottleneck: bool) -> tuple[TapPoint, ...]:
    """FKD positions (algorithms.md §1.1): stage outputs, distilled through the next block's first BN(s).

    Bottleneck: `layer{2,3}.0.bn2(conv1(bn1(F)))`, the first pre-ReLU tensor after the stage. Basic: the
    reference distils `layer{2,3}.0.bn1(F)` but takes its margin from `bn2`; here the margin comes from the
    BN that produces the distilled tensor (`bn1`), which only matters for a basic PyramidNet teacher.
    """
    bn = "bn2" if bottleneck else "bn1"
    return (
        TapPoint(stream="layer1", distilled=f"layer2.0.{bn}"),
        TapPoint(stream="layer2", distilled=f"layer3.0.{bn}"),
        TapPoint(stream="layer3", distilled="bn_final"),
    )
