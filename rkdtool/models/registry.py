"""Architecture names -> constructors and FKD tap tables.

Names parse (`wrn{depth}-{width}`, ...); each family registers a pattern, a builder and its taps
(timm's registry-of-constructors shape). An architecture-specific detail lives in its own file and here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from rkdtool.errors import UsageError
from rkdtool.models.taps import TapPoint


@dataclass(frozen=True)
class Family:
    name: str
    pattern: re.Pattern[str]
    build: Callable[..., nn.Module]  # build(num_classes=..., **pattern groups)
    taps: Callable[..., Sequence[TapPoint]]  # taps(**pattern groups)
    examples: tuple[str, ...]
    description: str
    aliases: dict[str, str] | None = None
    # infer(state_dict) -> (architecture name, num_classes), or None when the weights are not this family's
    infer: Callable[[Mapping[str, Tensor]], tuple[str, int] | None] | None = None


_FAMILIES: list[Family] = []


def register_family(
    name: str,
    pattern: str,
    *,
    taps: Callable[..., Sequence[TapPoint]],
    examples: Sequence[str],
    description: str,
    aliases: dict[str, str] | None = None,
    infer: Callable[[Mapping[str, Tensor]], tuple[str, int] | None] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: registers a builder for every architecture name matching `pattern`."""

    def wrap(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _FAMILIES.append(
            Family(
                name, re.compile(pattern + r"\Z"), build, taps, tuple(examples), description, aliases, infer
            )
        )
        return build

    return wrap


@dataclass(frozen=True)
class ArchSpec:
    """A parsed architecture name: its family, its canonical name and its parameters."""

    name: str
    family: Family
    params: dict[str, object]

    def build(self, num_classes: int) -> nn.Module:
        return self.family.build(num_classes=num_classes, **self.params)

    @property
    def taps(self) -> tuple[TapPoint, ...]:
        return tuple(self.family.taps(**self.params))


def parse_arch(name: str) -> ArchSpec:
    """Gives back the ArchSpec for an architecture name, or raises UsageError naming the known forms."""
    key = name.strip().lower()
    for family in _FAMILIES:
        key_resolved = (family.aliases or {}).get(key, key)
        match = family.pattern.match(key_resolved)
        if match:
            params = {k: _coerce(v) for k, v in match.groupdict().items()}
            return ArchSpec(key_resolved, family, params)
    known = ", ".join(ex for fam in _FAMILIES for ex in fam.examples)
    raise UsageError(f"unknown architecture {name!r}; known forms: {known} (see `rkdtool models`)")


def _coerce(value: str | None) -> object:
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def build_model(arch: str, num_classes: int) -> nn.Module:
    """Gives back a freshly initialised model of architecture `arch` with `num_classes` outputs."""
    return parse_arch(arch).build(num_classes)


def families() -> list[Family]:
    """Gives back the registered architecture families (for `rkdtool models`)."""
    return list(_FAMILIES)


def count_parameters(model: nn.Module) -> int:
    """Gives back the number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
