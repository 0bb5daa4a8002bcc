"""The model zoo: architectures by name, with their FKD tap points.

`registry` holds the name -> constructor table and knows no architecture; `zoo` registers every family into
it. Importing this package runs `zoo`, so `parse_arch` and `build_model` see the whole zoo whichever module
of the package is imported first.
"""

from rkdtool.models import zoo  # noqa: F401  (registers the families)
from rkdtool.models.registry import ArchSpec, build_model, count_parameters, families, parse_arch
from rkdtool.models.taps import FeatureTaps, TapPoint, placement, tap_channels

__all__ = [
    "ArchSpec",
    "FeatureTaps",
    "TapPoint",
    "build_model",
    "count_parameters",
    "families",
    "parse_arch",
    "placement",
    "tap_channels",
]
