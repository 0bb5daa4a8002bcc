"""The kit's shared poisoning: trigger probes of the standard attacks and the batch transforms that poison a
share of the training batches.

Every poisoning also trains on negatives (a share of images carrying a fresh random pattern of the same kind
and strength, keeping their label), which ties the backdoor to its own pattern (defence-addendum.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rkdtool.probes.spec import Probe, probe_from_table
from rkdtool.training import (
    BatchTransform,
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
