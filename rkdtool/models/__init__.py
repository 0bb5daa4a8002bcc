"""The model zoo: architectures by name, with their FKD tap points."""

from rkdtool.models.registry import ArchSpec, build_model, count_parameters, families, parse_arch
from rkdtool.models.taps import FeatureTaps, TapPoint, tap_channels

__all__ = [
    "ArchSpec",
    "FeatureTaps",
    "TapPoint",
    "build_model",
    "count_parameters",
    "families",
    "parse_arch",
    "tap_channels",
]
