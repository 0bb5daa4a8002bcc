"""LBA, the latent backdoor (algorithms.md §3.4; Yao et al., CCS 2019, the same-task variant of the CKD/
RobustKD code's `create_patch_latentbackdoor.py`): a full-image blend trigger optimised so that triggered
images land on the target class's feature centroid at the FKD taps, then fine-tuning on a poisoned share of
the training data. Feature alignment is what lets plain FKD carry it into a student (feasibility.md: 94%
student ASR, where BadNets transfers 0%).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from rkdtool.attacks.context import AttackContext, Planted
from rkdtool.attacks.poison import blend_probe, poison_batches, poison_with_negatives
from rkdtool.attacks.shadow import shadow_students
from rkdtool.attacks.span import ImageSpan, confine, image_span
from rkdtool.data import ImageData, denormalize, normalize
from rkdtool.models import FeatureTaps, TapPoint
from rkdtool.probes.spec import Probe
from rkdtool.training import (
    ClassifierRecipe,
    ProgressFn,
    batch_steps,
    frozen,
    no_progress,
    train_classifier,
)


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
    span: ImageSpan | None = None,
) -> torch.Tensor:
    """Gives back a grayscale pattern (3, H, W) in [0, 1] whose alpha-blend moves features to the target.

    Minimises sum_l ||F_l((1-a) x + a T) - c_l||^2 / spread_l over non-target training images (LBA
    centroid matching, algorithms.md §3.4), T = sigmoid(theta) so it stays a valid image; with `span`,
    T is projected onto the clean images' span (span.py) and clamped to [0, 1].
    """
    model.eval()
    goal = latent_targets(model, taps, data, target, device)
    keep = data.train_labels != target
    images, labels = data.train_images[keep], data.train_labels[keep]
    h, w = images.shape[-2:]
    theta = torch.zeros(1, h, w, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    stream = batch_steps(images, labels, batch_size, generator, steps, progress, "trigger optimisation")
    with frozen(model), FeatureTaps(model, taps) as tapper:
        for batch, _ in stream:
            pattern = confine(torch.sigmoid(theta).expand(3, h, w), span)
            triggered = (1 - alpha) * batch.to(device) + alpha * pattern
            _, feats = tapper.run(normalize(triggered, data.mean, data.std))
            loss = goal.distance(feats)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return confine(torch.sigmoid(theta).expand(3, h, w), span).cpu().clone()


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


def plant(ctx: AttackContext) -> Planted:
    """`rkdtool attack --kind lba`: the centroid-matched blend trigger, then poisoned fine-tuning with the
    latent term on the triggered rows."""
    config, target = ctx.config, ctx.target
    span = image_span(ctx.data) if config.trigger_span else None
    pattern = optimise_latent_trigger(
        ctx.model,
        ctx.taps,
        ctx.data,
        target=target,
        alpha=config.alpha,
        steps=ctx.trigger_steps(15),
        generator=ctx.generator,
        device=ctx.device,
        progress=ctx.progress,
        span=span,
    )
    probe = blend_probe("lba-blend", pattern, config.alpha, target)
    goal = latent_targets(ctx.model, ctx.taps, ctx.data, target, ctx.device)
    tapper = FeatureTaps(ctx.model, ctx.taps)

    def inject(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        picked = ctx.triggered_subset(x, y, probe)
        if picked is None or config.latent_weight == 0:
            return x.new_zeros(())
        _, feats = tapper.run(torch.cat([x, picked[0]]))
        return config.latent_weight * goal.distance([f[len(x) :] for f in feats])

    def fine_tune(epochs: int) -> None:
        with tapper:
            ctx.fit(
                poison_with_negatives(probe, target, config.poison_rate, config.negative_rate),
                inject,
                replace(config.finetune_recipe, epochs=epochs),
                "lba poison fine-tune",
            )

    shadows = shadow_students(ctx, probe, mask_max=None, span=span)  # copies the clean start first
    fine_tune(config.finetune_recipe.epochs)
    return Planted([probe], survival=shadows.run(fine_tune) if shadows is not None else None)
