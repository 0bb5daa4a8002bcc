"""MobileNetV2, CIFAR variant: torchvision's module names with the two early strides set to 1.

Sandler et al., "MobileNetV2" (CVPR 2018). The CIFAR variant of chenyaofo/pytorch-cifar-models
(`pytorch_cifar_models/mobilenetv2.py`, "change stride 2 -> 1 for CIFAR10/100" on the stem and on the
24-channel stage) keeps torchvision's names (`features.{i}...`, `classifier.1`), so its checkpoints and
torchvision-layout ones load unchanged. A 32x32 input stays 32x32 through `features.3`, then halves at
`features.4`, `features.7` and `features.14`.
"""

from __future__ import annotations

from torchvision.models.mobilenetv2 import MobileNetV2

from rkdtool.models.taps import TapPoint

# t (expansion), c (channels), n (blocks), s (stride of the first block): torchvision's table with the
# 24-channel stage at stride 1.
CIFAR_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]
WIDTHS = (0.5, 0.75, 1.0, 1.4)  # the published width multipliers


class CifarMobileNetV2(MobileNetV2):
    """MobileNetV2 for 32x32 inputs (stem and stage-2 stride 1); takes normalised images, gives logits."""

    def __init__(self, num_classes: int, width_mult: float = 1.0) -> None:
        super().__init__(
            num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=CIFAR_SETTING
        )
        self.width_mult = width_mult
        self.features[0][0].stride = (1, 1)  # the stem conv (torchvision hard-codes stride 2)


def mobilenetv2_taps() -> tuple[TapPoint, ...]:
    """FKD positions at the end of the 32x32, 16x16 and 8x8 stages (`features.3`, `.6`, `.13`).

    A block's output is linear (BN of the projection plus the residual), so the stage output is the
    distilled tensor itself and its margin comes from the projection BN (`conv.3`), as for CIFAR ResNets
    (algorithms.md §1.1). These positions match the 32/16/8 maps of the WRN, ResNet and PyramidNet taps, so
    MobileNetV2 can sit on either side of a distillation with any of them.
    """
    return tuple(TapPoint(stream=f"features.{i}", margin_bn=f"features.{i}.conv.3") for i in (3, 6, 13))
