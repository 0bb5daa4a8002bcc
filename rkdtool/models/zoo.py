"""Registers every architecture family of the zoo. Add a family: write its file, register it here."""

from __future__ import annotations

from rkdtool.models.registry import register_family
from rkdtool.models.wrn import WRN_TAPS, WideResNet


@register_family(
    "wrn",
    r"wrn(?P<depth>\d+)-(?P<width>\d+)",
    taps=lambda **_: WRN_TAPS,
    examples=("wrn16-2", "wrn28-4"),
    description="pre-activation Wide ResNet, WRN-depth-width (depth = 6n+4), RobustKD/xternalz layout",
)
def build_wrn(num_classes: int, depth: int, width: int) -> WideResNet:
    return WideResNet(depth, width, num_classes)
