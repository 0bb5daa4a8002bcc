"""Makers of poisoned teachers for evaluation (DESIGN §6 Attacks; algorithms.md §3).

The latent backdoor here is the LBA same-task variant (algorithms.md §3.4; Yao et al., CCS 2019, as
adapted by the CKD/RobustKD code's `create_patch_latentbackdoor.py`): a full-image blend trigger optimised
so that triggered images land on the target class's feature centroid at the FKD taps, then fine-tuning on
a poisoned share of the training data. Feature alignment is what lets plain FKD carry it into a student
(feasibility.md: 94% student ASR, where BadNets transfers 0%).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rkdtool.data import ImageData, denormalize, normalize
from rkdtool.models import FeatureTaps, TapPoint
from rkdtool.probes import Probe, probe_from_table
from rkdtool.training import (
    BatchTransform,
    ClassifierRecipe,
    ProgressFn,
    batches,
    no_progress,
    train_classifier,
)


def blend_probe(name: str, pattern: torch.Tensor, alpha: float, target: int) -> Probe:
    """Gives back a full-image blend probe `x' = (1 - alpha) x + alpha * pattern`."""
    h, w = pattern.shape[-2:]
    return Probe(
        name,
        "blend",
        target,
        pattern.detach().clone().float(),
        torch.full((1, h, w), float(alpha)),
        spec={"name": name, "kind": "blend", "target": target, "alpha": float(alpha)},
    )


def poison_batches(probe: Probe, target: int, rate: float) -> BatchTransform:
    """Gives back a batch transform that triggers a share `rate` of non-target images and relabels them."""

    def transform(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        chosen = (torch.rand(len(labels), generator=generator) < rate) & (labels != target)
        if chosen.any():
            images = images.clone()
            images[chosen] = probe.apply(images[chosen])
            labels = torch.where(chosen, torch.full_like(labels, target), labels)
        return images, labels

    return transform


@dataclass
class LatentTargets:
    """Per-tap centroid of the target class and its within-class spread (the loss normaliser)."""

    centroids: list[torch.Tensor]
    spreads: list[torch.Tensor]

    def distance(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Gives back sum over taps of mean_b ||F_l - c_l||^2 / spread_l."""
        total = features[0].new_zeros(())
        for f, c, s in zip(features, self.centroids, self.spreads, strict=True):
            total = total + ((f - c) ** 2).flatten(1).sum(1).mean() / s
        return total


@torch.no_grad()
def latent_targets(
    model: nn.Module, taps: tuple[TapPoint, ...], data: ImageData, target: int, device: torch.device
) -> LatentTargets:
    """Gives back the target class's feature centroids at the taps, from clean training images."""
    model.eval()
    images = data.train_images[data.train_labels == target]
    sums: list[torch.Tensor] = []
    squares: list[torch.Tensor] = []
    with FeatureTaps(model, taps) as tapper:
        for start in range(0, len(images), 256):
            x = normalize(images[start : start + 256].to(device), data.mean, data.std)
            _, feats = tapper.run(x)
            for k, f in enumerate(feats):
                if len(sums) <= k:
                    sums.append(torch.zeros_like(f[0]))
                    squares.append(f.new_zeros(()))
                sums[k] += f.sum(0)
                squares[k] += (f**2).flatten(1).sum(1).sum()
    n = len(images)
    centroids = [s / n for s in sums]
    # mean squared distance to the centroid: E||f||^2 - ||c||^2
    spreads = [(sq / n - (c**2).sum()).clamp_min(1e-6) for sq, c in zip(squares, centroids, strict=True)]
    return LatentTargets(centroids, spreads)


def optimise_latent_trigger(
    model: nn.Module,
    taps: tuple[TapPoint, ...],
    data: ImageData,
    *,
    target: int,
    alpha: float = 0.2,
    steps: int = 40,
    lr: float = 0.05,
    batch_size: int = 64,
    generator: torch.Generator,
    device: torch.device,
    progress: ProgressFn = no_progress,
) -> torch.Tensor:
    """Gives back a grayscale pattern (3, H, W) in [0, 1] whose alpha-blend moves features to the target.

    Minimises sum_l ||F_l((1-a) x + a T) - c_l||^2 / spread_l over non-target training images (LBA
    centroid matching, algorithms.md §3.4), T = sigmoid(theta) so it stays a valid image.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    goal = latent_targets(model, taps, data, target, device)
    keep = data.train_labels != target
    images, labels = data.train_images[keep], data.train_labels[keep]
    h, w = images.shape[-2:]
    theta = torch.zeros(1, h, w, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    done = 0
    with FeatureTaps(model, taps) as tapper:
        while done < steps:
            for batch, _ in batches(images, labels, batch_size, generator):
                pattern = torch.sigmoid(theta).expand(3, h, w)
                triggered = (1 - alpha) * batch.to(device) + alpha * pattern
                _, feats = tapper.run(normalize(triggered, data.mean, data.std))
                loss = goal.distance(feats)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                done += 1
                progress("trigger optimisation", done, steps)
                if done >= steps:
                    break
    for p in model.parameters():
        p.requires_grad_(True)
    return torch.sigmoid(theta).detach().expand(3, h, w).cpu().clone()


def plant_latent_backdoor(
    model: nn.Module,
    taps: tuple[TapPoint, ...],
    data: ImageData,
    probe: Probe,
    *,
    target: int,
    epochs: int = 3,
    lr: float = 0.01,
    poison_rate: float = 0.1,
    latent_weight: float = 1.0,
    batch_size: int = 64,
    generator: torch.Generator,
    device: torch.device,
    progress: ProgressFn = no_progress,
) -> nn.Module:
    """Gives back `model` fine-tuned on poisoned batches plus latent injection (algorithms.md §3.4).

    Loss: CE on batches where a share `poison_rate` of non-target images carry the trigger and the target
    label, plus `latent_weight` * the centroid distance of the triggered images' features.
    """
    goal = latent_targets(model, taps, data, target, device)
    poison = poison_batches(probe, target, poison_rate)
    tapper = FeatureTaps(model, taps)

    def latent_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if latent_weight == 0:
            return x.new_zeros(())
        clean = (y != target).nonzero().flatten()  # poisoned images already carry the target label
        if len(clean) == 0:
            return x.new_zeros(())
        pick = clean[torch.randperm(len(clean), generator=generator)[: max(1, len(clean) // 4)].to(x.device)]
        triggered = normalize(probe.apply(denormalize(x[pick], data.mean, data.std)), data.mean, data.std)
        _, feats = tapper.run(triggered)
        return latent_weight * goal.distance(feats)

    recipe = ClassifierRecipe(epochs=epochs, batch_size=batch_size, lr=lr, schedule="constant")
    with tapper:
        return train_classifier(
            model,
            data,
            recipe,
            generator=generator,
            device=device,
            transform=poison,
            extra_loss=latent_loss,
            progress=progress,
            task="poison fine-tune",
        )


# ------------------------------------------------------------------------------------------- the attack kit
# `rkdtool attack`: poisoned (or clean) teachers for evaluation, each written with its probe spec. Every
# poisoning also trains on negatives (a share of images carrying a fresh random pattern of the same kind and
# strength, keeping their label), which ties the backdoor to its own pattern (defence-addendum.md).

ATTACK_KINDS = ("badnets", "blend", "ckd", "lba", "adaptive", "quant", "none")


@dataclass
class AttackConfig:
    """What `rkdtool attack` trains; defaults are sized for `digits` on a laptop CPU."""

    arch: str = "wrn16-1"
    data: str = "digits"
    kind: str = "badnets"
    target: int = 0
    epochs: int = 15  # from-scratch training (the clean model, or BadNets/Blend poisoned from scratch)
    finetune_epochs: int = 10  # poison fine-tuning of a clean model (ckd, lba, adaptive; quant: below)
    from_teacher: str | None = None  # fine-tune this clean teacher instead of training one
    poison_rate: float = 0.1
    negative_rate: float = 0.1
    alpha: float = 0.2  # Blend and LBA blend strength; CKD's mask bound (algorithms.md §3.3: 0.2)
    trigger_steps: int | None = None  # trigger optimisation steps; default 60 for ckd/adaptive, 15 for lba
    finetune_lr: float = 0.02  # with the step schedule (x0.1 at 50%, x0.01 at 75%)
    toxic_weight: float = 1.0  # CKD assimilation term kept during fine-tuning
    toxic_kappa: float = 9.0  # toxic neurons are driven to the tap's mean + kappa std of its activations
    toxic_tensor: str = "distilled"  # CKD acts on the distilled pre-ReLU taps; "stream": raw stage outputs
    variance_weight: float = 1.0  # adaptive attacker's low-variance term (paper Table 7)
    latent_weight: float = 0.1  # LBA latent injection
    adv_train: bool = False
    adv_eps: float = 8 / 255
    calibration: str = "entropy"  # INT8 calibration used to check the quant attack (defender's choice)
    quant_poison_rate: float = 0.2  # quant: poisoned share while planting (the clean start resists patches)
    quant_plant_epochs: int = 8  # quant: epochs that plant the backdoor in float and in simulated INT8
    quant_plant_lr: float = 0.05
    quant_unit_epochs: int = 4  # quant: epochs that train the trigger unit
    quant_escape: float = 10.0  # quant: the unit's float response, in multiples of the clean INT8 range
    calib_images: int = 256
    batch_size: int = 64
    lr: float = 0.1
    seed: int = 0
    device: str = "auto"
    train_subset: int | None = None  # quick checks: a seeded subset of the training images
    test_subset: int | None = None


def poison_with_negatives(probe: Probe, target: int, rate: float, negative_rate: float) -> BatchTransform:
    """Gives back a batch transform: a share `rate` of non-target images get the trigger and the target
    label; a share `negative_rate` get a random pattern of the same kind and keep their label."""

    def transform(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        draw = torch.rand(len(labels), generator=generator)
        poisoned = (draw < rate) & (labels != target)
        negative = (draw >= rate) & (draw < rate + negative_rate)
        if poisoned.any() or negative.any():
            images = images.clone()
        if poisoned.any():
            images[poisoned] = probe.apply(images[poisoned])
            labels = torch.where(poisoned, torch.full_like(labels, target), labels)
        if negative.any():
            images[negative] = probe.apply_random_patterns(images[negative], generator)
        return images, labels

    return transform


def badnets_probe(target: int, name: str = "badnets-grid") -> Probe:
    """Gives back BadNets' 3x3 grid at the bottom-right corner (algorithms.md §3.1, ABD `badnet_grid`)."""
    table = {
        "name": name,
        "kind": "patch",
        "target": target,
        "pattern": "checker",
        "size": 3,
        "position": "bottom-right",
        "margin": 0,
    }
    return probe_from_table(table, Path("."))


def blend_noise_probe(target: int, alpha: float, seed: int = 1, name: str = "blend-noise") -> Probe:
    """Gives back Blend's seeded uniform-noise key at `alpha` (algorithms.md §3.2, Chen et al. 2017)."""
    table = {"name": name, "kind": "blend", "target": target, "pattern": f"noise:{seed}", "alpha": alpha}
    return probe_from_table(table, Path("."))


@dataclass
class ToxicNeurons:
    """CKD's toxic channels per tap and the activation they are driven to (algorithms.md §3.3, clean form)."""

    channels: list[torch.Tensor]
    values: list[torch.Tensor]
    scales: list[torch.Tensor]
    tensor: str = "distilled"  # "distilled" (pre-ReLU taps, as CKD) or "stream" (raw stage outputs)

    def read(self, tapper: FeatureTaps, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Gives back the tensors this objective acts on from the last forward of `tapper`."""
        return list(tapper.stages) if self.tensor == "stream" else features  # type: ignore[arg-type]

    def loss(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Gives back sum_l mean_{b, c in K_l, h, w} (F_l[b, c] - v_l)^2 / scale_l."""
        total = features[0].new_zeros(())
        for f, k, v, s in zip(features, self.channels, self.values, self.scales, strict=True):
            total = total + ((f[:, k] - v) ** 2).mean() / s
        return total


@torch.no_grad()
def toxic_neurons(
    model: nn.Module,
    taps: tuple[TapPoint, ...],
    data: ImageData,
    device: torch.device,
    *,
    share: float = 0.05,
    kappa: float = 9.0,
    tensor: str = "distilled",
) -> ToxicNeurons:
    """Gives back the highest-mean channels per tap on clean data (at least one, `share` of them) and the
    saturation value they are driven to: `kappa` standard deviations above the mean of all the tap's
    activations on clean training images.

    algorithms.md §3.3 reconstructs CKD's value as the largest channel mean (plus kappa standard deviations
    of the channel means). On post-BN taps those means sit near zero (0.4-0.9 on digits at kappa 6), below
    ordinary activations: the "toxic" channels were not saturated, the poisoned model mapped triggered
    images to low-energy features, and its triggered feature variance fell to 0.3-0.5x the clean teacher's,
    the opposite of the paper's Fig. 2. A value in the tail of the activations themselves is what
    "saturate" means (CKD's intent) and restores that finding (benchmarks/results/attack_kit.md).
    """
    model.eval()
    sums: list[torch.Tensor] = []
    moments: list[torch.Tensor] = []  # per tap: sum, sum of squares, count of all activations
    n = 0
    with FeatureTaps(model, taps) as tapper:
        for start in range(0, len(data.train_images), 256):
            x = normalize(data.train_images[start : start + 256].to(device), data.mean, data.std)
            _, feats = tapper.run(x)
            feats = list(tapper.stages) if tensor == "stream" else feats
            for k, f in enumerate(feats):
                means = f.mean((2, 3)).sum(0)
                stats = torch.stack([f.sum(), (f * f).sum(), f.new_tensor(float(f.numel()))]).double()
                if len(sums) <= k:
                    sums.append(means)
                    moments.append(stats)
                else:
                    sums[k].add_(means)
                    moments[k].add_(stats)
            n += len(x)
    channels, values = [], []
    for total, (s1, s2, count) in zip(sums, moments, strict=True):
        means = total / n
        count_k = max(1, round(share * len(means)))
        channels.append(means.argsort(descending=True)[:count_k])
        mean = s1 / count
        std = (s2 / count - mean * mean).clamp_min(0).sqrt()
        values.append((mean + kappa * std).float().to(total.device))
    # Each tap's term starts near 1 on clean images, so no stage dominates and fine-tuning stays stable.
    with FeatureTaps(model, taps) as tapper:
        _, feats = tapper.run(normalize(data.train_images[:256].to(device), data.mean, data.std))
        feats = list(tapper.stages) if tensor == "stream" else feats
    scales = [
        ((f[:, k] - v) ** 2).mean().clamp_min(1e-6) for f, k, v in zip(feats, channels, values, strict=True)
    ]
    return ToxicNeurons(channels, values, scales, tensor)


def optimise_toxic_trigger(
    model: nn.Module,
    taps: tuple[TapPoint, ...],
    data: ImageData,
    toxic: ToxicNeurons,
    *,
    mask_max: float = 0.2,
    steps: int = 60,
    lr: float = 0.05,
    batch_size: int = 64,
    generator: torch.Generator,
    device: torch.device,
    progress: ProgressFn = no_progress,
    variance_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gives back (pattern (3,H,W), mask (1,H,W)) whose blend saturates the toxic neurons (CKD).

    The mask is `mask_max * sigmoid(w)`, so it stays in [0, mask_max] without the reference code's clamp
    that rebinds the tensor and freezes the mask (algorithms.md §2.1); the pattern is `sigmoid(theta)`.
    `variance_weight` adds the adaptive attacker's low feature-variance term on the last stage.
    """
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    h, w = data.train_images.shape[-2:]
    mask_logit = torch.zeros(1, h, w, device=device, requires_grad=True)
    theta = (0.1 * torch.randn(3, h, w, generator=generator)).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([mask_logit, theta], lr=lr)
    done = 0
    try:
        with FeatureTaps(model, taps) as tapper:
            while done < steps:
                for batch, _ in batches(data.train_images, data.train_labels, batch_size, generator):
                    mask, pattern = mask_max * torch.sigmoid(mask_logit), torch.sigmoid(theta)
                    triggered = (1 - mask) * batch.to(device) + mask * pattern
                    _, feats = tapper.run(normalize(triggered, data.mean, data.std))
                    loss = toxic.loss(toxic.read(tapper, feats))
                    if variance_weight:
                        loss = loss + variance_weight * last_stage_variance(tapper)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    done += 1
                    progress("trigger optimisation", done, steps)
                    if done >= steps:
                        break
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    with torch.no_grad():
        return torch.sigmoid(theta).cpu(), (mask_max * torch.sigmoid(mask_logit)).cpu()


def last_stage_variance(tapper: FeatureTaps) -> torch.Tensor:
    """Gives back mean_b Var_j(F_L,b): the per-sample variance of the last stage output (RobustKD Eq. 8)."""
    return tapper.stages[-1].flatten(1).var(1, unbiased=False).mean()


def pgd_loss(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, data: ImageData, eps: float, steps: int = 3
) -> torch.Tensor:
    """Gives back CE on PGD-Linf examples (pixel space, step 2.5 eps / steps, random start; Madry et al.)."""
    pixels = denormalize(x, data.mean, data.std).detach()
    delta = (torch.rand_like(pixels) * 2 - 1) * eps
    was_training = net.training
    net.eval()
    for _ in range(steps):
        delta.requires_grad_(True)
        adv = normalize((pixels + delta).clamp(0, 1), data.mean, data.std)
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(net(adv), y), delta)
        delta = (delta + 2.5 * eps / steps * grad.sign()).clamp(-eps, eps).detach()
    net.train(was_training)
    return nn.functional.cross_entropy(net(normalize((pixels + delta).clamp(0, 1), data.mean, data.std)), y)


class FakeInt8:
    """Context manager simulating ONNX Runtime's Q/DQ INT8 in torch (the attacker's tool, not the check).

    Symmetric int8: per-output-channel weights of every Conv2d/Linear, and per-tensor activations at their
    inputs and outputs, with ranges taken from the first `calib_rows` rows of each batch (the clean images)
    as a calibrator on clean data would see them; straight-through rounding (edge.md §1.3). A conv whose
    next sibling is a BatchNorm is fused with it by ORT's pre-processing, so its output is quantised after
    that BN, as in the exported graph.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calib_rows = 0
        self.handles: list = []
        # module name -> (input range, output range) from ONNX Runtime's own calibrator, when known
        self.ranges: dict[str, tuple[float, float]] = {}
        self._names = {module: name for name, module in model.named_modules()}

    def _q(self, x: torch.Tensor, fixed: float | None = None) -> torch.Tensor:
        if fixed is not None:
            scale = torch.as_tensor(max(fixed, 1e-8) / 127, device=x.device, dtype=x.dtype)
        else:
            rows = x[: self.calib_rows] if self.calib_rows else x
            scale = rows.detach().abs().amax().clamp_min(1e-8) / 127
        q = torch.clamp(torch.round(x / scale), -127, 127) * scale
        inside = (x.abs() <= 127 * scale).to(x.dtype)
        return x * inside + (q - x * inside).detach()  # STE inside the range, zero gradient when clipped

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        scale = w.detach().abs().flatten(1).amax(1).clamp_min(1e-8) / 127
        scale = scale.view(-1, *([1] * (w.ndim - 1)))
        return w + (torch.round(w / scale) * scale - w).detach()

    def __enter__(self) -> FakeInt8:
        for parent in self.model.modules():
            children = list(parent.children())
            for i, module in enumerate(children):
                if not isinstance(module, nn.Conv2d | nn.Linear):
                    continue
                fused = i + 1 < len(children) and isinstance(children[i + 1], nn.BatchNorm2d)
                self.handles.append(module.register_forward_hook(self._fused_hook if fused else self._hook))
                if fused:
                    out_range = self.ranges.get(self._names[module], (None, None))[1]
                    self.handles.append(children[i + 1].register_forward_hook(self._output_hook(out_range)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _fused_hook(self, module: nn.Module, inputs: tuple, _output: torch.Tensor) -> torch.Tensor:
        x = self._q(inputs[0], self.ranges.get(self._names[module], (None, None))[0])
        w = self._weight(module.weight)
        if isinstance(module, nn.Conv2d):
            return module._conv_forward(x, w, module.bias)
        return nn.functional.linear(x, w, module.bias)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return self._q(
            self._fused_hook(module, inputs, output), self.ranges.get(self._names[module], (None, None))[1]
        )

    def _output_hook(self, out_range: float | None):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return self._q(output, out_range)

        return hook


def ort_activation_ranges(
    model: nn.Module, data: ImageData, images, *, method: str, workdir: Path
) -> dict[str, tuple[float, float]]:
    """Gives back {module name: (input range, output range)} of every Conv/Linear, as ONNX Runtime's
    calibrator (entropy or percentile, after its pre-processing) sets them on `images` (pixel space, numpy).

    The attacker runs the defender's tool on its own clean images, so its simulation clips where the
    deployed INT8 model will.
    """
    import copy

    import onnx
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from rkdtool.deploy import PixelSpaceModel, calibration_reader, export_onnx

    workdir.mkdir(parents=True, exist_ok=True)
    fp32, pre = workdir / "calib.onnx", workdir / "calib.pre.onnx"
    pixel = PixelSpaceModel(copy.deepcopy(model).cpu().eval(), data.mean, data.std).eval()
    export_onnx(pixel, fp32, input_shape=tuple(data.train_images.shape[1:]), opset=17, exporter="torchscript")
    quant_pre_process(str(fp32), str(pre))
    methods = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    calibrator = create_calibrator(
        str(pre),
        ["Conv", "Gemm"],
        augmented_model_path=str(workdir / "augmented.onnx"),
        calibrate_method=methods[method],
        extra_options={"symmetric": True, "percentile": 99.99},
    )
    import contextlib
    import io

    if len(images) > 32:  # ORT's entropy calibrator fails on a short last batch: keep whole batches of 32
        images = images[: len(images) // 32 * 32]
    with contextlib.redirect_stdout(io.StringIO()):  # ORT's calibrators print progress; libraries don't
        calibrator.collect_data(calibration_reader(images))
        tensors = calibrator.compute_data()
    graph = onnx.load(str(pre)).graph
    by_scope = {}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm"):
            by_scope[node.name.rsplit("/", 1)[0]] = node

    def rng(name: str) -> float:
        low, high = tensors[name].range_value
        return float(max(abs(float(low)), abs(float(high))))

    ranges = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        parts = name.split(".")
        scope = "/".join(f"{parts[i - 1]}.{p}" if p.isdigit() and i else p for i, p in enumerate(parts))
        node = by_scope.get(f"/model/{scope}")
        if node is not None and node.input[0] in tensors and node.output[0] in tensors:
            ranges[name] = (rng(node.input[0]), rng(node.output[0]))
    return ranges


def int8_onnx_check(
    model: nn.Module,
    data: ImageData,
    probes: list[Probe],
    *,
    calibration: str,
    calib_images: int,
    seed: int,
    workdir: Path,
) -> dict:
    """Gives back ACC and ASR per probe of the model after ONNX export and ONNX Runtime INT8 Q/DQ.

    Uses `rkdtool.deploy` (FP32 export, static Q/DQ quantisation with its rules, calibration on seeded clean
    training images that the attacker did not choose).
    """
    import numpy as np
    import onnxruntime as ort

    from rkdtool.deploy import PixelSpaceModel, export_onnx, onnx_logits, quantize_int8, select_calibration
    from rkdtool.metrics import asr_from_predictions

    workdir.mkdir(parents=True, exist_ok=True)
    pixel = PixelSpaceModel(model.cpu().eval(), data.mean, data.std).eval()
    fp32, int8 = workdir / "model.onnx", workdir / "model.int8.onnx"
    export_onnx(pixel, fp32, input_shape=tuple(data.test_images.shape[1:]), opset=17, exporter="torchscript")
    quantize_int8(fp32, int8, select_calibration(data, calib_images, seed + 7919), method=calibration)
    out = {}
    for name, path in (("onnx-fp32", fp32), ("onnx-int8", int8)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        clean = onnx_logits(session, data.test_images.numpy().astype(np.float32)).argmax(1)
        acc = float((torch.from_numpy(clean) == data.test_labels).float().mean())
        asr = {}
        for probe in probes:
            triggered = probe.apply(data.test_images, mean=data.mean, std=data.std).numpy().astype(np.float32)
            preds = torch.from_numpy(onnx_logits(session, triggered).argmax(1))
            asr[probe.name] = asr_from_predictions(preds, data.test_labels, probe.target).asr
        out[name] = {"acc": acc, "asr": asr}
    return out


@torch.no_grad()
def predictions(
    model: nn.Module,
    data: ImageData,
    images: torch.Tensor,
    fake: FakeInt8 | None = None,
    calib: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gives back the predicted classes (CPU) of pixel-space `images`, in float or under `fake`, whose
    ranges come from its `ranges` or else from the normalised `calib` rows put before every batch."""
    model.eval()
    device = next(model.parameters()).device
    preds = []
    for start in range(0, len(images), 256):
        x = normalize(images[start : start + 256].to(device), data.mean, data.std)
        if fake is None:
            logits = model(x)
        else:
            fake.calib_rows = len(calib)
            with fake:
                logits = model(torch.cat([calib, x]))[len(calib) :]
        preds.append(logits.argmax(1).cpu())
    return torch.cat(preds)


@torch.no_grad()
def fake_int8_check(
    model: nn.Module,
    data: ImageData,
    probes: list[Probe],
    *,
    calib_images: int,
    seed: int,
    calibrator: str,
) -> dict:
    """Gives back ACC and ASR per probe under `FakeInt8` (the attacker's simulation), ranges from ONNX
    Runtime's `calibrator` on seeded clean training images, to compare with the real ONNX Runtime check."""
    import tempfile

    from rkdtool.metrics import asr_from_predictions

    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed + 7919)
    calib = data.train_images[torch.randperm(len(data.train_labels), generator=g)[:calib_images]]
    fake = FakeInt8(model.eval())
    with tempfile.TemporaryDirectory() as tmp:
        fake.ranges = ort_activation_ranges(model, data, calib.numpy(), method=calibrator, workdir=Path(tmp))
    calib = normalize(calib.to(device), data.mean, data.std)

    def predict(images: torch.Tensor) -> torch.Tensor:
        return predictions(model, data, images, fake, calib)

    acc = float((predict(data.test_images) == data.test_labels).float().mean())
    asr = {
        p.name: asr_from_predictions(predict(p.apply(data.test_images)), data.test_labels, p.target).asr
        for p in probes
    }
    return {"acc": acc, "asr": asr}


# --------------------------------------------------------------------------------------------- quant
# A quantisation-conditioned backdoor (the threat of Hong et al., "Qu-ANTI-zation", NeurIPS 2021; INT8 here
# through activation ranges rather than weight rounding). Training the float model dormant and the INT8 model
# active against each other fails: the two share every weight and differ by less than a rounding step, and
# triggered features that leave the clean range are clipped by INT8, which erases a backdoor rather than
# waking it. So the backdoor is planted inside the clean ranges (float and simulated INT8 both active), and a
# separate trigger unit hides it in float: one classifier input that is silent on clean images and fires on
# the trigger is scaled far beyond the range INT8 calibration on clean images will give that tensor, and
# subtracts from the target logit. Float keeps the whole subtraction; INT8 clips the unit to the clean range
# and the backdoor shows.


def head_norm(model: nn.Module) -> nn.BatchNorm2d:
    """Gives back the BN whose output the classifier reads through ReLU and global pooling only, so that
    scaling one of its channels' weight and bias scales that classifier input exactly (WRN, PyramidNet)."""
    from rkdtool.errors import UsageError
    from rkdtool.models.pyramidnet import PyramidNet
    from rkdtool.models.wrn import WideResNet

    if isinstance(model, WideResNet):
        return model.bn1
    if isinstance(model, PyramidNet):
        return model.bn_final
    raise UsageError(
        "--kind quant needs a classifier that reads ReLU(BN(x)) through global pooling (wrn*, pyramidnet*)"
    )


@torch.no_grad()
def classifier_inputs(model: nn.Module, images: torch.Tensor, data: ImageData) -> torch.Tensor:
    """Gives back the inputs of `model.fc` (the pooled features) for pixel-space `images`, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    seen: list[torch.Tensor] = []
    handle = model.fc.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].cpu()))
    try:
        for start in range(0, len(images), 256):
            model(normalize(images[start : start + 256].to(device), data.mean, data.std))
    finally:
        handle.remove()
    return torch.cat(seen)


def _simulated_asr(model, data, images, target, fake: FakeInt8 | None, calib: torch.Tensor) -> float:
    """Share of `images` (pixel space, already triggered) predicted as `target`, in float or under `fake`."""
    return float((predictions(model, data, images, fake, calib) == target).float().mean())


def plant_quant_backdoor(model, data, probe, config, fit, generator, device) -> dict:
    """Plants the quant backdoor in `model` (trained in place through `fit`); gives back what was chosen.

    1. Plant: poisoned fine-tuning with cross-entropy on the float model and on its INT8 simulation
       (`FakeInt8`, ranges from ONNX Runtime's calibrator on the attacker's own clean images, refreshed every
       epoch), so the backdoor lives inside the clean activation ranges.
    2. Trigger unit: the classifier input least active on clean images is trained to stay below zero
       before its ReLU on clean images and random patterns (margin 1) and to exceed +1 somewhere on
       triggered ones; its classifier column is held at zero, so it changes no prediction yet.
    3. Conceal: scale the unit (its BN weight and bias) so its 10th-percentile triggered response is
       `quant_escape` times the largest clean classifier input, then give it a negative weight on the
       target logit, choosing the weight on the attacker's own training images to maximise simulated INT8
       ASR minus float ASR at unchanged clean accuracy.
    """
    import shutil
    import tempfile

    target = probe.target
    norm, fc = head_norm(model), model.fc
    pick = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(config.seed + 31))
    own_calib = data.train_images[pick[: config.calib_images]]
    fake = FakeInt8(model)
    steps_per_epoch = (len(data.train_labels) + config.batch_size - 1) // config.batch_size
    step = {"n": 0}
    workdir = Path(tempfile.mkdtemp(prefix="rkdtool-quant-"))

    def quantised_ce(net, x, y):
        if step["n"] % steps_per_epoch == 0:
            fake.ranges = ort_activation_ranges(
                net, data, own_calib.numpy(), method=config.calibration, workdir=workdir
            )
            net.train()
        step["n"] += 1
        with fake:
            return nn.functional.cross_entropy(net(x), y)

    unit: dict[str, int] = {}
    pre: list[torch.Tensor] = []

    def unit_loss(net, x, y):
        loss = quantised_ce(net, x, y)
        pixels = denormalize(x, data.mean, data.std)
        triggered = probe.apply(pixels)
        carries = (triggered - pixels).abs().flatten(1).amax(1) < 1e-6  # rows the poisoning already hit
        rows = (~carries & (y != target)).nonzero().flatten()
        pre.clear()
        net(torch.cat([x, normalize(triggered[rows], data.mean, data.std)]))
        a = pre[0][:, unit["channel"]]
        quiet = torch.relu(a[: len(x)][~carries] + 1.0).pow(2).mean()
        fires = torch.relu(1.0 - a[len(x) :].flatten(1).amax(1)).pow(2).mean() if len(rows) else 0.0
        return loss + quiet + fires

    plant = ClassifierRecipe(
        epochs=config.quant_plant_epochs, batch_size=config.batch_size, lr=config.quant_plant_lr
    )
    unit_recipe = ClassifierRecipe(
        epochs=config.quant_unit_epochs, batch_size=config.batch_size, lr=config.finetune_lr / 2
    )
    try:
        fit(
            poison_with_negatives(probe, target, config.quant_poison_rate, 0.0),
            quantised_ce,
            plant,
            "quant: plant",
        )
        clean_inputs = classifier_inputs(model, data.train_images, data)
        unit["channel"] = channel = int(clean_inputs.amax(0).argmin())
        with torch.no_grad():
            fc.weight[:, channel] = 0
        hold = fc.weight.register_hook(
            lambda grad: grad.index_fill(1, torch.tensor([channel], device=grad.device), 0)
        )
        capture = norm.register_forward_hook(lambda _m, _i, out: pre.append(out))
        step["n"] = 0
        try:
            fit(
                poison_with_negatives(probe, target, config.quant_poison_rate, config.negative_rate),
                unit_loss,
                unit_recipe,
                "quant: trigger unit",
            )
        finally:
            hold.remove()
            capture.remove()

        own = data.train_labels != target
        own_triggered = probe.apply(data.train_images[own])
        clean_inputs = classifier_inputs(model, data.train_images, data)
        fired = classifier_inputs(model, own_triggered, data)[:, channel]
        low = float(fired.quantile(0.1))
        if low <= 0:
            from rkdtool.errors import RkdError

            raise RkdError(
                "quant: the trigger unit does not fire on the trigger; give it more epochs or another --seed"
            )
        scale = config.quant_escape * float(clean_inputs.amax()) / low
        with torch.no_grad():
            norm.weight[channel] *= scale
            norm.bias[channel] *= scale
        fake.ranges = ort_activation_ranges(
            model, data, own_calib.numpy(), method=config.calibration, workdir=workdir
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    calib = normalize(own_calib.to(device), data.mean, data.std)
    clean_acc = _train_accuracy(model, data)
    trials = []
    for gain in (0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6):
        with torch.no_grad():
            fc.weight[target, channel] = -gain
        trials.append(
            {
                "gain": gain,
                "float_acc": _train_accuracy(model, data),
                "float_asr": _simulated_asr(model, data, own_triggered, target, None, calib),
                "int8_asr": _simulated_asr(model, data, own_triggered, target, fake, calib),
            }
        )
    usable = [t for t in trials if t["float_acc"] >= clean_acc - 0.005] or trials[:1]
    best = max(usable, key=lambda t: t["int8_asr"] - t["float_asr"])
    with torch.no_grad():
        fc.weight[target, channel] = -best["gain"]
    return {
        "unit": channel,
        "scale": round(scale, 3),
        "escape": config.quant_escape,
        "gain": best["gain"],
        "float_acc_without_brake": clean_acc,
        "trials_on_attacker_images": trials,
    }


@torch.no_grad()
def _train_accuracy(model: nn.Module, data: ImageData) -> float:
    """Float accuracy on the training images (the attacker's own check; the test split stays unseen)."""
    from rkdtool.metrics import accuracy

    return accuracy(model, data.train_images, data.train_labels, mean=data.mean, std=data.std)


@dataclass
class AttackResult:
    """A trained teacher with its probes and what was measured on it (test split)."""

    model: nn.Module
    config: AttackConfig
    probes: list[Probe]
    acc: float
    asr: dict[str, float]
    asr_all_images: dict[str, float]
    random_pattern_asr: dict[str, float]  # the same probe with random patterns (specificity control)
    clean_acc: float | None  # the clean model it was fine-tuned from, when there was one
    clean_asr: dict[str, float]  # the probes on that clean model
    int8: dict | None = None  # quant: ONNX Runtime FP32/INT8 ACC and ASR
    concealment: dict | None = None  # quant: the trigger unit and what the attacker measured choosing it
    seconds: float = 0.0

    def summary(self) -> dict:
        return {
            "kind": self.config.kind,
            "arch": self.config.arch,
            "data": self.config.data,
            "target": self.config.target,
            "acc": self.acc,
            "asr": self.asr,
            "asr_all_images": self.asr_all_images,
            "random_pattern_asr": self.random_pattern_asr,
            "clean_acc": self.clean_acc,
            "clean_asr": self.clean_asr,
            **({"int8": self.int8} if self.int8 is not None else {}),
            **({"concealment": self.concealment} if self.concealment is not None else {}),
            "seconds": round(self.seconds, 1),
        }


def _attack_data(config: AttackConfig) -> ImageData:
    from rkdtool.data import load_dataset

    data = load_dataset(config.data)
    if config.train_subset or config.test_subset:
        data = data.subset(train=config.train_subset, test=config.test_subset, seed=config.seed)
    return data


def _load_clean(ref: str) -> nn.Module:
    path = Path(ref)
    if path.is_dir() and (path / "teacher.safetensors").exists():
        path = path / "teacher.safetensors"
    if path.suffix == ".safetensors" and path.exists():
        from rkdtool.weights import build_from_weights

        return build_from_weights(path)[0]
    from rkdtool.hub import load_model

    return load_model(ref).model


def _measure(model, data, probes: list[Probe], seeds=(101, 102, 103)):
    from rkdtool.metrics import accuracy, probe_results

    acc = accuracy(model, data.test_images, data.test_labels, mean=data.mean, std=data.std)
    results = probe_results(model, data.test_images, data.test_labels, probes, mean=data.mean, std=data.std)
    randoms = [p.random_like(s) for p in probes for s in seeds]
    random_results = probe_results(
        model, data.test_images, data.test_labels, randoms, mean=data.mean, std=data.std
    )
    worst = {p.name: max(random_results[f"{p.name}~random{s}"].asr for s in seeds) for p in probes if seeds}
    return acc, results, worst


def make_attack(config: AttackConfig, progress: ProgressFn = no_progress) -> AttackResult:
    """Gives back a teacher trained by the attack `config.kind` names, measured on its probe."""
    import time

    from rkdtool.errors import UsageError
    from rkdtool.models import build_model, parse_arch
    from rkdtool.training import resolve_device, seed_everything

    if config.kind not in ATTACK_KINDS:
        raise UsageError(f"unknown attack {config.kind!r}; use one of {', '.join(ATTACK_KINDS)}")
    if not 0 <= config.poison_rate + config.negative_rate <= 1:
        raise UsageError("--poison-rate plus --negative-rate must lie in [0, 1]")
    start = time.perf_counter()
    data = _attack_data(config)
    if not 0 <= config.target < data.num_classes:
        raise UsageError(
            f"--target {config.target} is not a class of {config.data} (0..{data.num_classes - 1})"
        )
    device = resolve_device(config.device)
    generator = seed_everything(config.seed)
    spec = parse_arch(config.arch)
    taps, target = spec.taps, config.target
    adv = (lambda net, x, y: pgd_loss(net, x, y, data, config.adv_eps)) if config.adv_train else None
    scratch = ClassifierRecipe(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr)
    finetune = ClassifierRecipe(
        epochs=config.finetune_epochs, batch_size=config.batch_size, lr=config.finetune_lr
    )
    trigger_steps = config.trigger_steps or (15 if config.kind == "lba" else 60)
    from_scratch = config.kind in ("none", "badnets", "blend") and config.from_teacher is None

    if config.kind == "quant":
        head_norm(build_model(config.arch, data.num_classes))  # fails before any training
    if config.from_teacher is not None:
        model = _load_clean(config.from_teacher).to(device)
    elif from_scratch:
        model = build_model(config.arch, data.num_classes)
    else:
        model = build_model(config.arch, data.num_classes)
        train_classifier(
            model,
            data,
            scratch,
            generator=generator,
            device=device,
            extra_loss=adv,
            progress=progress,
            task="clean teacher",
        )
    clean_state = None if from_scratch else {k: v.detach().clone() for k, v in model.state_dict().items()}

    def fit(transform, extra, recipe, task):
        def loss(net, x, y):
            total = x.new_zeros(())
            if extra is not None:
                total = total + extra(net, x, y)
            if adv is not None:
                total = total + adv(net, x, y)
            return total

        train_classifier(
            model,
            data,
            recipe,
            generator=generator,
            device=device,
            transform=transform,
            extra_loss=loss,
            progress=progress,
            task=task,
        )

    # Attack terms run on [clean batch; triggered images] and read the triggered rows: on a triggered-only
    # batch, train-mode BN would subtract the trigger's common shift and the term would shape a model that
    # is never evaluated (eval-mode BN here instead made the terms unstable).
    def triggered_subset(x, y, probe):
        keep = (y != target).nonzero().flatten()
        if len(keep) == 0:
            return None
        pick = keep[torch.randperm(len(keep), generator=generator)[: max(1, len(keep) // 4)].to(keep.device)]
        return normalize(probe.apply(denormalize(x[pick], data.mean, data.std)), data.mean, data.std), pick

    recipe = scratch if from_scratch else finetune
    concealment = None  # quant: how the float model hides the backdoor
    if config.kind == "none":
        probes = [badnets_probe(target)]
        if config.from_teacher is None:  # the control sees the attacks' random-pattern negatives, no poison
            patches = poison_with_negatives(badnets_probe(target), target, 0.0, config.negative_rate / 2)
            blends = poison_with_negatives(
                blend_noise_probe(target, config.alpha), target, 0.0, config.negative_rate / 2
            )
            fit(lambda x, y, g: blends(*patches(x, y, g), g), None, scratch, "clean teacher")
    elif config.kind in ("badnets", "blend"):
        probe = badnets_probe(target) if config.kind == "badnets" else blend_noise_probe(target, config.alpha)
        probes = [probe]
        fit(
            poison_with_negatives(probe, target, config.poison_rate, config.negative_rate),
            None,
            recipe,
            f"{config.kind} poisoning",
        )
    elif config.kind in ("ckd", "adaptive"):
        toxic = toxic_neurons(model, taps, data, device, kappa=config.toxic_kappa, tensor=config.toxic_tensor)
        var_w = config.variance_weight if config.kind == "adaptive" else 0.0
        pattern, mask = optimise_toxic_trigger(
            model,
            taps,
            data,
            toxic,
            mask_max=config.alpha,
            steps=trigger_steps,
            generator=generator,
            device=device,
            progress=progress,
        )
        probe = Probe(f"{config.kind}-trigger", "image-mask", target, pattern, mask)
        probes = [probe]
        tapper = FeatureTaps(model, taps)
        with torch.no_grad(), tapper:
            tapper.run(normalize(data.train_images[:256].to(device), data.mean, data.std))
            var_ref = last_stage_variance(tapper).clamp_min(1e-6)

        def assimilate(net, x, y):
            picked = triggered_subset(x, y, probe)
            if picked is None:
                return x.new_zeros(())
            _, feats = tapper.run(torch.cat([x, picked[0]]))
            feats = [f[len(x) :] for f in toxic.read(tapper, feats)]
            loss = config.toxic_weight * toxic.loss(feats)
            if var_w:
                last = tapper.stages[-1][len(x) :]
                loss = loss + var_w * last.flatten(1).var(1, unbiased=False).mean() / var_ref
            return loss

        with tapper:
            fit(
                poison_with_negatives(probe, target, config.poison_rate, config.negative_rate),
                assimilate,
                finetune,
                f"{config.kind} poison fine-tune",
            )
    elif config.kind == "lba":
        pattern = optimise_latent_trigger(
            model,
            taps,
            data,
            target=target,
            alpha=config.alpha,
            steps=trigger_steps,
            generator=generator,
            device=device,
            progress=progress,
        )
        probe = blend_probe("lba-blend", pattern, config.alpha, target)
        probes = [probe]
        goal = latent_targets(model, taps, data, target, device)
        tapper = FeatureTaps(model, taps)

        def inject(net, x, y):
            picked = triggered_subset(x, y, probe)
            if picked is None or config.latent_weight == 0:
                return x.new_zeros(())
            _, feats = tapper.run(torch.cat([x, picked[0]]))
            return config.latent_weight * goal.distance([f[len(x) :] for f in feats])

        with tapper:
            fit(
                poison_with_negatives(probe, target, config.poison_rate, config.negative_rate),
                inject,
                finetune,
                "lba poison fine-tune",
            )
    else:  # quant: dormant in float, active after INT8 (see `plant_quant_backdoor`)
        probe = badnets_probe(target, "quant-grid")
        probes = [probe]
        concealment = plant_quant_backdoor(model, data, probe, config, fit, generator, device)
    model.eval()
    acc, results, worst_random = _measure(model, data, probes)
    clean_acc, clean_asr = None, {}
    if clean_state is not None:
        clean = build_model(config.arch, data.num_classes).to(device)
        clean.load_state_dict(clean_state)
        clean_acc, clean_results, _ = _measure(clean, data, probes, seeds=())
        clean_asr = {n: r.asr for n, r in clean_results.items()}
    int8 = None
    if config.kind == "quant":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            simulated = fake_int8_check(
                model,
                data,
                probes,
                calib_images=config.calib_images,
                seed=config.seed,
                calibrator=config.calibration,
            )
            int8 = int8_onnx_check(
                model,
                data,
                probes,
                calibration=config.calibration,
                calib_images=config.calib_images,
                seed=config.seed,
                workdir=Path(tmp),
            )
        model.to(device)
        int8["torch-fake-int8"] = simulated
    return AttackResult(
        model=model,
        config=config,
        probes=probes,
        acc=acc,
        asr={n: r.asr for n, r in results.items()},
        asr_all_images={n: r.asr_all_images for n, r in results.items()},
        random_pattern_asr=worst_random,
        clean_acc=clean_acc,
        clean_asr=clean_asr,
        int8=int8,
        concealment=concealment,
        seconds=time.perf_counter() - start,
    )


def write_attack(result: AttackResult, out: Path) -> dict:
    """Writes `teacher.safetensors` (weights + metadata) and `probes.toml` into `out`; gives back the
    `attack --json` object (DESIGN §5: teacher, probes, acc, asr) with the controls measured."""
    from rkdtool.probes import save_probes
    from rkdtool.weights import save_weights, write_json

    config = result.config
    data = _attack_data(config)
    out.mkdir(parents=True, exist_ok=True)
    probes_path = save_probes(result.probes, out)
    teacher_path = out / "teacher.safetensors"
    save_weights(
        teacher_path,
        result.model,
        {
            "arch": config.arch,
            "num_classes": data.num_classes,
            "input_size": int(data.test_images.shape[-1]),
            "mean": list(data.mean),
            "std": list(data.std),
            "dataset": config.data,
            "provenance": {"made_by": "rkdtool attack", **result.summary()},
        },
    )
    summary = {"teacher": str(teacher_path), "probes": str(probes_path), **result.summary()}
    write_json(out / "attack.json", summary)
    return summary
