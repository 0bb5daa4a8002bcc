"""Registers every architecture family of the zoo. Add a family: write its file, register it here.

Each entry maps names to a builder and its FKD taps, and, through `infer`, maps a state dict back to a
name: the keys and shapes that identify the family's published layout, and the numbers (depth, width,
alpha, classes) read off them. hub.py builds the named model and loads the weights strictly, so an
inference that reads a shape wrong fails loudly rather than giving a wrong model.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from rkdtool.errors import UsageError
from rkdtool.models.mobilenet import WIDTHS, CifarMobileNetV2, mobilenetv2_taps
from rkdtool.models.pyramidnet import PyramidNet, pyramidnet_taps
from rkdtool.models.registry import count_parameters, families, parse_arch, register_family
from rkdtool.models.resnet18 import CifarResNet18, resnet18_taps
from rkdtool.models.resnet_cifar import CifarResNet, resnet_cifar_taps
from rkdtool.models.wrn import WRN_TAPS, WideResNet

StateDict = Mapping[str, Tensor]


def _numbered_children(state: StateDict, prefix: str) -> int:
    """Gives back how many consecutive children `prefix.0`, `prefix.1`, ... the state dict has keys for."""
    found = {key[len(prefix) + 1 :].split(".", 1)[0] for key in state if key.startswith(prefix + ".")}
    count = 0
    while str(count) in found:
        count += 1
    return count


def _shape(state: StateDict, key: str) -> tuple[int, ...] | None:
    tensor = state.get(key)
    return None if tensor is None else tuple(tensor.shape)


def infer_wrn(state: StateDict) -> tuple[str, int] | None:
    """Depth 6n+4 from the blocks of `block1.layer`; width from the first conv's 16*w output channels."""
    first = _shape(state, "block1.layer.0.conv1.weight")
    if first is None or "bn1.weight" not in state or "fc.weight" not in state or first[0] % 16:
        return None
    n = _numbered_children(state, "block1.layer")
    return f"wrn{6 * n + 4}-{first[0] // 16}", state["fc.weight"].shape[0]


@register_family(
    "wrn",
    r"wrn(?P<depth>\d+)-(?P<width>\d+)",
    taps=lambda **_: WRN_TAPS,
    examples=("wrn16-2", "wrn28-4"),
    description="pre-activation Wide ResNet, WRN-depth-width (depth = 6n+4), RobustKD/xternalz layout",
    infer=infer_wrn,
)
def build_wrn(num_classes: int, depth: int, width: int) -> WideResNet:
    return WideResNet(depth, width, num_classes)


def infer_resnet18(state: StateDict) -> tuple[str, int] | None:
    """torchvision names with layer4 and a 64-channel stem; a 7x7 stem is the ImageNet model: refused."""
    stem = _shape(state, "conv1.weight")
    if stem is None or stem[0] != 64 or "layer4.0.conv1.weight" not in state or "fc.weight" not in state:
        return None
    blocks = [_numbered_children(state, f"layer{k}") for k in (1, 2, 3, 4)]
    if blocks != [2, 2, 2, 2] or "layer1.0.conv3.weight" in state:
        return None
    if stem[2:] != (3, 3):
        raise UsageError(
            f"the weights are a torchvision ResNet-18 with a {stem[2]}x{stem[3]} ImageNet stem; rkdtool's "
            "resnet18 is the CIFAR variant (3x3 stride-1 stem, no max-pool)"
        )
    return "resnet18", state["fc.weight"].shape[0]


@register_family(
    "resnet18",
    r"resnet18",
    taps=lambda **_: resnet18_taps(),
    examples=("resnet18",),
    description="ResNet-18, CIFAR variant (3x3 stem, no max-pool), torchvision layout",
    infer=infer_resnet18,
)
def build_resnet18(num_classes: int) -> CifarResNet18:
    return CifarResNet18(num_classes)


def infer_resnet_cifar(state: StateDict) -> tuple[str, int] | None:
    """A 16-channel stem and three stages of conv-first basic blocks; no layer4, bn_final or conv3."""
    stem = _shape(state, "conv1.weight")
    first = _shape(state, "layer1.0.conv1.weight")
    if stem is None or stem[0] != 16 or first is None or first[2:] != (3, 3) or "fc.weight" not in state:
        return None
    if any(key in state for key in ("layer4.0.conv1.weight", "bn_final.weight", "layer1.0.conv3.weight")):
        return None
    n = _numbered_children(state, "layer1")
    return f"resnet{6 * n + 2}", state["fc.weight"].shape[0]


@register_family(
    "resnet",
    r"resnet(?!18\Z)(?P<depth>\d+)",
    taps=lambda depth: resnet_cifar_taps(depth),
    examples=("resnet20", "resnet56", "resnet110"),
    description="CIFAR ResNet-depth (depth = 6n+2, basic blocks), FKD/clovaai layout (ReLU inside blocks)",
    infer=infer_resnet_cifar,
)
def build_resnet_cifar(num_classes: int, depth: int) -> CifarResNet:
    return CifarResNet(depth, num_classes)


def infer_pyramidnet(state: StateDict) -> tuple[str, int] | None:
    """Depth from the block count; alpha from the final width, 16 + alpha (x4 for bottlenecks)."""
    final = _shape(state, "bn_final.weight")
    if final is None or "layer1.0.bn1.weight" not in state or "fc.weight" not in state:
        return None
    bottleneck = "layer1.0.conv3.weight" in state
    n = _numbered_children(state, "layer1")
    expansion, per_block = (4, 9) if bottleneck else (1, 6)
    if final[0] % expansion:
        return None
    # The running width ends at 16 + 3n * alpha / (3n) = 16 + alpha (`pyramidal_make_layer`).
    alpha = final[0] // expansion - 16
    name = f"pyramidnet{per_block * n + 2}-a{alpha}" + ("-bottleneck" if bottleneck else "")
    return name, state["fc.weight"].shape[0]


@register_family(
    "pyramidnet",
    r"pyramidnet(?P<depth>\d+)-a(?P<alpha>\d+)(?P<bottleneck>-bottleneck)?",
    taps=lambda bottleneck, **_: pyramidnet_taps(bool(bottleneck)),
    examples=("pyramidnet110", "pyramidnet200", "pyramidnet164-a48-bottleneck"),
    description="PyramidNet-depth with widening alpha, basic (6n+2) or bottleneck (9n+2); pyramidnet110 = "
    "alpha 84 basic, pyramidnet200 = alpha 240 bottleneck (the FKD/RobustKD pair)",
    aliases={"pyramidnet110": "pyramidnet110-a84", "pyramidnet200": "pyramidnet200-a240-bottleneck"},
    infer=infer_pyramidnet,
)
def build_pyramidnet(num_classes: int, depth: int, alpha: int, bottleneck: str | None) -> PyramidNet:
    return PyramidNet(depth, alpha, num_classes, bottleneck=bool(bottleneck))


def infer_mobilenetv2(state: StateDict) -> tuple[str, int] | None:
    """torchvision's `features.N` / `classifier.1` names; the width multiplier from stem and head widths."""
    from torchvision.models._utils import _make_divisible

    stem = _shape(state, "features.0.0.weight")
    if stem is None or "classifier.1.weight" not in state or "features.1.conv.0.0.weight" not in state:
        return None
    head = _shape(state, f"features.{_numbered_children(state, 'features') - 1}.0.weight")
    for width in WIDTHS:
        expected = (_make_divisible(32 * width, 8), _make_divisible(1280 * max(1.0, width), 8))
        if head is not None and (stem[0], head[0]) == expected:
            name = "mobilenetv2" if width == 1.0 else f"mobilenetv2-x{width}"
            return name, state["classifier.1.weight"].shape[0]
    return None


@register_family(
    "mobilenetv2",
    r"mobilenetv2(?:-x(?P<width>\d+(?:\.\d+)?))?",
    taps=lambda **_: mobilenetv2_taps(),
    examples=("mobilenetv2", "mobilenetv2-x0.5"),
    description="MobileNetV2, CIFAR variant (stem and stage-2 stride 1), torchvision layout; -xW sets the "
    f"width multiplier ({', '.join(str(w) for w in WIDTHS)})",
    infer=infer_mobilenetv2,
)
def build_mobilenetv2(num_classes: int, width: str | int | None) -> CifarMobileNetV2:
    return CifarMobileNetV2(num_classes, float(width) if width is not None else 1.0)


def zoo_summary(num_classes: int = 100) -> list[dict]:
    """Gives back one row per example architecture: family, name, parameters and FKD tap channels.

    Tap channels are read off the BN that gives each tap's margin (its `num_features`), which equals the
    distilled tensor's channels in every family. Models are built on the meta device: shapes, no storage.
    """
    import torch

    rows = []
    for family in families():
        for example in family.examples:
            spec = parse_arch(example)
            with torch.device("meta"):
                model = spec.build(num_classes)
            modules = dict(model.named_modules())
            rows.append(
                {
                    "family": family.name,
                    "arch": example,
                    "canonical": spec.name,
                    "params": count_parameters(model),
                    "tap_channels": [modules[tap.margin_module].num_features for tap in spec.taps],
                    "description": family.description,
                }
            )
    return rows
