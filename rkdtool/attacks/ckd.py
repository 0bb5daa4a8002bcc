"""CKD, toxic-neuron assimilation (algorithms.md §3.3; xingkongyuwu/CKD `CIFAR-100/create_patch.py`): a
blend trigger optimised to saturate the channels most active on clean data at the FKD taps, then poisoned
fine-tuning that keeps them saturated on triggered images. The adaptive attacker (`adaptive.py`) adds a
low feature-variance term against RobustKD's detector.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from rkdtool.attacks.context import AttackContext, Planted
from rkdtool.attacks.poison import poison_with_negatives
from rkdtool.attacks.shadow import shadow_students
from rkdtool.attacks.span import ImageSpan, confine, image_span
from rkdtool.data import ImageData, normalize
from rkdtool.models import FeatureTaps, TapPoint
from rkdtool.probes.spec import Probe
from rkdtool.training import (
    ProgressFn,
    batch_steps,
    frozen,
    no_progress,
)


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
    span: ImageSpan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gives back (pattern (3,H,W), mask (1,H,W)) whose blend saturates the toxic neurons (CKD).

    The mask is `mask_max * sigmoid(w)`, so it stays in [0, mask_max] without the reference code's clamp
    that rebinds the tensor and freezes the mask (algorithms.md §2.1); the pattern is `sigmoid(theta)`.
    `variance_weight` adds the adaptive attacker's low feature-variance term on the last stage.
    """
    model.eval()
    h, w = data.train_images.shape[-2:]
    mask_logit = torch.zeros(1, h, w, device=device, requires_grad=True)
    theta = (0.1 * torch.randn(3, h, w, generator=generator)).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([mask_logit, theta], lr=lr)

    def trigger() -> tuple[torch.Tensor, torch.Tensor]:  # an in-span trigger is a blend at the budget
        mask = mask_max * torch.sigmoid(mask_logit)
        return confine(torch.sigmoid(theta), span), mask if span is None else torch.full_like(mask, mask_max)

    stream = batch_steps(
        data.train_images, data.train_labels, batch_size, generator, steps, progress, "trigger optimisation"
    )
    with frozen(model), FeatureTaps(model, taps) as tapper:
        for batch, _ in stream:
            pattern, mask = trigger()
            triggered = (1 - mask) * batch.to(device) + mask * pattern
            _, feats = tapper.run(normalize(triggered, data.mean, data.std))
            loss = toxic.loss(toxic.read(tapper, feats))
            if variance_weight:
                loss = loss + variance_weight * last_stage_variance(tapper)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        pattern, mask = trigger()
        return pattern.cpu(), mask.cpu()


def last_stage_variance(tapper: FeatureTaps) -> torch.Tensor:
    """Gives back mean_b Var_j(F_L,b): the per-sample variance of the last stage output (RobustKD Eq. 8)."""
    return tapper.stages[-1].flatten(1).var(1, unbiased=False).mean()


def plant(
    ctx: AttackContext,
    variance_weight: float = 0.0,
    name: str = "ckd",
    shadow_methods: tuple[str, ...] | None = None,
    clean_student_control: bool = False,
) -> Planted:
    """`rkdtool attack --kind ckd`: the toxic-neuron trigger, then poisoned fine-tuning that keeps the toxic
    neurons saturated on the triggered rows (plus `variance_weight` x the low-variance term: `adaptive`;
    `shadow_methods`: shadow students distilled these ways whatever the config says, and
    `clean_student_control`: the trigger kept harmless on a student of the clean start too: `ta-aware`)."""
    config, target = ctx.config, ctx.target
    model, taps, data, device = ctx.model, ctx.taps, ctx.data, ctx.device
    toxic = toxic_neurons(model, taps, data, device, kappa=config.toxic_kappa, tensor=config.toxic_tensor)
    span = image_span(data) if config.trigger_span else None
    pattern, mask = optimise_toxic_trigger(
        model,
        taps,
        data,
        toxic,
        mask_max=config.alpha,
        steps=ctx.trigger_steps(60),
        generator=ctx.generator,
        device=device,
        progress=ctx.progress,
        span=span,
    )
    probe = Probe(f"{name}-trigger", "image-mask", target, pattern, mask)
    tapper = FeatureTaps(model, taps)
    with torch.no_grad(), tapper:
        tapper.run(normalize(data.train_images[:256].to(device), data.mean, data.std))
        var_ref = last_stage_variance(tapper).clamp_min(1e-6)

    def assimilate(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        picked = ctx.triggered_subset(x, y, probe)
        if picked is None:
            return x.new_zeros(())
        _, feats = tapper.run(torch.cat([x, picked[0]]))
        feats = [f[len(x) :] for f in toxic.read(tapper, feats)]
        loss = config.toxic_weight * toxic.loss(feats)
        if variance_weight:
            last = tapper.stages[-1][len(x) :]
            loss = loss + variance_weight * last.flatten(1).var(1, unbiased=False).mean() / var_ref
        return loss

    def fine_tune(epochs: int) -> None:
        with tapper:
            ctx.fit(
                poison_with_negatives(probe, target, config.poison_rate, config.negative_rate),
                assimilate,
                replace(config.finetune_recipe, epochs=epochs),
                f"{name} poison fine-tune",
            )

    shadows = shadow_students(  # copies the clean start first
        ctx,
        probe,
        mask_max=config.alpha,
        span=span,
        methods=shadow_methods,
        clean_student=clean_student_control,
    )
    fine_tune(config.finetune_recipe.epochs)
    return Planted([probe], survival=shadows.run(fine_tune) if shadows is not None else None)
