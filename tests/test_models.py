"""The zoo: parameter counts (paper Table 2), FKD taps (algorithms.md §1.1), names, inference, layouts."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from rkdtool.errors import UsageError
from rkdtool.hub import infer_arch, load_state_strict
from rkdtool.models import FeatureTaps, build_model, count_parameters, parse_arch, tap_channels
from rkdtool.models.zoo import zoo_summary

# RobustKD paper Table 2 (robustkd-paper.txt) / FKD: parameters in millions, CIFAR-100 heads.
PAPER_PARAMS_M = {
    "wrn28-4": 5.87,
    "wrn16-4": 2.77,
    "wrn28-2": 1.47,
    "wrn16-2": 0.70,
    "resnet56": 0.86,
    "pyramidnet200": 26.84,
    "pyramidnet110": 3.91,
}
# algorithms.md §1.1, "channels at the 3 positions".
PAPER_TAP_CHANNELS = {
    "wrn28-4": [64, 128, 256],
    "wrn16-4": [64, 128, 256],
    "wrn28-2": [32, 64, 128],
    "wrn16-2": [32, 64, 128],
    "resnet56": [16, 32, 64],
    "pyramidnet200": [100, 180, 1024],
    "pyramidnet110": [44, 72, 100],
}
# Small members of every family, for forwards that must stay fast.
SMALL = [
    "wrn10-1",
    "resnet20",
    "pyramidnet20-a24",
    "pyramidnet29-a24-bottleneck",
    "mobilenetv2-x0.5",
    "resnet18",
]


def meta_model(arch: str, num_classes: int = 100) -> nn.Module:
    with torch.device("meta"):  # shapes without storage or init cost
        return build_model(arch, num_classes)


@pytest.fixture(scope="module")
def paper_models() -> dict[str, tuple[int, list[int]]]:
    """Parameters and tap channels of the paper's models, 100 classes, each built once on the meta device.

    tap_channels runs a real hooked forward; on the meta device it propagates shapes only, so even
    PyramidNet-200 (26.8M parameters) costs no compute.
    """
    found = {}
    for arch in PAPER_PARAMS_M:
        model = meta_model(arch)
        found[arch] = (count_parameters(model), tap_channels(model, parse_arch(arch).taps))
    return found


@pytest.mark.parametrize("arch", list(PAPER_PARAMS_M))
def test_parameter_counts_match_paper_table2(arch, paper_models):
    params = paper_models[arch][0]
    paper = PAPER_PARAMS_M[arch] * 1e6
    # Table 2 truncates to two decimals in millions: the count must truncate to the printed value...
    assert math.floor(params / 1e4) / 100 == pytest.approx(PAPER_PARAMS_M[arch])
    # ...and lie within 0.5% of it, except WRN-28-2 (1,479,220: +0.63%, the table's truncation; with a
    # 10-class head it is 1,467,610, which would round to the printed 1.47M).
    assert abs(params - paper) / paper < (0.0065 if arch == "wrn28-2" else 0.005)


def test_tap_channels_match_algorithms_table(paper_models):
    assert {arch: channels for arch, (_, channels) in paper_models.items()} == PAPER_TAP_CHANNELS


def test_models_listing_gives_exact_counts_and_channels(paper_models):
    rows = {row["arch"]: row for row in zoo_summary()}
    # The lixiao985 checkpoint's count (algorithms.md §7) and the values the other layouts give.
    expected = {
        "wrn28-4": 5_872_180,
        "resnet56": 861_620,
        "pyramidnet110": 3_913_536,
        "pyramidnet200": 26_844_952,
        "resnet18": 11_220_132,
        "mobilenetv2": 2_351_972,
    }
    assert {arch: rows[arch]["params"] for arch in expected} == expected
    assert rows["pyramidnet200"]["canonical"] == "pyramidnet200-a240-bottleneck"
    for arch in set(rows) & set(paper_models):  # the listing reads channels off BNs: same numbers
        assert (rows[arch]["params"], rows[arch]["tap_channels"]) == paper_models[arch]


@pytest.mark.parametrize("arch", SMALL)
def test_taps_are_pre_relu_at_32_16_8_and_rewritable(arch):
    torch.manual_seed(0)
    spec = parse_arch(arch)
    model = spec.build(10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), FeatureTaps(model, spec.taps) as taps:
        logits, feats = taps.run(x)
    assert logits.shape == (2, 10)
    # Every family taps 32x32, 16x16 and 8x8 maps, so any zoo teacher pairs with any zoo student in FKD.
    assert [f.shape[-1] for f in feats] == [32, 16, 8]
    modules = dict(model.named_modules())
    # The margin BN has one (gamma, beta) per distilled channel (FKD's margin, algorithms.md §1.2).
    assert [f.shape[1] for f in feats] == [modules[t.margin_module].num_features for t in spec.taps]
    assert all(isinstance(modules[t.margin_module], nn.BatchNorm2d) for t in spec.taps)
    # Pre-ReLU: each distilled tensor still has negative entries (an in-place ReLU would have erased them).
    assert all(bool((f < 0).any()) for f in feats)

    # RobustKD's detox replaces a stage output; the later stages must consume the replacement.
    with torch.no_grad(), FeatureTaps(model, spec.taps, rewrite=lambda k, f: f * (k != 0)) as taps:
        rewritten, _ = taps.run(x)
    assert torch.count_nonzero(taps.stages[0]) == 0
    assert not torch.allclose(logits, rewritten)


def test_names_parse_with_aliases_and_limits():
    assert parse_arch("pyramidnet200").name == "pyramidnet200-a240-bottleneck"
    assert parse_arch("pyramidnet110").name == "pyramidnet110-a84"
    assert parse_arch("PyramidNet110-a84").params == {"depth": 110, "alpha": 84, "bottleneck": None}
    assert parse_arch("resnet18").family.name == "resnet18"
    assert parse_arch("resnet56").family.name == "resnet"
    assert parse_arch("mobilenetv2-x0.5").name == "mobilenetv2-x0.5"
    with pytest.raises(ValueError, match="6n\\+2"):
        build_model("resnet21", 10)
    with pytest.raises(ValueError, match="9n\\+2"):
        build_model("pyramidnet21-a24-bottleneck", 10)
    with pytest.raises(UsageError, match="unknown architecture"):
        parse_arch("vgg16")


@pytest.mark.parametrize(
    "arch",
    [
        "wrn28-4",
        "wrn16-2",
        "wrn10-1",
        "resnet20",
        "resnet56",
        "resnet110",
        "pyramidnet110-a84",
        "pyramidnet200-a240-bottleneck",
        "pyramidnet164-a48-bottleneck",
        "mobilenetv2",
        "mobilenetv2-x0.5",
        "mobilenetv2-x1.4",
        "resnet18",
    ],
)
def test_inference_recovers_name_and_classes(arch):
    state = meta_model(arch, num_classes=37).state_dict()
    assert infer_arch(state) == (arch, 37)


def test_inference_refuses_imagenet_resnet18():
    with torch.device("meta"):
        state = torchvision.models.resnet18(num_classes=10).state_dict()
    with pytest.raises(UsageError, match="7x7 ImageNet stem"):
        infer_arch(state)


def test_inference_gives_none_for_unknown_layouts():
    assert infer_arch({"linear.weight": torch.zeros(10, 512), "conv.weight": torch.zeros(8, 3, 3, 3)}) is None


def test_strict_load_names_what_does_not_fit():
    state = build_model("resnet20", 10).state_dict()
    with pytest.raises(UsageError, match=r"do not fit wrn16-2: .*missing.*; the weights look like resnet20"):
        load_state_strict(build_model("wrn16-2", 10), state, "wrn16-2", "resnet20")
    with pytest.raises(UsageError, match="mismatched"):
        load_state_strict(build_model("resnet20", 100), state, "resnet20", "resnet20")
    # PyTorch < 0.4.1 checkpoints have no num_batches_tracked; that alone is not a mismatch.
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    load_state_strict(build_model("resnet20", 10), old, "resnet20", "resnet20")


# --- The published layouts: an independent functional forward of each reference, fed the same state dict.


def _bn(state, prefix, x):
    return F.batch_norm(
        x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"], state[f"{prefix}.weight"],
        state[f"{prefix}.bias"], training=False, eps=1e-5,
    )  # fmt: skip


def _randomise_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def clovaai_resnet_forward(state: dict, x: torch.Tensor, n: int) -> torch.Tensor:
    """clovaai/overhaul-distillation CIFAR-100/models/ResNet.py (basic blocks), written out functionally."""
    x = _bn(state, "bn1", F.conv2d(x, state["conv1.weight"], padding=1))
    for stage, stride in ((1, 1), (2, 2), (3, 2)):
        for i in range(n):
            p, s = f"layer{stage}.{i}", stride if i == 0 else 1
            x = F.relu(x)
            out = F.relu(_bn(state, f"{p}.bn1", F.conv2d(x, state[f"{p}.conv1.weight"], stride=s, padding=1)))
            out = _bn(state, f"{p}.bn2", F.conv2d(out, state[f"{p}.conv2.weight"], padding=1))
            if f"{p}.downsample.0.weight" in state:
                x = _bn(state, f"{p}.downsample.1", F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=s))
            x = out + x
    x = F.avg_pool2d(F.relu(x), 8).flatten(1)
    return F.linear(x, state["fc.weight"], state["fc.bias"])


def pyramidnet_basic_forward(state: dict, x: torch.Tensor, n: int) -> torch.Tensor:
    """clovaai/overhaul-distillation CIFAR-100/models/PyramidNet.py (BasicBlock), written out functionally."""
    x = _bn(state, "bn1", F.conv2d(x, state["conv1.weight"], padding=1))
    for stage, stride in ((1, 1), (2, 2), (3, 2)):
        for i in range(n):
            p, s = f"layer{stage}.{i}", stride if i == 0 else 1
            out = F.conv2d(_bn(state, f"{p}.bn1", x), state[f"{p}.conv1.weight"], stride=s, padding=1)
            out = F.conv2d(F.relu(_bn(state, f"{p}.bn2", out)), state[f"{p}.conv2.weight"], padding=1)
            out = _bn(state, f"{p}.bn3", out)
            shortcut = F.avg_pool2d(x, 2, 2, ceil_mode=True) if s != 1 else x
            zeros = out.new_zeros(out.shape[0], out.shape[1] - shortcut.shape[1], *out.shape[2:])
            x = out + torch.cat([shortcut, zeros], 1)
    x = F.avg_pool2d(F.relu(_bn(state, "bn_final", x)), 8).flatten(1)
    return F.linear(x, state["fc.weight"], state["fc.bias"])


def test_cifar_resnet_matches_the_clovaai_forward():
    torch.manual_seed(1)
    model = _randomise_bn_stats(build_model("resnet20", 10))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), clovaai_resnet_forward(model.state_dict(), x, 3), atol=1e-5, rtol=0
        )


def test_pyramidnet_matches_the_reference_forward():
    torch.manual_seed(2)
    model = _randomise_bn_stats(build_model("pyramidnet20-a24", 10))
    state = model.state_dict()
    # Widths grow by alpha/(3n) = 24/9 per block from 16: round(18.67), round(21.33), round(24) ... 40.
    assert [state[f"layer1.{i}.conv1.weight"].shape[0] for i in range(3)] == [19, 21, 24]
    assert state["bn_final.weight"].shape[0] == 40
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pyramidnet_basic_forward(state, x, 3), atol=1e-5, rtol=1e-5)


def test_resnet18_matches_torchvision_with_a_cifar_stem():
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(num_classes=10)
    reference.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    reference = _randomise_bn_stats(reference)
    model = build_model("resnet18", 10).eval()
    model.load_state_dict(reference.state_dict())  # strict: torchvision's keys, nothing else
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)


def test_mobilenetv2_keeps_torchvision_keys_and_cifar_strides():
    model = build_model("mobilenetv2", 100)
    reference_keys = set(torchvision.models.mobilenet_v2(num_classes=100).state_dict())
    assert set(model.state_dict()) == reference_keys
    with torch.no_grad():
        assert model.features[:4](torch.zeros(1, 3, 32, 32)).shape[-1] == 32
