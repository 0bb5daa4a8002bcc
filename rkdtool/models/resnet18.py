"""ResNet-18, CIFAR variant, on torchvision's classes and module names.

He et al., "Deep Residual Learning" (CVPR 2016). torchvision's `ResNet` with a 3x3 stride-1 stem and no
max-pool (the usual CIFAR ResNet-18), so a 32x32 input gives 32/16/8/4 maps in `layer1..4`. Keys are
torchvision's (`conv1`, `bn1`, `layer{1..4}.{0,1}.{conv1,bn1,conv2,bn2,downsample.{0,1}}`, `fc`); the only
addition is a parameter-free `pre_relu` identity per block that names the residual sum before its ReLU, the
tensor FKD distils, so a forward hook can capture and rewrite it.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from rkdtool.models.taps import TapPoint


class PreReluBasicBlock(BasicBlock):
    """torchvision's BasicBlock whose residual sum passes through `pre_relu` before the final ReLU."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relu = nn.ReLU()  # not in-place: it would overwrite the tapped pre-ReLU sum
        self.pre_relu = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.pre_relu(out + identity))


class CifarResNet18(ResNet):
    """ResNet-18 for 32x32 inputs (3x3 stride-1 stem, no max-pool); takes normalised images, gives logits."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(PreReluBasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
        self.maxpool = nn.Identity()


def resnet18_taps() -> tuple[TapPoint, ...]:
    """FKD positions at the end of layer1..3 (32/16/8 maps): each stage's last residual sum, pre-ReLU.

    layer4 (4x4) is left out so that the three positions line up with the WRN, CIFAR ResNet and PyramidNet
    ones in any teacher/student pairing; the margin comes from the last block's bn2, as for CIFAR ResNets
    (algorithms.md §1.1). The stream is the pre-ReLU sum, so a detox rewrite there reaches the next stage
    through the block's ReLU.
    """
    return tuple(TapPoint(stream=f"layer{k}.1.pre_relu", margin_bn=f"layer{k}.1.bn2") for k in (1, 2, 3))
