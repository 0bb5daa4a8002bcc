"""Projected gradient descent in pixel space (Madry et al., ICLR 2018): adversarial examples for adversarial
training, and robust accuracy (`rkdtool probe --pgd`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rkdtool.data import ImageData, denormalize, normalize
from rkdtool.models import placement


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


@dataclass(frozen=True)
class PgdBudget:
    """An L-inf PGD attack in [0, 1] pixel space (the CIFAR protocol: eps 8/255, step 2/255, 20 steps, one
    uniform random start, CE loss; algorithms.md §5)."""

    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 20

    def describe(self) -> dict:
        return {"norm": "linf", "eps": self.eps, "step": self.step, "steps": self.steps, "random_start": True}


def robust_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    mean,
    std,
    budget: PgdBudget = PgdBudget(),
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> float:
    """Gives back the share of test images `model` still classifies correctly under untargeted PGD-Linf
    (pixel space, normalisation inside; the model's weights are not changed and get no gradient)."""
    device, dtype = placement(model)
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    correct = 0
    try:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device, dtype)
            y = labels[start : start + batch_size].to(device)
            noise = torch.rand(x.shape, generator=generator).to(device, dtype)
            delta = (noise * 2 - 1) * budget.eps
            for _ in range(budget.steps):
                delta.requires_grad_(True)
                logits = model(normalize((x + delta).clamp(0, 1), mean, std))
                (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y), delta)
                delta = (delta + budget.step * grad.sign()).clamp(-budget.eps, budget.eps).detach()
            with torch.no_grad():
                final = model(normalize((x + delta).clamp(0, 1), mean, std)).argmax(1)
            correct += int((final == y).sum())
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return correct / max(1, len(labels))
